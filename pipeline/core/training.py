"""Train one task from a folder of normal images: keys, expert and calibration. Touches no other task.

The images are split once (seeded) into a fit part and a held-out calibration part; the expert and the
keys see only the fit part, thresholds and the unknown-task bound only the held-out part. With no expert
named, every registered expert is fitted and the one that best separates the held-out normal images from
synthetic anomalies made of them is kept (pipeline.core.expert_selection).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.core.calibration import Calibration
from pipeline.data.datasets import list_images
from pipeline.core.expert_selection import choose_expert, make_validation_set
from pipeline.experts import EXPERT_TYPES, build_expert
from pipeline.features.imaging import decode_image, resize_rgb
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, select_keys, task_features
from schemas.config import ModelConfig, TrainingConfig

ProgressCallback = Callable[[float, str], None]
_MAX_TRAIN_PIXELS = 40_000_000


def split_images(paths: Sequence[Path], config: TrainingConfig, seed: int, limit: int | None) -> tuple[list[Path], list[Path]]:
    """Seeded shuffle, cap at `limit`, then fit / held-out calibration parts (at least 2 held out)."""
    order = np.random.default_rng(seed).permutation(len(paths))
    chosen = [paths[i] for i in order[: limit or config.max_train_images]]
    if len(chosen) < 4:
        raise ValueError(f"need at least 4 normal images, found {len(chosen)}")
    held_out = max(2, int(round(len(chosen) * config.calibration_fraction)))
    return chosen[held_out:], chosen[:held_out]


def load_pixels(path: Path, image_size: int) -> np.ndarray:
    return resize_rgb(decode_image(path.read_bytes(), _MAX_TRAIN_PIXELS), image_size)


def feature_batches(backbone: Backbone, paths: Sequence[Path], model: ModelConfig, batch_size: int,
                    keys: bool = True) -> Iterator[FeatureBatch]:
    for start in range(0, len(paths), batch_size):
        yield backbone.extract([load_pixels(p, model.image_size) for p in paths[start : start + batch_size]], keys)


def train_task(
    category: str,
    train_dir: Path,
    expert_name: str | None,
    backbone: Backbone,
    model: ModelConfig,
    training: TrainingConfig,
    false_alarm_rate: float,
    max_train_images: int | None = None,
    on_progress: ProgressCallback = lambda fraction, message: None,
) -> TaskArtifacts:
    started = time.perf_counter()
    fit_paths, held_out_paths = split_images(list_images(train_dir), training, model.seed, max_train_images)
    on_progress(0.05, f"{len(fit_paths)} images to fit, {len(held_out_paths)} held out for calibration")

    # One backbone pass over the fit images feeds both the expert and the keys; one over the held-out
    # images feeds the automatic choice (if any) and the calibration.
    batches = list(feature_batches(backbone, fit_paths, model, training.batch_size))
    held_out = list(feature_batches(backbone, held_out_paths, model, training.batch_size))
    features_seconds = time.perf_counter() - started
    on_progress(0.35, f"features of {len(fit_paths) + len(held_out_paths)} images in {features_seconds:.1f}s")

    keys = select_keys(torch.cat([task_features(b) for b in batches]), model.num_keys, model.seed)
    choice: list[dict] = []
    if expert_name is None:
        expert, results = _choose(batches, held_out, backbone, model, on_progress)
        choice = [r.as_dict() for r in results]
    else:
        expert = build_expert(expert_name, model)
        expert.fit(batches, backbone)
    del batches
    fit_seconds = time.perf_counter() - started
    summary = expert.fit_summary()
    on_progress(0.8, f"{expert.name} fitted in {fit_seconds - features_seconds:.1f}s"
                     + (f" ({json.dumps(summary, separators=(',', ':'))})" if summary else ""))

    calibration = _calibrate(backbone, expert, keys, held_out, model, false_alarm_rate)
    meta = {
        "train_dir": str(train_dir),
        "max_train_images": max_train_images,
        "num_fit_images": len(fit_paths),
        "num_calibration_images": len(held_out_paths),
        "fit_seconds": round(time.perf_counter() - started, 3),
        "expert_choice": choice,
        "fit_summary": summary,
        "model_config": model.model_dump(),
    }
    on_progress(1.0, f"threshold {calibration.threshold:.4f} (implied false-alarm rate {calibration.implied_false_alarm_rate:.3f})")
    return TaskArtifacts(category, expert.name, keys, expert.to_bytes(), calibration, meta)


def _choose(batches, held_out: list[FeatureBatch], backbone, model: ModelConfig, on_progress):
    """Automatic choice among every registered expert (see pipeline.core.expert_selection)."""
    validation = make_validation_set(backbone, held_out, model.seed)
    on_progress(0.4, f"choosing among {list(EXPERT_TYPES)} on {sum(len(b.pixels) for b in held_out)} held-out normal images "
                     f"+ as many synthetic anomalies")

    def report(result) -> None:
        on_progress(0.4, f"candidate {result.expert}: validation image AUROC {result.image_auroc:.4f}, pixel AUROC "
                         f"{result.pixel_auroc:.4f} (fit {result.fit_seconds:.1f}s)")

    expert, results = choose_expert(list(EXPERT_TYPES), batches, validation, backbone, model, on_result=report)
    best = max(results, key=lambda r: r.score)
    on_progress(0.75, f"chose {best.expert}: best mean validation AUROC {best.score:.4f} "
                      f"(" + ", ".join(f"{r.expert} {r.score:.4f}" for r in results) + ")")
    return expert, results


def _calibrate(backbone, expert, keys, held_out: list[FeatureBatch], model: ModelConfig, far: float) -> Calibration:
    identifier = KeyTaskIdentifier({"self": keys}, {"self": float("inf")})
    scores, peaks, distances = [], [], []
    for batch in held_out:
        output = expert.predict(batch, backbone)
        scores.extend(output.scores.tolist())
        peaks.extend(output.maps.reshape(len(output.maps), -1).max(axis=1).tolist())
        distances.extend(identifier.distances(task_features(batch))[:, 0].tolist())
    return Calibration.from_normals(np.array(scores), np.array(peaks), np.array(distances), far, model.unknown_slack)
