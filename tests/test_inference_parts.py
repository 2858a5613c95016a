"""The inference worker's parts without a Kafka stream: results from decoded frames, dead letters from the
record a frame came in, and store versions prepared beside the stream (real Redis, real backbones)."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import redis
import torch
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry

from pipeline.core.inspector import Inspection, Inspector
from pipeline.core.store import KnowledgeStore
from pipeline.core.task_id import TaskMatch
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.features.backbone import Backbone, Backbones, FeatureBatch
from pipeline.features.imaging import encode_png
from schemas.config import InferenceConfig, ModelConfig, TopicsConfig
from schemas.messages import DeadLetter, DeadLetterReason, Frame
from test_store import make_task
from tools.processes import wait_until
from workers.inference import DecodedFrame, ResultBuilder, StoreFollower
from workers.metrics import InferenceMetrics

LITE2 = "efficientnet_lite2"


def test_an_unknown_inspection_keeps_its_match_and_judges_nothing() -> None:
    match = TaskMatch(None, "tile", 3.5, 0.0)
    unknown = Inspection.unknown(match)
    assert unknown.match is match
    assert all(getattr(unknown, f.name) is None for f in dataclasses.fields(Inspection) if f.name != "match")


# ---------------------------------------------------------------------------- frames and dead letters
class _FailingInspector(Inspector):
    """Every batch fails in the pipeline, as a poisonous frame makes it."""

    def inspect(self, images):
        raise RuntimeError("poisoned")


def _consumer_record(frame: Frame, partition: int, offset: int) -> ConsumerRecord:
    record = frame.to_record()
    return ConsumerRecord("frames", partition, None, offset, 0, 0, record.key, record.value, record.headers,
                          None, len(record.key), len(record.value), -1)


def _builder(inspector: Inspector) -> ResultBuilder:
    return ResultBuilder(TopicsConfig(), InferenceConfig(), inspector, InferenceMetrics(CollectorRegistry()), "w-test")


def _decoded(builder: ResultBuilder, records: list[ConsumerRecord]) -> list[Future]:
    futures = []
    for record in records:
        future: Future = Future()
        future.set_result(builder.decode(record))
        futures.append(future)
    return futures


def test_a_frame_failing_in_the_pipeline_is_dead_lettered_from_the_record_it_came_in() -> None:
    builder = _builder(_FailingInspector(Backbones(Backbone(vit=None)), ModelConfig()))
    image = encode_png(np.full((24, 32, 3), 128, dtype=np.uint8))
    # the same frame sent twice (a camera's retry): each dead letter names its own record
    frame = Frame(camera_id="cam-1", content_type="image/png", image=image)
    records = [_consumer_record(frame, 0, 41), _consumer_record(frame, 2, 7)]
    decoding = _decoded(builder, records)
    assert [d.result().source for d in decoding] == records
    assert all(isinstance(d.result(), DecodedFrame) for d in decoding)

    outgoing = builder.outgoing(decoding)

    letters = [DeadLetter.model_validate_json(record.value) for _, record in outgoing]
    assert [topic for topic, _ in outgoing] == [TopicsConfig().dead_letter] * 2
    assert [(l.partition, l.offset) for l in letters] == [(0, 41), (2, 7)]
    assert {l.reason for l in letters} == {DeadLetterReason.PROCESSING_ERROR}
    assert all(l.frame_id == frame.frame_id and "poisoned" in l.detail for l in letters)


# ---------------------------------------------------------------------------- store versions
def _lite2_task(category: str):
    """A stored task whose expert reads EfficientNet-Lite2 stages (a backbone no other task loaded)."""
    g = torch.Generator().manual_seed(0)
    features = FeatureBatch(pixels=torch.rand(2, 3, 64, 64, generator=g),
                            stages={2: torch.rand(2, 48, 8, 8, generator=g), 3: torch.rand(2, 120, 4, 4, generator=g)})
    expert = PatchCore(PatchCoreConfig(coreset_ratio=0.5, projection_dim=16, map_sigma=1.0, seed=0))
    expert.fit([features])
    task = make_task(category)
    assert task.input_spec.backbone == LITE2
    return dataclasses.replace(task, expert_state=expert.to_bytes())


@pytest.fixture
def store(redis_client: redis.Redis) -> KnowledgeStore:
    return KnowledgeStore(redis_client)


def _fresh_backbones() -> Backbones:
    """Lite0 alone (random weights, no ViT: routing is not what these tests look at)."""
    return Backbones(Backbone(vit=None))


def test_prepare_loads_every_backbone_and_leaves_what_is_served(store: KnowledgeStore) -> None:
    version = store.publish(_lite2_task("tile"))
    inspector = Inspector(_fresh_backbones(), ModelConfig())
    assert LITE2 not in inspector.backbones.loaded()

    snapshot = inspector.prepare(store)

    assert LITE2 in inspector.backbones.loaded()
    assert inspector.tasks == {} and inspector.store_version == 0  # served: still the version before
    assert snapshot.version == version and snapshot.changed == ["tile"]
    inspector.use(snapshot)
    assert set(inspector.tasks) == {"tile"} and inspector.store_version == version
    assert inspector.prepare(store) is None  # the version served: nothing to prepare


class _SlowInspector(Inspector):
    """Prepares a store version only once let through (a slow load, as a new backbone's can be), and
    notes which backbones were loaded when a snapshot was swapped in."""

    def __init__(self, backbones: Backbones):
        super().__init__(backbones, ModelConfig())
        self.let_through = threading.Event()
        self.loaded_at_swap: set[str] | None = None

    def prepare(self, store):
        self.let_through.wait(60)
        return super().prepare(store)

    def use(self, snapshot) -> None:
        self.loaded_at_swap = self.backbones.loaded()
        super().use(snapshot)


def test_the_worker_serves_the_old_version_until_the_new_ones_backbones_are_loaded(store: KnowledgeStore) -> None:
    version = store.publish(_lite2_task("tile"))
    inspector = _SlowInspector(_fresh_backbones())
    metrics = InferenceMetrics(CollectorRegistry())
    follower = StoreFollower(inspector, store, metrics, poll_interval_s=0.05)

    slowest = 0.0
    for _ in range(20):  # the poll loop's turns while the version is prepared: none waits for it
        started = time.monotonic()
        follower.follow()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    assert slowest < 0.5
    assert follower.preparing() and not follower.read
    assert inspector.store_version == 0 and inspector.tasks == {} and inspector.loaded_at_swap is None

    inspector.let_through.set()

    def swapped() -> bool:
        follower.follow()
        return inspector.store_version == version

    wait_until(swapped, 60, interval_s=0.05, what="the prepared version swapped in")
    assert LITE2 in inspector.loaded_at_swap  # loaded before the swap, never by a frame
    assert follower.read and not follower.preparing() and set(inspector.tasks) == {"tile"}
    assert metrics.store_version._value.get() == version
