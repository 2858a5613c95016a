"""Offline benchmark of the experts on categories in the MVTec AD layout: cost and quality, reproducible.

Per category, the normal training images are split exactly as training does (same seed), the backbone
features of the fit part are computed once and shared by every expert, and each expert is fitted and
then run on the full test set. Reported per (category, expert): fit time, inference ms/image and
images/s (resize + backbone + expert, batch of `batch_size`), the stored state's size, and the image and
pixel metrics, on full-resolution ground-truth masks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.features.backbone import Backbone
from pipeline.data.datasets import labeled_test_images, read_mask, train_images
from pipeline.data.metrics import image_metrics, pixel_metrics
from pipeline.experts import build_expert
from pipeline.features.imaging import decode_image, resize_rgb
from pipeline.core.training import feature_batches, split_images
from schemas.config import ModelConfig, TrainingConfig

_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class BenchmarkRow:
    category: str
    expert: str
    num_fit_images: int
    num_test_images: int
    fit_seconds: float
    ms_per_image: float
    images_per_second: float
    state_bytes: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    pixel_ap: float
    pixel_f1_max: float
    image_ap: float
    image_f1_max: float


def benchmark_category(
    root: Path,
    category: str,
    experts: Sequence[str],
    backbone: Backbone,
    model: ModelConfig,
    training: TrainingConfig,
    on_row: Callable[[BenchmarkRow], None] = lambda row: None,
) -> list[BenchmarkRow]:
    fit_paths, _held_out = split_images(train_images(root, category), training, model.seed, None)
    fit_batches = list(feature_batches(backbone, fit_paths, model, training.batch_size, keys=False))
    tests = labeled_test_images(root, category)
    images = [decode_image(item.path.read_bytes(), _MAX_PIXELS) for item in tests]
    masks = [read_mask(item.mask_path, image.shape[:2]) for item, image in zip(tests, images)]
    labels = [item.is_anomalous for item in tests]
    rows = []
    for name in experts:
        expert = build_expert(name, model)
        started = time.perf_counter()
        expert.fit(fit_batches, backbone)
        fit_seconds = time.perf_counter() - started
        scores, maps, seconds = _predict_all(expert, backbone, images, model.image_size, training.batch_size)
        row = BenchmarkRow(
            category=category,
            expert=name,
            num_fit_images=len(fit_paths),
            num_test_images=len(images),
            fit_seconds=fit_seconds,
            ms_per_image=1000 * seconds / len(images),
            images_per_second=len(images) / seconds,
            state_bytes=len(expert.to_bytes()),
            **image_metrics(labels, scores),
            **_pixel_metrics(masks, maps),
        )
        on_row(row)
        rows.append(row)
    return rows


def _predict_all(expert, backbone: Backbone, images: list[np.ndarray], size: int, batch_size: int):
    scores, maps = [], []
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = backbone.extract([resize_rgb(image, size) for image in images[start : start + batch_size]], keys=False)
        output = expert.predict(batch, backbone)
        scores.extend(output.scores.tolist())
        maps.extend(output.maps)
    return scores, maps, time.perf_counter() - started


def _pixel_metrics(masks: list[np.ndarray], maps: list[np.ndarray]) -> dict[str, float]:
    values = pixel_metrics(masks, maps)
    return {key: values[key] for key in ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max")}


def markdown_table(rows: Sequence[BenchmarkRow]) -> str:
    lines = [
        "| category | expert | fit s | ms/image | images/s | state MB | image AUROC | pixel AUROC | AUPRO | pixel AP | pixel F1-max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.category} | {r.expert} | {r.fit_seconds:.1f} | {r.ms_per_image:.1f} | {r.images_per_second:.1f} "
            f"| {r.state_bytes / 1e6:.2f} | {r.image_auroc:.4f} | {r.pixel_auroc:.4f} | {r.aupro:.4f} "
            f"| {r.pixel_ap:.4f} | {r.pixel_f1_max:.4f} |"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: Sequence[BenchmarkRow]) -> list[dict]:
    return [asdict(r) for r in rows]
