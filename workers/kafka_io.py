"""Thin helpers over kafka-python: topic setup, configured clients, Record conversion. No ML here.

Every client is sized for `TopicsConfig.max_message_bytes` so a full-size camera frame passes from
producer to broker to consumer without any of them refusing it. Every client authenticates as the
process' role when the environment names credentials (workers/security.py: a credentials file or
variables, never argv); options passed explicitly win over them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from schemas.config import TopicsConfig
from schemas.messages import Record
from workers.security import kafka_client_options, load_credentials

log = logging.getLogger(__name__)

# kafka-python refuses any single response larger than this; it must hold one full fetch.
_DEFAULT_RECEIVE_MAX_BYTES = 100_000_000
_DEFAULT_FETCH_MAX_BYTES = 52_428_800

# Recovery after a broker restart is bounded by these, set deliberately (kafka-python's defaults let a
# client back off for up to 30 s between reconnects, which was most of a measured 56 s outage):
RECOVERY_OPTIONS: dict[str, Any] = dict(
    reconnect_backoff_ms=50,
    reconnect_backoff_max_ms=1000,  # a restarted broker is retried at least once a second
    retry_backoff_ms=100,
    request_timeout_ms=10_000,  # a request to a dead connection fails in 10 s, not 30 s
    metadata_max_age_ms=30_000,
)
# Group membership: a dead member is noticed in 10 s; a live one keeps heartbeating from kafka-python's
# own thread however long a batch takes; work between two polls may take a minute (the rebalance
# timeout too, so a rebalance never waits hours for a member that will not come back).
GROUP_OPTIONS: dict[str, Any] = dict(session_timeout_ms=10_000, heartbeat_interval_ms=2_000,
                                     max_poll_interval_ms=60_000)
READ_COMMITTED = "read_committed"
LINGER_MS = 5  # producers wait this long to batch records


def transaction_step_timeout_ms(transaction_timeout_ms: int) -> int:
    """How long one transaction step may take: the broker's own abort of it, plus 5 s to hear of that."""
    return transaction_timeout_ms + 5_000


def process_security() -> dict[str, Any]:
    """kafka-python SASL/TLS options of this process' credentials; {} when none are configured."""
    return kafka_client_options(load_credentials())


def topic_specs(topics: TopicsConfig) -> dict[str, dict[str, Any]]:
    """Partition count and configs of every pipeline topic (replication 1: one local broker)."""
    partitions = {topics.frames: topics.frame_partitions, topics.results: topics.result_partitions}
    configs = {"max.message.bytes": str(topics.max_message_bytes)}
    return {
        name: {"num_partitions": partitions.get(name, 1), "replication_factor": 1, "configs": configs}
        for name in topics.all_names()
    }


