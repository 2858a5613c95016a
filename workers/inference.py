"""Inference worker: frames topic -> micro-batches -> pipeline.Inspector -> results topic.

Delivery is at-least-once: a batch's results (and dead letters) are produced and acknowledged by the
broker before the batch's offsets are committed, so a worker killed at any point loses no frame; a
redelivered frame yields a second result with the same key (its frame id), which consumers recognise.
Workers in one consumer group share the frames topic's partitions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError

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
from workers.kafka_io import make_consumer, make_producer, record_of, send_record
from workers.metrics import InferenceMetrics

log = logging.getLogger(__name__)


@dataclass
class _Decoded:
    frame: Frame
    image: object  # np.ndarray H x W x 3
    decode_ms: float


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
    ):
        self.topics = topics
        self.config = config
        self.inspector = inspector
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, config.group_id, [topics.frames], topics, client_id=worker_id, max_poll_records=config.max_batch_size
        )
        self.producer: KafkaProducer = make_producer(bootstrap, topics, client_id=worker_id)
        self._next_store_check = 0.0

    # ------------------------------------------------------------------------------------- loop
    def run(self, stop: threading.Event) -> None:
        log.info("worker %s consuming %s", self.worker_id, self.topics.frames)
        try:
            while not stop.is_set():
                self._follow_store()
                records = self._poll_batch()
                if records:
                    self._handle_batch(records)
        finally:
            self.consumer.close()
            self.producer.close()

    def _follow_store(self) -> None:
        now = time.monotonic()
        if now < self._next_store_check:
            return
        self._next_store_check = now + self.config.store_poll_interval_s
        try:
            if self.store.version() != self.inspector.store_version:
                changed = self.inspector.sync(self.store)
                log.info("store version %d, reloaded %s", self.inspector.store_version, changed or "nothing")
        except Exception:  # a store hiccup must not stop inference with the tasks already loaded
            log.exception("store sync failed; serving store version %d", self.inspector.store_version)
        self.metrics.tasks_known.set(len(self.inspector.tasks))
        self.metrics.store_version.set(self.inspector.store_version)

    def _poll_batch(self) -> list:
        """Up to max_batch_size records; once the first arrives, wait at most max_wait_ms for more."""
        records: list = []
        deadline = None
        while len(records) < self.config.max_batch_size:
            timeout_ms = 200 if deadline is None else int((deadline - time.monotonic()) * 1000)
            if deadline is not None and timeout_ms <= 0:
                break
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.config.max_batch_size - len(records))
            fresh = [r for batch in polled.values() for r in batch]
            if not fresh and deadline is None:
                break  # idle: go back to the loop to check stop and the store
            if fresh and deadline is None:
                deadline = time.monotonic() + self.config.max_wait_ms / 1000
            records.extend(fresh)
        return records

    # ---------------------------------------------------------------------------------- a batch
    def _handle_batch(self, records: list) -> None:
        self.metrics.frames_in.inc(len(records))
        self.metrics.batch_size.observe(len(records))
        decoded = []
        for consumer_record in records:
            item = self._decode(consumer_record)
            if item is not None:
                decoded.append(item)
        if decoded:
            for result in self._inspect(decoded, records):
                send_record(self.producer, self.topics.results, result.to_record())
        self.producer.flush()  # results are on the broker before their frames' offsets are committed
        self._commit()
        self._update_lag()

    def _decode(self, consumer_record) -> _Decoded | None:
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
            self._dead_letter(consumer_record, record, DeadLetterReason.WRONG_SCHEMA, str(exc))
            return None
        except ImageDecodeError as exc:
            self._dead_letter(consumer_record, record, DeadLetterReason(exc.reason), str(exc))
            return None
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        return _Decoded(frame, image, 1000 * (time.perf_counter() - started))

    def _inspect(self, decoded: list[_Decoded], records: list) -> list[InspectionResult]:
        try:
            inspections, timings = self.inspector.inspect([d.image for d in decoded])
        except Exception as exc:  # one poisonous frame must not sink its batch-mates: retry one by one
            if len(decoded) == 1:
                self._dead_letter_frame(decoded[0], records, exc)
                return []
            log.exception("batch of %d failed; retrying frames one by one", len(decoded))
            return [r for d in decoded for r in self._inspect([d], records)]
        for stage in ("features", "task_id", "expert"):
            self.metrics.stage_seconds.labels(stage).observe(getattr(timings, f"{stage}_ms") / 1000)
        return [self._result(d, inspection, timings) for d, inspection in zip(decoded, inspections)]

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
        self.metrics.results_out.labels(inspection.match.category or "unknown", decision.value).inc()
        return InspectionResult(
            frame_id=item.frame.frame_id,
            camera_id=item.frame.camera_id,
            captured_at=item.frame.captured_at,
            worker_id=self.worker_id,
            category=inspection.match.category,
            task_confidence=inspection.match.margin,
            task_distance=inspection.match.distance,
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

    # ------------------------------------------------------------------------------ bookkeeping
    def _dead_letter(self, consumer_record, record: Record, reason: DeadLetterReason, detail: str) -> None:
        log.warning("dead-letter %s:%d@%d %s: %s", consumer_record.topic, consumer_record.partition,
                    consumer_record.offset, reason.value, detail)
        self.metrics.errors.labels(reason.value).inc()
        letter = DeadLetter(
            worker_id=self.worker_id,
            source_topic=consumer_record.topic,
            partition=consumer_record.partition,
            offset=consumer_record.offset,
            reason=reason,
            detail=detail[:2000],
            frame_id=frame_id_of(record),
            key=record.key,
            value=record.value,
            headers=record.headers,
        )
        send_record(self.producer, self.topics.dead_letter, letter.to_record())

    def _dead_letter_frame(self, item: _Decoded, records: list, exc: Exception) -> None:
        log.exception("frame %s failed in the pipeline", item.frame.frame_id)
        source = next(r for r in records if frame_id_of(record_of(r)) == item.frame.frame_id)
        self._dead_letter(source, record_of(source), DeadLetterReason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}")

    def _commit(self) -> None:
        try:
            self.consumer.commit()
        except CommitFailedError:
            # The group rebalanced under us: another worker re-reads these frames (a duplicate, not a loss).
            log.warning("offset commit failed after a rebalance; the batch will be redelivered")

    def _update_lag(self) -> None:
        for partition in self.consumer.assignment():
            highwater = self.consumer.highwater(partition)
            if highwater is not None:
                self.metrics.consumer_lag.labels(str(partition.partition)).set(
                    max(0, highwater - self.consumer.position(partition))
                )


def _decision(inspection: Inspection) -> Decision:
    if inspection.is_defective is None:
        return Decision.UNKNOWN
    return Decision.DEFECTIVE if inspection.is_defective else Decision.OK
