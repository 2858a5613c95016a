"""The transaction slot on the real broker: what a refused transaction held is never committed later."""

from __future__ import annotations

import time

import pytest
from kafka import TopicPartition
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from schemas.config import TopicsConfig
from workers.kafka_io import make_consumer, make_transactional_producer
from workers.stack import LocalStack
from workers.transactions import TransactionFailed, TransactionSlot

pytestmark = pytest.mark.integration


def test_offsets_of_a_refused_commit_are_not_committed_by_the_next_transaction(stack: LocalStack) -> None:
    """kafka-python 3.0.12 keeps offsets the group coordinator refused (a stale generation) pending across
    the abort and sends them with the next transaction's: the slot starts a fresh producer instead."""
    topics, bootstrap = TopicsConfig(), stack.config.bootstrap_servers
    first, second = TopicPartition(topics.frames, 0), TopicPartition(topics.frames, 1)
    consumer = make_consumer(bootstrap, "slot-test", [topics.frames], topics, client_id="slot-test")
    slot_id = "inspection-infer-slot-test"
    slot = TransactionSlot(slot_id, lambda: make_transactional_producer(bootstrap, topics, slot_id, 10_000),
                           step_timeout_s=15, stuck_after_s=60)
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
        group = consumer.group_metadata()
        stale = ConsumerGroupMetadata(group.group_id, group.generation_id + 1, group.member_id, group.group_instance_id)
        with pytest.raises(TransactionFailed, match="IllegalGeneration"):
            slot.commit([], {first: OffsetAndMetadata(5, "", -1)}, stale)
        slot.commit([], {second: OffsetAndMetadata(3, "", -1)}, group)
        assert consumer.committed(second, timeout_ms=10_000) == 3
        assert consumer.committed(first, timeout_ms=10_000) != 5  # the refused batch's offset stays uncommitted
    finally:
        slot.close()
        consumer.close()
