"""Camera simulator: publishes a folder in the MVTec AD layout as frames, at a given rate.

Frames are spread over a few simulated cameras per category (the camera id is the record key, so
cameras map to partitions and the load spreads over workers). Ground truth can ride along in a
header for evaluation; the inference path never reads it.
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
            futures.append(send_record(producer, topics.frames, frame.to_record()))
            published.append(PublishedFrame(frame.frame_id, camera_id, item))
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker refused a frame
    finally:
        producer.close()
    return published
