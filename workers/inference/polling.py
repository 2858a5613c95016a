"""The poll thread's side of the frames topic: the consumer, its batches (polled, then decoding on a thread
pool until inspected), the group's rebalances, rewinds to the committed offsets and the lag. Only the poll
thread touches the consumer."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from schemas.config import InferenceConfig, TopicsConfig
from workers.kafka_io import make_consumer, rewind_to_committed, subscribe
from workers.liveness import PollWatchdog
from workers.metrics import InferenceMetrics

log = logging.getLogger(__name__)
_LAG_REFRESH_S = 1.0
_COMMITTED_TIMEOUT_MS = 30_000


@dataclass
class PolledBatch:
    """Records polled together, on their way through decode -> inspect -> delivery."""

    records: list
    rebalances: int  # the rebalance count when its poll began: delivered only if still the same
    decoding: list[Future] = field(default_factory=list)  # one per record: DecodedFrame | DeadLetter
    # the consumer's group membership when it was polled (exactly-once): its offsets are committed under
    # it, and only while it is still the consumer's own
    group: ConsumerGroupMetadata | None = None


def same_membership(polled: ConsumerGroupMetadata | None, now: ConsumerGroupMetadata | None) -> bool:
    """A batch may be committed only under the generation it was polled in. kafka-python's heartbeat
    thread resets the generation to (-1, "") on an eviction without calling the rebalance listener, and
    the broker does not check the generation of a transactional commit made with -1."""
    if polled is None or now is None:
        return polled is now
    identity = (now.group_id, now.generation_id, now.member_id, now.group_instance_id)
    return now.generation_id >= 0 and bool(now.member_id) and \
        identity == (polled.group_id, polled.generation_id, polled.member_id, polled.group_instance_id)


class Rebalances(ConsumerRebalanceListener):
    """Counts rebalances: a batch gathered across one is not delivered (part of it may be another
    worker's now); its partitions that stay ours are read again from their committed offsets."""

    def __init__(self) -> None:
        self.count = 0

    def on_partitions_revoked(self, revoked) -> None:
        self.count += 1
        log.info("partitions revoked: %s", _partition_list(revoked))

    def on_partitions_assigned(self, assigned) -> None:
        self.count += 1
        log.info("partitions assigned: %s", _partition_list(assigned))


class FramePoller:
    """Polls batches of frames and starts decoding them (`decode` runs on the decode threads); holds the
    batches polled and not yet inspected, oldest first (at most two)."""

    def __init__(self, bootstrap: str, topics: TopicsConfig, config: InferenceConfig, metrics: InferenceMetrics,
                 watchdog: PollWatchdog, worker_id: str, decode: Callable, transactional: bool, **client_options):
        self.config = config
        self.metrics = metrics
        self.watchdog = watchdog
        self.transactional = transactional
        self.rebalances = Rebalances()
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, config.group_id, [], topics, client_id=worker_id, max_poll_records=config.max_batch_size,
            # Partition p to worker p mod W: cameras dealt to partitions in turn spread evenly (simulator).
            partition_assignment_strategy=[RoundRobinPartitionAssignor], **client_options,
        )
        subscribe(self.consumer, [topics.frames], listener=self.rebalances)
        self._decode = decode
        self._decoder = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
        self.ready: deque[PolledBatch] = deque()
        self._next_lag_check = 0.0

    def poll_batch(self, wait: bool = True) -> list:
        """Up to max_batch_size records; once the first arrives, wait at most max_wait_ms for more.
        `wait=False`: only what the consumer already holds (a batch is ready to compute meanwhile)."""
        if not wait:
            polled = self.consumer.poll(timeout_ms=0, max_records=self.config.max_batch_size)
            self.watchdog.beat()
            return [r for batch in polled.values() for r in batch]
        records: list = []
        deadline = None
        while len(records) < self.config.max_batch_size:
            timeout_ms = 200 if deadline is None else int((deadline - time.monotonic()) * 1000)
            if deadline is not None and timeout_ms <= 0:
                break
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.config.max_batch_size - len(records))
            self.watchdog.beat()
            fresh = [r for batch in polled.values() for r in batch]
            if not fresh and deadline is None:
                break  # idle: go back to the loop to check stop and the store
            if fresh and deadline is None:
                deadline = time.monotonic() + self.config.max_wait_ms / 1000
            records.extend(fresh)
        return records

    def prefetch(self, records: list, rebalances: int) -> PolledBatch:
        self.metrics.frames_in.inc(len(records))
        self.metrics.batch_size.observe(len(records))
        return PolledBatch(records, rebalances, [self._decoder.submit(self._decode, r) for r in records],
                           self.membership())

    def membership(self) -> ConsumerGroupMetadata | None:
        return self.consumer.group_metadata() if self.transactional else None

    def gathered_across_a_rebalance(self, batch: PolledBatch) -> bool:
        """Polled before a rebalance, or under a group membership lost since."""
        return batch.rebalances != self.rebalances.count or not same_membership(batch.group, self.membership())

    def commit(self, records: list) -> None:
        try:
            # The batch's own offsets: the consumer's position is already past the batches behind it.
            self.consumer.commit(offsets=next_offsets(records))
        except CommitFailedError:
            # The group rebalanced under us: another worker re-reads these frames (a duplicate, not a loss).
            log.warning("offset commit failed after a rebalance; the batch will be redelivered")

    def read_again(self, *batches: PolledBatch) -> None:
        """Drop `batches` and every batch polled after them (nothing is in delivery then); every assigned
        partition goes back to its committed offset."""
        dropped = [*batches, *self.ready]
        self.ready.clear()
        for later in dropped:
            for future in later.decoding:
                future.cancel()
        self._rewind()

    def _rewind(self) -> None:
        """Every assigned partition is read again from its committed offset (from its beginning without
        one: nothing of it was delivered then).

        Every partition, not only those of the dropped batches: kafka-python keeps a partition's position
        across a rebalance that leaves it assigned, and a position can then be past records no batch holds
        any more; the commit of a later batch would skip them (a fault soak lost 8 frames so). From the
        committed offsets, not from the batches' own first offsets: a commit whose wait failed or timed
        out may still have completed on the broker (a new producer's init completes it), and reading the
        batch again would then give each frame a second result. A committed offset that cannot be read
        stops the worker: its supervisor's restart resumes from the committed offsets too."""
        committed = rewind_to_committed(self.consumer, self.consumer.assignment(), _COMMITTED_TIMEOUT_MS)
        log.info("read again from the committed offsets: %s", {p.partition: o for p, o in committed.items()})

    def update_lag(self) -> None:
        """Lag of every assigned partition from the broker's end offsets (a highwater is only known for
        partitions fetched lately, which left idle or stalled partitions stale)."""
        now = time.monotonic()
        if now < self._next_lag_check:
            return
        self._next_lag_check = now + _LAG_REFRESH_S
        assigned = list(self.consumer.assignment())
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=2000) if assigned else {}
            lag = {tp.partition: max(0, ends[tp] - self.consumer.position(tp, timeout_ms=2000)) for tp in assigned}
        except KafkaError as exc:
            log.debug("lag not refreshed: %s", exc)
            return
        self.metrics.set_lag(lag)

    def stop_decoding(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.consumer.close()


def next_offsets(records: list) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offset to commit per partition: one past the last of its records."""
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, r.offset), r.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


def _partition_list(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"
