"""Train one task from a folder of normal images: keys, expert, input spec and calibration. Touches no
other task.

The images are split once (seeded) by role (schemas.config.TrainingConfig): the expert and the keys
learn from the fit split only; the automatic choice of expert and input spec, and early stopping, judge
on the validation split (normal frames plus synthetic anomalies of a family no expert trains on); the
threshold and the unknown-task bound come from the calibration split alone; the audit split is never
used here and is recorded for live monitoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.calibration import Calibration
from pipeline.core.expert_selection import choose, default_candidates, make_validation_set
from pipeline.core.audit import make_audit_set
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, select_keys, task_features
from pipeline.data.datasets import list_images
from pipeline.experts import Expert
from pipeline.experts.frames import run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import ImageDecodeError, decode_image
from schemas.config import InferenceConfig, ModelConfig, TrainingConfig
from schemas.spec import InputSpec, routing_spec

log = logging.getLogger(__name__)
ProgressCallback = Callable[[float, str], None]
# A training image may be as large as a live frame may be (decoded pixels), no larger: the bound is
# checked from the header, before any pixel is decoded.
_MAX_TRAIN_PIXELS = InferenceConfig.model_fields["max_frame_pixels"].default
# A file larger than 16-bit RGBA stored uncompressed (8 bytes a pixel) plus room for metadata is no image
# within that bound; refusing it from its size avoids reading it into memory.
_MAX_BYTES_PER_PIXEL = 8
_METADATA_ALLOWANCE = 16 * 1024 * 1024
MIN_TASK_IMAGES = 4  # the role split's minimum: 2 to fit, 1 to validate, 1 to calibrate (audit may be empty)
_LISTED_SKIPS = 10  # skipped files named in an error message; the rest are counted
ROLES = ("fit", "validation", "calibration", "audit")
CALIBRATION_RESERVE = 0.2  # of the add budget, kept for calibrating the chosen expert and publishing


@dataclass(frozen=True)
class Splits:
    fit: list[Path]
    validation: list[Path]
    calibration: list[Path]
    audit: list[Path]
    unused: list[Path]  # never read by training: extra normal images for evaluation

    def names(self) -> dict[str, list[str]]:
        return {role: [p.name for p in getattr(self, role)] for role in (*ROLES, "unused")}


def split_roles(paths: Sequence[Path], config: TrainingConfig, seed: int, limit: int | None = None) -> Splits:
    """Seeded shuffle, cap at `limit` (default config.max_train_images), then the four roles. Each of
    validation and calibration gets at least one image, fit at least two; audit may be empty."""
    cap = min(len(paths), limit or config.max_train_images)
    if cap < MIN_TASK_IMAGES:
        raise ValueError(f"need at least {MIN_TASK_IMAGES} normal images, found {len(paths)}")
    shuffled = _shuffled(paths, seed)
    return _assign_roles(shuffled[:cap], shuffled[cap:], config)


def _shuffled(paths: Sequence[Path], seed: int) -> list[Path]:
    return [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]


def _assign_roles(chosen: list[Path], unused: list[Path], config: TrainingConfig) -> Splits:
    """The roles by position in `chosen` (already shuffled, at least MIN_TASK_IMAGES long)."""
    cap = len(chosen)
    n_val = max(1, round(cap * config.validation_fraction))
    n_cal = max(1, round(cap * config.calibration_fraction))
    n_fit = max(2, round(cap * config.fit_fraction))
    n_fit = min(n_fit, cap - n_val - n_cal)
    bounds = np.cumsum([n_fit, n_val, n_cal])
    return Splits(
        fit=chosen[: bounds[0]],
        validation=chosen[bounds[0] : bounds[1]],
        calibration=chosen[bounds[1] : bounds[2]],
        audit=chosen[bounds[2] :],
        unused=unused,
    )


class UnusableImage(ValueError):
    """A training file that cannot serve as a normal image; the message is the reason."""


def read_training_image(path: Path, min_side: int, max_pixels: int = _MAX_TRAIN_PIXELS) -> np.ndarray:
    """uint8 HxWx3 of one training file, or UnusableImage saying why not (empty, too many bytes, not an
    image, corrupt, more than `max_pixels` decoded pixels, a side under `min_side`)."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise UnusableImage("empty file (0 bytes)")
        if size > max_pixels * _MAX_BYTES_PER_PIXEL + _METADATA_ALLOWANCE:
            raise UnusableImage(f"{size} bytes is more than an image of at most {max_pixels} pixels needs")
        image = decode_image(path.read_bytes(), max_pixels)
    except (OSError, ImageDecodeError) as error:
        raise UnusableImage(str(error)) from error
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise UnusableImage(f"{width}x{height} is smaller than {min_side} px")
    return image