def ensure_topics(bootstrap: str, topics: TopicsConfig, timeout_s: float = 30.0, **client_options: Any) -> None:
    """Create the missing pipeline topics and wait until every partition has a leader. Idempotent."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="inspection-admin",
                             **{**process_security(), **client_options})
    try:
        specs = topic_specs(topics)
        existing = set(admin.list_topics())
        for name, spec in specs.items():
            if name in existing:
                continue
            try:
                admin.create_topics({name: spec}, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and our create: fine
        admin.wait_for_topics(list(specs), timeout_ms=int(timeout_s * 1000))
        _warn_on_partition_mismatch(admin, specs)
    finally:
        admin.close()


def _warn_on_partition_mismatch(admin: KafkaAdminClient, specs: dict[str, dict[str, Any]]) -> None:
    """Topics made by an earlier configuration keep their partition count; say so instead of hiding it."""
    for topic in admin.describe_topics(list(specs)):
        wanted, found = specs[topic["name"]]["num_partitions"], len(topic["partitions"])
        if found != wanted:
            log.warning("topic %s has %d partitions, configuration asks for %d (kept as is)",
                        topic["name"], found, wanted)


def make_producer(bootstrap: str, topics: TopicsConfig, client_id: str, **overrides: Any) -> KafkaProducer:
    """A bytes-in producer that waits for the broker to persist each record (acks=all).

    Idempotence (kafka-python's default, supported by the 4.x broker) keeps retries from writing
    duplicates; it requires acks=all, retries > 0 and at most 5 requests in flight.
    """
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        retries=2**31 - 1,  # bounded by delivery_timeout_ms, not by a count that a broker restart exhausts
        delivery_timeout_ms=120_000,
        max_in_flight_requests_per_connection=5,
        max_request_size=topics.max_message_bytes,
        linger_ms=LINGER_MS,
        **RECOVERY_OPTIONS,
        **process_security(),
    )
    config.update(overrides)
    return KafkaProducer(**config)


def make_transactional_producer(
    bootstrap: str, topics: TopicsConfig, transactional_id: str, transaction_timeout_ms: int, **overrides: Any
) -> KafkaProducer:
    """An idempotent producer with a stable `transactional_id`, transactions initialised.

    Starting a producer with the id of a dead one aborts that one's open transaction at once (and
    fences it, should it come back); otherwise the broker aborts it after `transaction_timeout_ms`,
    which is how long a killed worker's unfinished batch can hold back read_committed readers.
    """
    # send() and init wait at most 10 s for a broker (then fail, and the batch is redone), not 60 s.
    # A record undelivered when its transaction step gives up (transaction_timeout_ms + 5 s) is dropped
    # with it: kafka-python's close() raises from its flush before it stops the sender, so a replaced
    # producer went on retrying its batches for the default 120 s, and while it did, the new producer of
    # the same transactional id committed a batch only every 30 s or so (measured after a broker restart).
    # (kafka-python refuses a delivery timeout below linger_ms + request_timeout_ms.)
    delivery_timeout_ms = max(transaction_step_timeout_ms(transaction_timeout_ms),
                              LINGER_MS + RECOVERY_OPTIONS["request_timeout_ms"])
    options = {"max_block_ms": 10_000, "delivery_timeout_ms": delivery_timeout_ms, **overrides}
    producer = make_producer(bootstrap, topics, client_id=transactional_id, transactional_id=transactional_id,
                             transaction_timeout_ms=transaction_timeout_ms, **options)
    try:
        producer.init_transactions()
    except BaseException:
        producer.close(timeout=0)  # a failed init must not leave its sender thread and sockets behind
        raise
    return producer


def make_consumer(
    bootstrap: str,
    group_id: str | None,
    topic_names: Sequence[str],
    topics: TopicsConfig,
    client_id: str,
    **overrides: Any,
) -> KafkaConsumer:
    """A bytes-out consumer subscribed to `topic_names`; the caller commits offsets itself."""
    fetch_max = max(_DEFAULT_FETCH_MAX_BYTES, topics.max_message_bytes)
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=topics.max_message_bytes,
        fetch_max_bytes=fetch_max,
        receive_message_max_bytes=max(_DEFAULT_RECEIVE_MAX_BYTES, fetch_max + 1024 * 1024),
        # Topics are created explicitly with their partition counts (ensure_topics), never implicitly.
        allow_auto_create_topics=False,
        # Results are written in transactions: never show a reader what an aborted batch wrote.
        isolation_level=READ_COMMITTED,
        **RECOVERY_OPTIONS,
        **(GROUP_OPTIONS if group_id else {}),
        **process_security(),
    )
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    if topic_names:
        subscribe(consumer, topic_names)
    return consumer


def subscribe(consumer: KafkaConsumer, topic_names: Sequence[str], listener=None, timeout_s: float = 60.0) -> None:
    """Subscribe once the consumer's metadata knows every topic's partitions. A member that joins its
    group before that gets an empty assignment ("No partition metadata"), and kafka-python was seen
    not to rejoin for minutes after the metadata arrived."""
    deadline = time.monotonic() + timeout_s
    for topic in topic_names:
        _wait_for_partitions(consumer, topic, deadline)
    consumer.subscribe(list(topic_names), listener=listener)


def rewind_to_committed(consumer: KafkaConsumer, partitions, timeout_ms: int = 30_000) -> dict[TopicPartition, int | None]:
    """Seek each partition to its committed offset (its beginning without one); returns what was
    committed. A committed offset that cannot be read raises (a worker then exits for its supervisor)."""
    committed = {}
    for partition in partitions:
        committed[partition] = consumer.committed(partition, timeout_ms=timeout_ms)
        if committed[partition] is None:
            consumer.seek_to_beginning(partition)
        else:
            consumer.seek(partition, committed[partition])
    return committed


def send_record(
    producer: KafkaProducer, topic: str, record: Record, partition: int | None = None
) -> FutureRecordMetadata:
    """Send one Record; returns kafka-python's future (call .get(timeout) to wait for the ack)."""
    headers = [(str(name), bytes(value)) for name, value in (record.headers or [])]
    return producer.send(topic, key=record.key, value=record.value, headers=headers, partition=partition)


def record_of(consumer_record: ConsumerRecord) -> Record:
    """Our client-free Record of a kafka-python ConsumerRecord (headers may be None)."""
    headers = [(name, value) for name, value in (consumer_record.headers or [])]
    return Record(consumer_record.key, consumer_record.value, headers)


def read_topic(
    bootstrap: str,
    topic: str,
    topics_cfg: TopicsConfig,
    timeout_s: float,
    until: Callable[[list[ConsumerRecord]], bool] | None = None,
    **client_options: Any,
) -> list[ConsumerRecord]:
    """Everything on `topic` from the beginning, without a consumer group (commits nothing).

    Stops when `until(records)` is True or after `timeout_s`. For tests, the demo and inspection.
    """
    deadline = time.monotonic() + timeout_s
    consumer = make_consumer(bootstrap, None, [], topics_cfg, client_id="inspection-reader", **client_options)
    try:
        partitions = _wait_for_partitions(consumer, topic, deadline)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        while time.monotonic() < deadline and not (until is not None and until(records)):
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            for batch in consumer.poll(timeout_ms=min(200, remaining_ms)).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def _wait_for_partitions(consumer: KafkaConsumer, topic: str, deadline: float) -> list[TopicPartition]:
    """The topic's partitions once the consumer's metadata knows them."""
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topic {topic!r} not found on {consumer.config['bootstrap_servers']} "
                               "(or this principal may not describe it)")
        time.sleep(0.1)
