"""Inference worker: frames topic -> micro-batches -> pipeline.Inspector -> results topic.

Delivery is exactly-once by default: a batch's results, its dead letters and its frames' offsets are
one Kafka transaction (a transactional producer per worker slot, offsets sent with the consumer's group
metadata so a stale member is fenced, KIP-447). A worker killed mid-batch leaves an open transaction
that the broker aborts after `transaction_timeout_ms` (at once if a worker starts in the same slot);
the frames are then read again from the committed offsets, so readers with isolation `read_committed`
see exactly one result per frame. `delivery="at_least_once"` instead produces, flushes and then commits
(cheaper; a crash between the two repeats a result, which consumers recognise by its key, the frame id).
Workers in one consumer group share the frames topic's partitions.

The loop is pipelined, one batch deep at each stage: while the model computes batch N, batch N + 1 is
decoded in a thread pool and batch N - 1's results are delivered on a delivery thread (its transaction,
or its send + flush). Offsets are committed only with (exactly-once) or after (at-least-once) the
batch's results, so the guarantee is the sequential loop's. Only the poll thread touches the consumer;
a batch is delivered only once the one before it is, and when a delivery fails or the group rebalances
every batch not yet delivered is dropped and read again from the earliest of their offsets.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from pipeline.features.imaging import ImageDecodeError, anomaly_map_to_png, decode_image, find_boxes
from pipeline.core.inspector import BatchTimings, Inspection, Inspector
from pipeline.core.store import KnowledgeStore
from schemas.config import InferenceConfig, TopicsConfig
from schemas.messages import (
    DeadLetter,
    DeadLetterReason,
    Decision,
    Frame,
    InspectionResult,
    Record,
    SchemaError,
    StageLatency,
    frame_id_of,
    utc_now,
)
from workers.kafka_io import (
    make_consumer,
    make_producer,
    make_transactional_producer,
    record_of,
    rewind_to_committed,
    send_record,
    subscribe,
)
from workers.liveness import PollWatchdog
from workers.metrics import InferenceMetrics
from workers.security import TRANSACTIONAL_ID_PREFIXES
from workers.transactions import TransactionFailed, TransactionSlot

log = logging.getLogger(__name__)
TRANSACTIONAL_ID_PREFIX = TRANSACTIONAL_ID_PREFIXES["inference"]  # what the ACLs admit (workers/security.py)
_LAG_REFRESH_S = 1.0
_COMMITTED_TIMEOUT_MS = 30_000
OTHER_CATEGORY = "other"  # the label of ground truth naming no task of the store


@dataclass
class _Decoded:
    frame: Frame
    image: object  # np.ndarray H x W x 3
    decode_ms: float


@dataclass
class _Batch:
    """Records polled together, on their way through decode -> inspect -> delivery."""

    records: list
    rebalances: int  # the rebalance count when its poll began: delivered only if still the same
    decoding: list[Future] = field(default_factory=list)  # one per record: _Decoded | DeadLetter
    # the consumer's group membership when it was polled (exactly-once): its offsets are committed under
    # it, and only while it is still the consumer's own
    group: ConsumerGroupMetadata | None = None


def _same_membership(polled: ConsumerGroupMetadata | None, now: ConsumerGroupMetadata | None) -> bool:
    """A batch may be committed only under the generation it was polled in. kafka-python's heartbeat
    thread resets the generation to (-1, "") on an eviction without calling the rebalance listener, and
    the broker does not check the generation of a transactional commit made with -1."""
    if polled is None or now is None:
        return polled is now
    identity = (now.group_id, now.generation_id, now.member_id, now.group_instance_id)
    return now.generation_id >= 0 and bool(now.member_id) and \
        identity == (polled.group_id, polled.generation_id, polled.member_id, polled.group_instance_id)


@dataclass
class _Delivery:
    batch: _Batch
    done: Future  # True: delivered (and, exactly-once, committed); False: to be read again


class _Rebalances(ConsumerRebalanceListener):
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


class InferenceWorker:
    def __init__(
        self,
        bootstrap: str,
        topics: TopicsConfig,
        config: InferenceConfig,
        inspector: Inspector,
        store: KnowledgeStore,
        metrics: InferenceMetrics,
        worker_id: str,
        **client_options,
    ):
        if config.max_frame_bytes > topics.whole_dead_letter_value_bytes:
            raise ValueError(f"max_frame_bytes={config.max_frame_bytes} is over {topics.whole_dead_letter_value_bytes}, "
                             f"the largest frame whose dead letter fits a record of {topics.max_message_bytes} bytes")
        self.bootstrap = bootstrap
        self.topics = topics
        self.config = config
        self.inspector = inspector
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.client_options = client_options
        self.rebalances = _Rebalances()
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, config.group_id, [], topics, client_id=worker_id, max_poll_records=config.max_batch_size,
            # Partition p to worker p mod W: cameras dealt to partitions in turn spread evenly (simulator).
            partition_assignment_strategy=[RoundRobinPartitionAssignor], **client_options,
        )
        subscribe(self.consumer, [topics.frames], listener=self.rebalances)
        self._decoder = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._ready: deque[_Batch] = deque()  # polled and decoding, oldest first (at most two)
        self._in_flight: _Delivery | None = None
        self._fault_sleep_s = config.fault_sleep_after_first_commit_s
        # exactly-once: the slot's id is stable across restarts, so a new instance fences the old one and
        # aborts its transaction; at-least-once: a plain producer
        self.slot: TransactionSlot | None = None
        self.producer: KafkaProducer | None = None
        if self.transactional:
            self.slot = TransactionSlot(
                TRANSACTIONAL_ID_PREFIX + worker_id,
                lambda: make_transactional_producer(bootstrap, topics, TRANSACTIONAL_ID_PREFIX + worker_id,
                                                    config.transaction_timeout_ms, **client_options),
                step_timeout_s=config.transaction_timeout_ms / 1000 + 5, stuck_after_s=config.stuck_after_s,
                after_commit=self._fault_after_commit)
        else:
            self.producer = make_producer(bootstrap, topics, client_id=worker_id, **client_options)
        self.watchdog = PollWatchdog(metrics, config.stuck_after_s)
        self._next_store_check = 0.0
        self._next_lag_check = 0.0
        # No frame is taken before the store was read once: a worker started while Redis is down would
        # otherwise answer every frame "unknown" (no task loaded), silently.
        self._store_read = False
        self._store_failing = False

    @property
    def transactional(self) -> bool:
        return self.config.delivery == "exactly_once"

    # ------------------------------------------------------------------------------------- loop
    def run(self, stop: threading.Event) -> None:
        log.info("worker %s consuming %s (%s)", self.worker_id, self.topics.frames, self.config.delivery)
        self.watchdog.start()
        try:
            while not stop.is_set():
                self._follow_store()
                if not self._store_read:
                    self._wait_for_store()
                    continue
                self._step()
                self._update_lag()
            self._settle()  # the batch in flight is delivered; batches not yet inspected are read again later
        finally:
            self.watchdog.stop()
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._delivery.shutdown(wait=True)
            self.consumer.close()
            if self.slot is not None:
                self.slot.close()
            else:
                self.producer.close()

    def _step(self) -> None:
        """Poll the next batch (waiting only when none is ready) and start decoding it; then inspect the
        oldest ready batch and hand its results to the delivery thread."""
        rebalances = self.rebalances.count
        records = self._poll_batch(wait=not self._ready)
        if records:
            self._ready.append(self._prefetch(records, rebalances))
        if not self._ready:
            self._settle(wait=False)
            return
        batch = self._ready.popleft()
        if batch.rebalances != self.rebalances.count or not _same_membership(batch.group, self._membership()):
            # Gathered before a rebalance or under a membership lost since: read what is still ours again
            # from the committed offsets, under the new generation (the rest is another worker's now).
            log.info("batch of %d gathered across a rebalance or a lost membership; reading it again", len(batch.records))
            # the delivery in flight ends first (a failed one reads everything again itself): a commit landing
            # after the rewind below would leave the positions behind it
            if self._settle(also_dropped=batch):
                self._read_again(batch)
            return
        outgoing = self._inspect_batch(batch)
        if not self._settle(also_dropped=batch):  # the batch before failed: this one must wait for it
            return
        self._in_flight = _Delivery(batch, self._delivery.submit(self._deliver, outgoing, batch.records, batch.group))

    def _follow_store(self) -> None:
        now = time.monotonic()
        if now < self._next_store_check:
            return
        self._next_store_check = now + self.config.store_poll_interval_s
        try:
            if self.store.version() != self.inspector.store_version:
                changed = self.inspector.sync(self.store)
                log.info("store version %d, reloaded %s", self.inspector.store_version, changed or "nothing")
            if self._store_failing:
                log.info("store readable again (version %d)", self.inspector.store_version)
            self._store_read, self._store_failing = True, False
        except Exception:  # a store hiccup must not stop inference with the tasks already loaded
            if not self._store_failing:  # once per outage, not twice a second
                log.exception("store sync failed; serving store version %d until it answers",
                              self.inspector.store_version)
            self._store_failing = True
        self.metrics.tasks_known.set(len(self.inspector.tasks))
        self.metrics.store_version.set(self.inspector.store_version)
        self.metrics.set_false_alarm_targets(
            {name: task.artifacts.calibration.false_alarm_rate for name, task in self.inspector.tasks.items()})

    def _wait_for_store(self) -> None:
        """Not polling while the store is unreadable at start: alive (the watchdog is told), not consuming."""
        self.watchdog.beat()
        time.sleep(self.config.store_poll_interval_s)

    def _poll_batch(self, wait: bool = True) -> list:
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

    # ---------------------------------------------------------------------------------- a batch
    def _prefetch(self, records: list, rebalances: int) -> _Batch:
        self.metrics.frames_in.inc(len(records))
        self.metrics.batch_size.observe(len(records))
        return _Batch(records, rebalances, [self._decoder.submit(self._decode, r) for r in records], self._membership())

    def _membership(self) -> ConsumerGroupMetadata | None:
        return self.consumer.group_metadata() if self.transactional else None

    def _inspect_batch(self, batch: _Batch) -> list[tuple[str, Record]]:
        """The batch's outgoing records: results and dead letters, in the order of its frames."""
        outgoing: list[tuple[str, Record]] = []
        decoded = []
        for future in batch.decoding:
            item = future.result()
            if isinstance(item, DeadLetter):
                outgoing.append((self.topics.dead_letter, item.to_record()))
            else:
                decoded.append(item)
        if decoded:
            outgoing += [(self.topics.results, r.to_record()) for r in self._inspect(decoded, batch.records, outgoing)]
        return outgoing

    def _deliver(self, outgoing: list[tuple[str, Record]], records: list, group) -> bool:
        """On the delivery thread: True once the batch is delivered, False when it must be read again."""
        if self.transactional:
            return self._deliver_in_transaction(outgoing, records, group)
        try:
            sent = [send_record(self.producer, topic, record) for topic, record in outgoing]
            # Results are on the broker before their frames' offsets are committed. Bounded: an unbounded
            # flush that never returns would hold the worker (its poll loop waits on this delivery).
            self.producer.flush(timeout=self.config.transaction_timeout_ms / 1000 + 5)
            for future in sent:  # flush only logs a send that failed for good: ask each one
                future.get(timeout=0)
            return True
        except KafkaError as exc:  # read again: at-least-once may repeat a result, never lose one
            log.warning("delivery of a batch of %d failed (%s: %s); its frames come again", len(records),
                        type(exc).__name__, exc)
            return False

    def _settle(self, wait: bool = True, also_dropped: _Batch | None = None) -> bool:
        """Finish the delivery in flight (at-least-once: commit its offsets, on the poll thread). False
        when it failed: it, `also_dropped` and every batch polled after them are read again."""
        if self._in_flight is None or not (wait or self._in_flight.done.done()):
            return True
        delivery, self._in_flight = self._in_flight, None
        while True:
            try:
                delivered = delivery.done.result(timeout=1.0)  # ProducerFencedError propagates: stop
                break
            except FutureTimeout:
                self.watchdog.beat()  # alive: the delivery step is bounded by its own timeout
        if not delivered:
            self._read_again(delivery.batch, *([also_dropped] if also_dropped else []))
            return False
        if not self.transactional:
            self._commit(delivery.batch.records)
        return True

    def _commit(self, records: list) -> None:
        try:
            # The batch's own offsets: the consumer's position is already past the batches behind it.
            self.consumer.commit(offsets=_next_offsets(records))
        except CommitFailedError:
            # The group rebalanced under us: another worker re-reads these frames (a duplicate, not a loss).
            log.warning("offset commit failed after a rebalance; the batch will be redelivered")

    def _read_again(self, *batches: _Batch) -> None:
        """Drop `batches` and every batch polled after them (nothing is in delivery then); every assigned
        partition goes back to its committed offset."""
        dropped = [*batches, *self._ready]
        self._ready.clear()
        for later in dropped:
            for future in later.decoding:
                future.cancel()
        self._rewind()

    def _decode(self, consumer_record) -> _Decoded | DeadLetter:
        started = time.perf_counter()
        record = record_of(consumer_record)
        try:
            if len(record.value or b"") > self.config.max_frame_bytes:
                raise ImageDecodeError(
                    DeadLetterReason.OVERSIZE,
                    f"frame of {len(record.value)} bytes exceeds max_frame_bytes={self.config.max_frame_bytes}",
                )
            frame = Frame.from_record(record)
            image = decode_image(frame.image, self.config.max_frame_pixels)
        except SchemaError as exc:
            return self._dead_letter(consumer_record, record, DeadLetterReason.WRONG_SCHEMA, str(exc))
        except ImageDecodeError as exc:
            return self._dead_letter(consumer_record, record, DeadLetterReason(exc.reason), str(exc))
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        return _Decoded(frame, image, 1000 * (time.perf_counter() - started))

    def _inspect(self, decoded: list[_Decoded], records: list, outgoing: list) -> list[InspectionResult]:
        try:
            inspections, timings = self.inspector.inspect([d.image for d in decoded])
        except Exception as exc:  # one poisonous frame must not sink its batch-mates: retry one by one
            if len(decoded) == 1:
                outgoing.append((self.topics.dead_letter, self._dead_letter_frame(decoded[0], records, exc).to_record()))
                return []
            log.exception("batch of %d failed; retrying frames one by one", len(decoded))
            return [r for d in decoded for r in self._inspect([d], records, outgoing)]
        for stage in ("features", "task_id", "expert"):
            self.metrics.stage_seconds.labels(stage).observe(getattr(timings, f"{stage}_ms") / 1000)
        results = []
        for item, inspection in zip(decoded, inspections):
            try:
                results.append(self._result(item, inspection, timings))
            except Exception as exc:  # a result that cannot be encoded is one frame's error, not the batch's
                outgoing.append((self.topics.dead_letter, self._dead_letter_frame(item, records, exc).to_record()))
        return results

    def _result(self, item: _Decoded, inspection: Inspection, timings: BatchTimings) -> InspectionResult:
        started = time.perf_counter()
        frame_hw = item.image.shape[:2]
        png, boxes = None, []
        if inspection.score_map is not None:
            png = anomaly_map_to_png(inspection.score_map, frame_hw, inspection.map_max_score)
            boxes = find_boxes(inspection.score_map, inspection.pixel_threshold, frame_hw)
        encode_ms = 1000 * (time.perf_counter() - started)
        self.metrics.stage_seconds.labels("encode").observe(encode_ms / 1000)
        decision = _decision(inspection)
        end_to_end = (utc_now() - item.frame.captured_at).total_seconds()
        self.metrics.end_to_end_seconds.observe(max(0.0, end_to_end))
        self._count(item.frame, inspection, decision)
        return InspectionResult(
            frame_id=item.frame.frame_id,
            camera_id=item.frame.camera_id,
            captured_at=item.frame.captured_at,
            worker_id=self.worker_id,
            category=inspection.match.category,
            task_confidence=inspection.match.margin,
            task_distance=inspection.match.distance if math.isfinite(inspection.match.distance) else None,
            expert=inspection.expert,
            score_raw=inspection.score_raw,
            score=inspection.score,
            threshold=inspection.threshold,
            decision=decision,
            anomaly_map_png=png,
            map_max_score=inspection.map_max_score,
            boxes=boxes,
            latency=StageLatency(
                decode_ms=item.decode_ms,
                features_ms=timings.features_ms,
                task_id_ms=timings.task_id_ms,
                expert_ms=timings.expert_ms,
                encode_ms=encode_ms,
                end_to_end_ms=1000 * end_to_end,
            ),
            store_version=self.inspector.store_version,
            task_version=inspection.task_version,
            ground_truth=item.frame.ground_truth,
        )

    def _count(self, frame: Frame, inspection: Inspection, decision: Decision) -> None:
        """Results by decision; the calibrated score (drift); labelled frames by truth x decision, so live
        recall and false-alarm rate can be plotted where evaluation frames carry ground truth."""
        category = inspection.match.category or "unknown"
        self.metrics.results_out.labels(category, decision.value).inc()
        if inspection.score is not None:
            self.metrics.calibrated_score.labels(category).observe(inspection.score)
        truth = frame.ground_truth
        if truth is not None:
            # a camera writes any string there: only the store's tasks become label values, so a camera
            # cannot add series to every worker and to Prometheus
            label = truth.category if truth.category in self.inspector.tasks else OTHER_CATEGORY
            self.metrics.labelled_frames.labels(
                label, "anomalous" if truth.is_anomalous else "normal", decision.value).inc()

    # ------------------------------------------------------------------------------ delivery
    def _deliver_in_transaction(self, outgoing: list[tuple[str, Record]], records: list, group) -> bool:
        """Results, dead letters and the batch's offsets become visible together, or not at all (the
        slot bounds every step; ProducerFencedError and ProducerReplacementFailed stop the worker)."""
        try:
            self.slot.commit(outgoing, _next_offsets(records), group)
        except TransactionFailed as exc:
            log.warning("transaction of a batch of %d failed (%s); aborted, its frames come again", len(records), exc)
            self.metrics.transactions.labels("aborted").inc()
            return False
        self.metrics.transactions.labels("committed").inc()
        return True

    def _fault_after_commit(self) -> None:
        if self._fault_sleep_s:  # fault injection (tests): a commit done on the broker whose wait overruns
            delay, self._fault_sleep_s = self._fault_sleep_s, 0.0
            time.sleep(delay)

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

    # ------------------------------------------------------------------------------ bookkeeping
    def _dead_letter(self, consumer_record, record: Record, reason: DeadLetterReason, detail: str) -> DeadLetter:
        log.warning("dead-letter %s:%d@%d %s: %s", consumer_record.topic, consumer_record.partition,
                    consumer_record.offset, reason.value, detail)
        self.metrics.errors.labels(reason.value).inc()
        # as whole as its topic takes: a dead letter that cannot be sent would abort every retry of the batch
        return DeadLetter.of(record, self.topics.max_message_bytes, worker_id=self.worker_id,
                             source_topic=consumer_record.topic, partition=consumer_record.partition,
                             offset=consumer_record.offset, reason=reason, detail=detail[:2000],
                             frame_id=frame_id_of(record))

    def _dead_letter_frame(self, item: _Decoded, records: list, exc: Exception) -> DeadLetter:
        log.exception("frame %s failed in the pipeline", item.frame.frame_id)
        source = next(r for r in records if frame_id_of(record_of(r)) == item.frame.frame_id)
        return self._dead_letter(source, record_of(source), DeadLetterReason.PROCESSING_ERROR,
                                 f"{type(exc).__name__}: {exc}")

    def _update_lag(self) -> None:
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


def _partition_list(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


def _next_offsets(records: list) -> dict[TopicPartition, OffsetAndMetadata]:
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, r.offset), r.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


def _decision(inspection: Inspection) -> Decision:
    if inspection.is_defective is None:
        return Decision.UNKNOWN
    return Decision.DEFECTIVE if inspection.is_defective else Decision.OK
