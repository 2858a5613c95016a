"""The transaction slot on the real broker: what a refused transaction held is never committed later, and
a producer that cannot be replaced stops the worker in time without leaking producers, and a replaced
producer is closed once its unsent records expire."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import TopicPartition
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from schemas.config import TopicsConfig
from schemas.messages import Record
from workers.kafka_io import make_consumer, make_transactional_producer, transaction_step_timeout_ms
from tools.stack import LocalStack
from workers.transactions import ProducerReplacementFailed, TransactionFailed, TransactionSlot

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


def _threads_of(client_id: str) -> int:
    """kafka-python's threads of one client (its sender and its I/O thread are named after its client id)."""
    return sum(1 for thread in threading.enumerate() if client_id in thread.name)


def test_replacing_a_producer_gives_up_in_time_and_leaks_none(stack: LocalStack) -> None:
    """The broker is gone: the failed transaction's producer is replaced, the replacement is retried for
    at most stuck_after_s, then ProducerReplacementFailed (the worker exits for its supervisor); every
    producer made on the way is closed."""
    topics, bootstrap = TopicsConfig(), stack.config.bootstrap_servers
    slot_id = "inspection-infer-replacement-test"
    slot = TransactionSlot(slot_id, lambda: make_transactional_producer(bootstrap, topics, slot_id, 10_000,
                                                                        max_block_ms=3000, request_timeout_ms=3000),
                           step_timeout_s=8, stuck_after_s=5)
    try:
        assert stack.kill("kafka")
        started = time.monotonic()
        with pytest.raises(ProducerReplacementFailed):
            slot.commit([(topics.results, Record(b"k", b"v", []))])
        # bounded: the failing step and the abort (8 s each at most), stuck_after_s of retries, then the
        # attempt in progress (a producer's start and init: about 10 s against a dead broker); 33 s measured
        assert time.monotonic() - started < 2 * 8 + 5 + 20
    finally:
        slot.close()
        stack.up()
    deadline = time.monotonic() + 15
    while _threads_of(slot_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _threads_of(slot_id) == 0


def test_a_replaced_producer_is_closed_once_its_unsent_records_expire(stack: LocalStack) -> None:
    """A step overran with records unsent (the broker away): the replaced producer's records expire within
    the step's bound and it is then closed, its I/O thread gone (kafka-python's close() flushes before it
    stops anything, and raises if its timeout ends first); the new producer commits."""
    topics, bootstrap = TopicsConfig(), stack.config.bootstrap_servers
    slot_id = "inspection-infer-expiry-test"
    step_s = transaction_step_timeout_ms(10_000) / 1000
    slot = TransactionSlot(slot_id, lambda: make_transactional_producer(bootstrap, topics, slot_id, 10_000),
                           step_timeout_s=step_s, stuck_after_s=120)
    try:
        slot.commit([(topics.results, Record(b"k", b"v", []))])
        one_producer = _threads_of(slot_id)
        assert stack.kill("kafka")
        back = threading.Timer(step_s + 3, stack.up)  # after the step has overrun: the producer is replaced
        back.start()
        with pytest.raises(TransactionFailed):
            slot.commit([(topics.results, Record(f"k{i}".encode(), b"v" * 1000, [])) for i in range(50)])
        back.join()
        deadline = time.monotonic() + step_s + 10
        while _threads_of(slot_id) > one_producer and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _threads_of(slot_id) == one_producer, [t.name for t in threading.enumerate()]
        slot.commit([(topics.results, Record(b"k-after", b"v", []))])
    finally:
        slot.close()
        stack.up()
