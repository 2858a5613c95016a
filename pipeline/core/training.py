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
from pipeline.core.cost import MachineSpeed, counted
from pipeline.core.decision import ImageDecision
from pipeline.core.expert_selection import choose, default_candidates, make_validation_set
from pipeline.core.audit import AUDIT_MAX_NORMALS, make_audit_set
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
MIN_STATISTICS_IMAGES = 5  # fewer maps give no per-position spread worth dividing by: they fit instead
_LISTED_SKIPS = 10  # skipped files named in an error message; the rest are counted
ROLES = ("fit", "validation", "calibration", "statistics", "audit")
CALIBRATION_RESERVE = 0.2  # of the add budget, kept for calibrating the chosen expert and publishing
# Normals named by their score, highest first (the task's calibration normals, the bench's false-alarm
# normals): at a 1% target two or three of them set the threshold, and one stained or dirty "normal" image
# among them sets what the line catches. Named, an operator can look at them.
HIGHEST_NORMALS_NAMED = 5


@dataclass(frozen=True)
class Splits:
    fit: list[Path]
    validation: list[Path]
    calibration: list[Path]
    statistics: list[Path]  # per-position map statistics (aligned products only; else empty)
    audit: list[Path]
    unused: list[Path]  # never read by training: held back or over an operator's cap

    def names(self) -> dict[str, list[str]]:
        return {role: [p.name for p in getattr(self, role)] for role in (*ROLES, "unused")}


def role_sizes(n: int, config: TrainingConfig, aligned: bool) -> dict[str, int]:
    """How many of `n` images each role gets. Each held-out role first gets its fraction of n (statistics
    only for aligned products, audit up to its cap); what is left of `max_held_out_fraction` of n then lifts
    calibration, validation and statistics, in that order, towards their floors; validation and
    calibration get at least one image each. A statistics role too small to give a spread goes to fit,
    and fit takes the rest (at least 2)."""
    if n < MIN_TASK_IMAGES:
        raise ValueError(f"need at least {MIN_TASK_IMAGES} normal images, found {n}")
    sizes = {
        "validation": round(n * config.validation_fraction),
        "calibration": round(n * config.calibration_fraction),
        "statistics": round(n * config.statistics_fraction) if aligned else 0,
        # never more than the audit set keeps: the rest would neither fit nor judge
        "audit": min(round(n * config.audit_fraction), config.max_audit_images, AUDIT_MAX_NORMALS),
    }
    room = max(2, min(n - 2, int(n * config.max_held_out_fraction)))
    if sum(sizes.values()) > room:  # rounding of small folders: shared in proportion
        sizes = _apportion(sizes, room)
    floors = {"calibration": config.min_calibration_images, "validation": config.min_validation_images,
              "statistics": config.min_statistics_images if aligned else 0}
    for role, floor in floors.items():
        lift = max(0, min(room - sum(sizes.values()), floor - sizes[role]))
        sizes[role] += lift
    for role in ("validation", "calibration"):
        if sizes[role] == 0:  # take the one image from the largest other role
            donor = max(sizes, key=sizes.get)
            sizes[donor] -= 1
            sizes[role] = 1
    if sizes["statistics"] < MIN_STATISTICS_IMAGES:
        sizes["statistics"] = 0
    return {"fit": n - sum(sizes.values()), **sizes}


def _apportion(wanted: dict[str, int], room: int) -> dict[str, int]:
    """`room` shared in proportion to `wanted` (largest remainders, ties in role order)."""
    total = sum(wanted.values())
    quotas = {role: count * room / total for role, count in wanted.items()}
    sizes = {role: int(q) for role, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda role: sizes[role] - quotas[role])
    for role in by_remainder[: room - sum(sizes.values())]:
        sizes[role] += 1
    return sizes


def split_roles(paths: Sequence[Path], config: TrainingConfig, seed: int, limit: int | None = None,
                aligned: bool = False, hold_back: int = 0) -> Splits:
    """Seeded shuffle; the first `hold_back` set aside unread (evaluation's extra normals); cap at `limit`
    (default config.max_train_images, None: no cap); then the roles (role_sizes)."""
    held, shuffled = _held_back(paths, seed, hold_back)
    cap = _cap(len(shuffled), limit or config.max_train_images)
    return _assign_roles(shuffled[:cap], held + shuffled[cap:], config, aligned)