def load_frames(paths: Sequence[Path], min_side: int,
                max_pixels: int = _MAX_TRAIN_PIXELS) -> tuple[list[np.ndarray], list[Path], dict[str, str]]:
    """Decoded frames, their paths, and {file name: reason} for the files skipped (unreadable, not an
    image, corrupt, too small, too large): one bad file never fails a whole task."""
    frames, kept, skipped = [], [], {}
    for path in paths:
        try:
            frames.append(read_training_image(path, min_side, max_pixels))
        except UnusableImage as error:
            _skip(skipped, path, str(error))
            continue
        kept.append(path)
    return frames, kept, skipped


def _skip(skipped: dict[str, str], path: Path, reason: str) -> None:
    log.warning("skipping training image %s: %s", path, reason)
    skipped[path.name] = reason


def describe_skipped(skipped: dict[str, str], limit: int = _LISTED_SKIPS) -> str:
    """'a.png (reason); b.png (reason); ... and N more': a readable line even for a folder of bad files."""
    shown = [f"{name} ({reason if len(reason) <= 120 else reason[:117] + '...'})"
             for name, reason in list(skipped.items())[:limit]]
    more = len(skipped) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")


@dataclass
class TaskImages:
    """A task's normal images, split by role and decoded (fit, validation, calibration; audit and the
    unused rest stay on disk)."""

    splits: Splits
    frames: dict[str, list[np.ndarray]]
    skipped: dict[str, str]  # file name -> why it was left out


def load_task_images(train_dir: Path, training: TrainingConfig, seed: int, limit: int | None = None) -> TaskImages:
    """Every file is checked before the roles are dealt, in the seeded order split_roles uses, until the
    cap has that many usable images: a bad file is skipped by name and the next one takes its place, so
    no role comes up short and no bad file hides in the audit split. Without bad files the split is
    exactly split_roles'. Refuses (ValueError) when fewer than MIN_TASK_IMAGES are usable."""
    shuffled = _shuffled(list_images(train_dir), seed)
    cap = min(len(shuffled), limit or training.max_train_images)
    decoded: dict[Path, np.ndarray] = {}
    skipped: dict[str, str] = {}
    screened = 0
    for path in shuffled:
        if len(decoded) == cap:
            break
        screened += 1
        try:
            decoded[path] = read_training_image(path, training.min_image_side)
        except UnusableImage as error:
            _skip(skipped, path, str(error))
    if len(decoded) < MIN_TASK_IMAGES:
        raise ValueError(
            f"only {len(decoded)} of {screened} images in {train_dir} are usable; a task needs at least "
            f"{MIN_TASK_IMAGES} (2 to fit, 1 to validate, 1 to calibrate)"
            + (f". Skipped: {describe_skipped(skipped)}" if skipped else "")
        )
    splits = _assign_roles(list(decoded), shuffled[screened:], training)
    # The audit frames were decoded only to check them: they stay on disk, as before.
    frames = {role: [decoded[p] for p in getattr(splits, role)] for role in ("fit", "validation", "calibration")}
    return TaskImages(splits, frames, skipped)


def routing_tokens(backbones: Backbones, images: Sequence[np.ndarray], model: ModelConfig, batch_size: int) -> torch.Tensor:
    """N x P x D unprompted key tokens of routing's pass, exactly as live frames get them (the keys and
    the unknown bound)."""
    spec = routing_spec(model.image_size)
    return torch.cat([task_features(backbones.routing_pass(list(images[start : start + batch_size]), spec))
                      for start in range(0, len(images), batch_size)])


