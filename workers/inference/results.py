"""From a polled record to what goes out: the decoded frame, a batch of frames through the Inspector, and
each frame's InspectionResult (decision, boxes, anomaly map PNG) or dead letter. The result metrics are
counted here, as each result is made."""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass

from kafka.consumer.fetcher import ConsumerRecord

from pipeline.core.inspector import BatchTimings, Inspection, Inspector
from pipeline.features.imaging import ImageDecodeError, anomaly_map_to_png, decode_image, find_boxes
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
from workers.kafka_io import record_of
from workers.metrics import InferenceMetrics

log = logging.getLogger(__name__)
OTHER_CATEGORY = "other"  # the label of ground truth naming no task of the store


@dataclass
class DecodedFrame:
    frame: Frame
    image: object  # np.ndarray H x W x 3
    decode_ms: float
    source: ConsumerRecord  # the record it came in: a frame failing later is dead-lettered from it


class ResultBuilder:
    """Decodes records (on the decode threads) and turns a batch of decoded frames into outgoing records."""

    def __init__(self, topics: TopicsConfig, config: InferenceConfig, inspector: Inspector,
                 metrics: InferenceMetrics, worker_id: str):
        self.topics = topics
        self.config = config
        self.inspector = inspector
        self.metrics = metrics
        self.worker_id = worker_id

    def decode(self, consumer_record: ConsumerRecord) -> DecodedFrame | DeadLetter:
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
        return DecodedFrame(frame, image, 1000 * (time.perf_counter() - started), consumer_record)

    def outgoing(self, decoding: list[Future]) -> list[tuple[str, Record]]:
        """A batch's outgoing records: results and dead letters, in the order of its frames. `decoding`:
        one future per record, a DecodedFrame or a DeadLetter."""
        outgoing: list[tuple[str, Record]] = []
        decoded = []
        for future in decoding:
            item = future.result()
            if isinstance(item, DeadLetter):
                outgoing.append((self.topics.dead_letter, item.to_record()))
            else:
                decoded.append(item)
        if decoded:
            outgoing += [(self.topics.results, r.to_record()) for r in self._inspect(decoded, outgoing)]
        return outgoing

    def _inspect(self, decoded: list[DecodedFrame], outgoing: list) -> list[InspectionResult]:
        try:
            inspections, timings = self.inspector.inspect([d.image for d in decoded])
        except Exception as exc:  # one poisonous frame must not sink its batch-mates: retry one by one
            if len(decoded) == 1:
                outgoing.append((self.topics.dead_letter, self._dead_letter_frame(decoded[0], exc).to_record()))
                return []
            log.exception("batch of %d failed; retrying frames one by one", len(decoded))
            return [r for d in decoded for r in self._inspect([d], outgoing)]
        for stage in ("features", "task_id", "expert"):
            self.metrics.stage_seconds.labels(stage).observe(getattr(timings, f"{stage}_ms") / 1000)
        results = []
        for item, inspection in zip(decoded, inspections):
            try:
                results.append(self._result(item, inspection, timings))
            except Exception as exc:  # a result that cannot be encoded is one frame's error, not the batch's
                outgoing.append((self.topics.dead_letter, self._dead_letter_frame(item, exc).to_record()))
        return results

    def _result(self, item: DecodedFrame, inspection: Inspection, timings: BatchTimings) -> InspectionResult:
        started = time.perf_counter()
        frame_hw = item.image.shape[:2]
        png, boxes = None, []
        if inspection.score_map is not None:
            png = anomaly_map_to_png(inspection.score_map, frame_hw, inspection.map_max_score)
            boxes = find_boxes(inspection.score_map, inspection.pixel_threshold, frame_hw)
        encode_ms = 1000 * (time.perf_counter() - started)
        self.metrics.stage_seconds.labels("encode").observe(encode_ms / 1000)
        decision = decision_of(inspection)
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

    # ------------------------------------------------------------------------------ dead letters
    def _dead_letter(self, consumer_record: ConsumerRecord, record: Record, reason: DeadLetterReason,
                     detail: str) -> DeadLetter:
        log.warning("dead-letter %s:%d@%d %s: %s", consumer_record.topic, consumer_record.partition,
                    consumer_record.offset, reason.value, detail)
        self.metrics.errors.labels(reason.value).inc()
        # as whole as its topic takes: a dead letter that cannot be sent would abort every retry of the batch
        return DeadLetter.of(record, self.topics.max_message_bytes, worker_id=self.worker_id,
                             source_topic=consumer_record.topic, partition=consumer_record.partition,
                             offset=consumer_record.offset, reason=reason, detail=detail[:2000],
                             frame_id=frame_id_of(record))

    def _dead_letter_frame(self, item: DecodedFrame, exc: Exception) -> DeadLetter:
        log.exception("frame %s failed in the pipeline", item.frame.frame_id)
        return self._dead_letter(item.source, record_of(item.source), DeadLetterReason.PROCESSING_ERROR,
                                 f"{type(exc).__name__}: {exc}")


def decision_of(inspection: Inspection) -> Decision:
    if inspection.is_defective is None:
        return Decision.UNKNOWN
    return Decision.DEFECTIVE if inspection.is_defective else Decision.OK