def _held_back(paths: Sequence[Path], seed: int, hold_back: int) -> tuple[list[Path], list[Path]]:
    shuffled = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    return shuffled[:hold_back], shuffled[hold_back:]


def _cap(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _assign_roles(chosen: list[Path], unused: list[Path], config: TrainingConfig, aligned: bool) -> Splits:
    """The roles by position in `chosen` (already shuffled, at least MIN_TASK_IMAGES long)."""
    sizes = role_sizes(len(chosen), config, aligned)
    bounds = np.cumsum([sizes[role] for role in ROLES])
    starts = [0, *bounds[:-1]]
    return Splits(**{role: chosen[a:b] for role, a, b in zip(ROLES, starts, bounds)}, unused=unused)


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
    """A task's normal images, split by role and decoded (every role but audit: its frames and the unused
    rest stay on disk)."""

    splits: Splits
    frames: dict[str, list[np.ndarray]]
    skipped: dict[str, str]  # file name -> why it was left out
    aligned: bool  # every usable frame of one size: per-position map statistics apply


def load_task_images(train_dir: Path, training: TrainingConfig, seed: int, limit: int | None = None,
                     hold_back: int = 0) -> TaskImages:
    """Every file is checked before the roles are dealt, in the seeded order split_roles uses (after the
    `hold_back` it sets aside unread), until the cap (if any) has that many usable images: a bad file is
    skipped by name and the next one takes its place, so no role comes up short and no bad file hides in
    the audit split. The product counts as aligned (a statistics role) when every usable frame has one
    size. Without bad files the split is exactly split_roles'. Refuses (ValueError) when fewer than
    MIN_TASK_IMAGES are usable."""
    held, shuffled = _held_back(list_images(train_dir), seed, hold_back)
    cap = _cap(len(shuffled), limit or training.max_train_images)
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
    aligned = len({frame.shape[:2] for frame in decoded.values()}) == 1
    splits = _assign_roles(list(decoded), held + shuffled[screened:], training, aligned)
    # The audit frames were decoded only to check them: they stay on disk, as before.
    frames = {role: [decoded[p] for p in getattr(splits, role)] for role in ROLES if role != "audit"}
    return TaskImages(splits, frames, skipped, aligned)


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
    speed: MachineSpeed | None = None,
) -> TaskArtifacts:
    """`expert_name` None: the automatic choice among every candidate; `spec` None: the expert's
    candidate specs for these frames, chosen on validation (a named expert with one spec skips it).
    `speed`: this machine's (MachineSpeed.cached by default), what candidates' work is costed at."""
    started = time.perf_counter()
    # the folder is checked first: a refused add measures nothing and loads no model
    images = load_task_images(train_dir, training, model.seed, max_train_images)
    speed = speed or MachineSpeed.cached(backbones)
    splits, frames, skipped = images.splits, images.frames, images.skipped
    on_progress(0.05, f"{len(frames['fit'])} images to fit, {len(frames['validation'])} to validate, "
                      f"{len(frames['calibration'])} to calibrate, {len(frames['statistics'])} for map statistics, "
                      f"{len(splits.audit)} kept for audit" + (f"; skipped {describe_skipped(skipped)}" if skipped else ""))

    fit_tokens, keys_work = counted(lambda: routing_tokens(backbones, frames["fit"], model, training.batch_size))
    keys = select_keys(fit_tokens, model.num_keys, model.seed)
    on_progress(0.15, f"{len(keys)} task keys from the routing pass")

    candidates = default_candidates(frames["fit"], expert_name, spec)
    validation = make_validation_set(frames["validation"], model.seed, frames["statistics"],
                                     training.validation_anomalies_per_normal)
    # The choice may use the add budget (scaled with the frame budget) but for the keys' pass already done
    # and what calibration and publishing need after it.
    budget_s = training.scaled_add_budget_s * (1.0 - CALIBRATION_RESERVE) - speed.seconds(keys_work, "dense")
    selection = choose(candidates, frames["fit"], validation, backbones, model, training, budget_s, speed, on_progress)
    expert, chosen, results = selection.expert, selection.chosen, selection.results
    summary = expert.fit_summary()
    on_progress(0.8, f"chose {chosen.expert} at {chosen.spec.describe()} with {chosen.decision}: validation score "
                     f"{chosen.score:.4f}, {chosen.ms_per_frame:.0f} ms/frame (" + "; ".join(r.line() for r in results) + ")")

    calibration, calibration_scores = calibrate(expert, chosen.spec, backbones, keys, frames["calibration"], model,
                                                training, false_alarm_rate, selection.decision)
    highest = highest_normals([p.name for p in splits.calibration], calibration_scores, calibration.threshold)
    meta = {
        "train_dir": str(train_dir),
        "max_train_images": max_train_images,
        "frame_budget_ms": training.expert_budget_ms,
        "num_fit_images": len(frames["fit"]),
        "num_validation_images": len(frames["validation"]),
        "num_calibration_images": len(frames["calibration"]),
        "num_statistics_images": len(frames["statistics"]),
        "splits": splits.names(),
        "skipped_files": skipped,
        "fit_seconds": round(time.perf_counter() - started, 3),
        "expert_ms_per_frame": round(chosen.ms_per_frame, 2),
        "image_decision": chosen.decision,
        "highest_calibration_normals": highest,
        "expert_choice": [r.as_dict() for r in results],
        "fit_summary": summary,
        "model_config": model.model_dump(),
    }
    audit = make_audit_set([read_training_image(path, training.min_image_side) for path in splits.audit], model.seed,
                           chosen.spec)
    meta["num_audit_frames"] = 0 if audit is None else len(audit.frames)
    on_progress(1.0, f"threshold {calibration.threshold:.4f} (implied false-alarm rate {calibration.implied_false_alarm_rate:.3f})"
                     f"; audit set of {meta['num_audit_frames']} frames; highest calibration normals "
                     + ", ".join(f"{n['image']} ({n['score']:.4g})" for n in highest))
    return TaskArtifacts(category, expert.name, keys, expert.to_bytes(), calibration, meta, chosen.spec,
                         None if audit is None else audit.to_bytes(), selection.decision)