def train_task(
    category: str,
    train_dir: Path,
    expert_name: str | None,
    backbones: Backbones,
    model: ModelConfig,
    training: TrainingConfig,
    false_alarm_rate: float,
    max_train_images: int | None = None,
    on_progress: ProgressCallback = lambda fraction, message: None,
    spec: InputSpec | None = None,
) -> TaskArtifacts:
    """`expert_name` None: the automatic choice among every candidate; `spec` None: the expert's
    candidate specs for these frames, chosen on validation (a named expert with one spec skips it)."""
    started = time.perf_counter()
    images = load_task_images(train_dir, training, model.seed, max_train_images)
    splits, frames, skipped = images.splits, images.frames, images.skipped
    on_progress(0.05, f"{len(frames['fit'])} images to fit, {len(frames['validation'])} to validate, "
                      f"{len(frames['calibration'])} to calibrate, {len(splits.audit)} kept for audit"
                      + (f"; skipped {describe_skipped(skipped)}" if skipped else ""))

    fit_tokens = routing_tokens(backbones, frames["fit"], model, training.batch_size)
    keys = select_keys(fit_tokens, model.num_keys, model.seed)
    on_progress(0.15, f"{len(keys)} task keys from the routing pass")

    candidates = default_candidates(frames["fit"], expert_name, spec)
    validation = make_validation_set(frames["validation"], model.seed)
    # The choice may use the add budget but for what calibration and publishing need after it.
    deadline = started + training.add_budget_s * (1.0 - CALIBRATION_RESERVE)
    selection = choose(candidates, frames["fit"], validation, backbones, model, training, deadline, on_progress)
    expert, chosen, results = selection.expert, selection.chosen, selection.results
    summary = expert.fit_summary()
    on_progress(0.8, f"chose {chosen.expert} at {chosen.spec.describe()}: validation score {chosen.score:.4f}, "
                     f"{chosen.ms_per_frame:.0f} ms/frame (" + "; ".join(r.line() for r in results) + ")")

    calibration = calibrate(expert, chosen.spec, backbones, keys, frames["calibration"], model, training, false_alarm_rate)
    meta = {
        "train_dir": str(train_dir),
        "max_train_images": max_train_images,
        "num_fit_images": len(frames["fit"]),
        "num_validation_images": len(frames["validation"]),
        "num_calibration_images": len(frames["calibration"]),
        "splits": splits.names(),
        "skipped_files": skipped,
        "fit_seconds": round(time.perf_counter() - started, 3),
        "expert_ms_per_frame": round(chosen.ms_per_frame, 2),
        "expert_choice": [r.as_dict() for r in results],
        "fit_summary": summary,
        "model_config": model.model_dump(),
    }
    audit = make_audit_set([read_training_image(path, training.min_image_side) for path in splits.audit], model.seed)
    meta["num_audit_frames"] = 0 if audit is None else len(audit.frames)
    on_progress(1.0, f"threshold {calibration.threshold:.4f} (implied false-alarm rate {calibration.implied_false_alarm_rate:.3f})"
                     f"; audit set of {meta['num_audit_frames']} frames")
    return TaskArtifacts(category, expert.name, keys, expert.to_bytes(), calibration, meta, chosen.spec,
                         None if audit is None else audit.to_bytes())


def calibrate(expert: Expert, spec: InputSpec, backbones: Backbones, keys: np.ndarray, images: list[np.ndarray],
              model: ModelConfig, training: TrainingConfig, far: float) -> Calibration:
    """Thresholds from the calibration frames through the live path (frame-resolution maps), and the
    unknown bound from their routing distances to the task's own keys."""
    outputs = run_on_frames(expert, spec, backbones, images, training.batch_size)
    peaks = np.array([float(m.max()) for m in outputs.maps])
    identifier = KeyTaskIdentifier({"self": keys}, {"self": float("inf")})
    distances = identifier.distances(routing_tokens(backbones, images, model, training.batch_size))[:, 0].numpy()
    return Calibration.from_normals(outputs.scores, peaks, distances, far, model.unknown_slack)


__all__ = ["MIN_TASK_IMAGES", "ROLES", "Splits", "TaskImages", "UnusableImage", "calibrate", "describe_skipped",
           "load_frames", "load_task_images", "read_training_image", "routing_tokens", "split_roles", "train_task"]
