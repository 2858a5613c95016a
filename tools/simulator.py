"""Camera simulator: publishes a folder in the MVTec AD layout as frames, at a given rate.

Frames are spread over a few simulated cameras per category. Each camera writes one partition (so
its frames keep their order) and cameras are dealt to partitions in turn (`CameraPartitions`), not by
key hash: with 4 cameras, hashing put 3 of them on one worker's partitions. Ground truth can ride
along in a header for evaluation; the inference path never reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.datasets import LabeledImage, labeled_test_images
from pipeline.features.imaging import decode_image, encode_png
from schemas.config import TopicsConfig
from schemas.messages import Frame, GroundTruth
from workers.kafka_io import make_producer, send_record

_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


@dataclass(frozen=True)
class PublishedFrame:
    frame_id: str
    camera_id: str
    image: LabeledImage


class CameraPartitions:
    """Deals cameras to partitions in turn, in the order they first publish: camera k writes partition
    k mod P. Inference consumers take partitions round-robin (partition p to worker p mod W), so with
    P a multiple of W each worker gets every W-th camera: 4 cameras, 2 workers -> 2 cameras each.
    A production camera gets its index from its configuration in the same way."""

    def __init__(self, partitions: int):
        self.partitions = partitions
        self._of: dict[str, int] = {}

    def __call__(self, camera_id: str) -> int:
        return self._of.setdefault(camera_id, len(self._of) % self.partitions)


def frame_of(item: LabeledImage, camera_id: str, with_ground_truth: bool) -> Frame:
    data = item.path.read_bytes()
    content_type = _CONTENT_TYPES.get(item.path.suffix.lower())
    if content_type is None:  # e.g. BMP: cameras here speak JPEG/PNG, so re-encode losslessly
        data, content_type = encode_png(decode_image(data, 10**9)), "image/png"
    truth = GroundTruth(
        category=item.category, is_anomalous=item.is_anomalous, defect=item.defect, source=str(item.path)
    ) if with_ground_truth else None
    return Frame(camera_id=camera_id, content_type=content_type, image=data, ground_truth=truth)


def dataset_stream(root: Path, categories: Iterable[str], limit_per_category: int | None, seed: int) -> list[LabeledImage]:
    """Test images of the categories, interleaved in a seeded random order (a mixed production line)."""
    items = []
    for category in categories:
        images = labeled_test_images(root, category)
        if limit_per_category is not None:
            picks = np.random.default_rng(seed).permutation(len(images))[:limit_per_category]
            images = [images[i] for i in sorted(picks)]
        items.extend(images)
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def publish(
    bootstrap: str,
    topics: TopicsConfig,
    items: list[LabeledImage],
    rate_fps: float,
    cameras_per_category: int = 4,
    with_ground_truth: bool = True,
) -> list[PublishedFrame]:
    """Publish `items` at `rate_fps` (0 = as fast as possible); returns what was sent, once acked."""
    producer = make_producer(bootstrap, topics, client_id="camera-simulator")
    partition_of = CameraPartitions(topics.frame_partitions)
    published, futures = [], []
    interval = 1.0 / rate_fps if rate_fps > 0 else 0.0
    next_send = time.monotonic()
    try:
        for index, item in enumerate(items):
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_send += interval
            camera_id = f"{item.category}-cam{index % cameras_per_category}"
            frame = frame_of(item, camera_id, with_ground_truth)  # captured now
            futures.append(send_record(producer, topics.frames, frame.to_record(), partition_of(camera_id)))
            published.append(PublishedFrame(frame.frame_id, camera_id, item))
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker refused a frame
    finally:
        producer.close()
    return published