def calibrate(expert: Expert, spec: InputSpec, backbones: Backbones, keys: np.ndarray, images: list[np.ndarray],
              model: ModelConfig, training: TrainingConfig, far: float,
              decision: ImageDecision | None = None) -> tuple[Calibration, np.ndarray]:
    """Thresholds from the calibration frames through the live path (frame-resolution maps, the task's
    image decision), and the unknown bound from their routing distances to the task's own keys; and each
    frame's image score, in the order of `images`."""
    outputs = run_on_frames(expert, spec, backbones, images, training.batch_size)
    scores = (decision or ImageDecision()).scores(outputs.scores, outputs.maps)
    peaks = np.array([float(m.max()) for m in outputs.maps])
    identifier = KeyTaskIdentifier({"self": keys}, {"self": float("inf")})
    distances = identifier.distances(routing_tokens(backbones, images, model, training.batch_size))[:, 0].numpy()
    return Calibration.from_normals(scores, peaks, distances, far, model.unknown_slack), scores


def highest_normals(names: Sequence[str], scores: np.ndarray, threshold: float) -> list[dict]:
    """The HIGHEST_NORMALS_NAMED highest-scoring normals, highest first: {image, score, above_threshold}."""
    highest = np.argsort(-np.asarray(scores), kind="stable")[:HIGHEST_NORMALS_NAMED]
    return [{"image": names[i], "score": float(scores[i]), "above_threshold": bool(scores[i] > threshold)}
            for i in highest]


__all__ = ["HIGHEST_NORMALS_NAMED", "MIN_TASK_IMAGES", "ROLES", "role_sizes", "Splits", "TaskImages", "UnusableImage",
           "calibrate", "describe_skipped", "highest_normals", "load_frames", "load_task_images", "read_training_image",
           "routing_tokens", "split_roles", "train_task"]
