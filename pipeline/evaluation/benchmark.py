"""Offline benchmark of the experts on categories in the MVTec AD layout: cost, quality and the operating
point, reproducible, and the automatic choice judged on test labels it never saw.

Per category, the normal training images are split by role exactly as adding the task does (same seed,
pipeline.core.training). The automatic choice runs as it does live (same candidates, validation set,
budgets, pipeline.core.expert_selection); every candidate it fitted, plus every requested expert outside
the automatic pool at its first candidate spec, is then calibrated on the calibration split and run on
the test set through the live path (frame-resolution maps). Reported per (category, expert, spec): fit
time, ms per frame (measured on the test frames: views, backbone, expert, stitching), stored state size,
validation score, image AUROC / AP, pixel AUROC, AUPRO, pixel AP and F1-max (full-resolution masks), and
the operating point: recall and false-alarm rate at the calibrated threshold and recall at 1% false
alarms from the ROC. False-alarm rates are measured on test/good plus the category's train/good images
that no split used (hundreds more normals than test/good alone). One more row per category repeats the
candidate the automatic choice kept, as `auto`; it was chosen without test labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.core.expert_selection import AUTO_EXPERTS, Candidate, candidate_specs, choose, make_validation_set
from pipeline.core.task_id import select_keys
from pipeline.core.training import calibrate, load_frames, load_task_images, routing_tokens
from pipeline.data.datasets import labeled_test_images, read_mask
from pipeline.data.metrics import image_metrics, operating_point, pixel_metrics, recall_at_false_alarm_rate
from pipeline.experts import Expert, build_expert
from pipeline.experts.ucad import UCAD
from pipeline.experts.frames import fit_batches, run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import ModelConfig, TrainingConfig
from schemas.spec import InputSpec

_MAX_PIXELS = 100_000_000
FAR_TARGET = 0.01


@dataclass(frozen=True)
class BenchmarkRow:
    category: str
    expert: str  # "auto" for the automatically chosen configuration's row
    chosen_expert: str
    spec: str
    status: str  # the automatic choice's verdict: ok, over_budget, skipped (fitted here anyway), named
    num_fit_images: int
    num_test_images: int
    num_far_normals: int  # normals behind the false-alarm rates: test/good + unused train/good
    fit_seconds: float
    ms_per_frame: float
    state_bytes: int
    validation_score: float
    image_auroc: float
    image_ap: float
    pixel_auroc: float
    aupro: float
    pixel_ap: float
    pixel_f1_max: float
    recall_at_threshold: float
    far_at_threshold: float
    recall_at_1pct_far: float
    note: str = ""  # e.g. UCAD's prompt ablation on validation


@dataclass
class _TestData:
    frames: list[np.ndarray]
    labels: list[bool]
    masks: list[np.ndarray] | None  # None: the category has no pixel masks (pixel metrics are NaN)
    extra_normals: list[np.ndarray]  # unused train/good frames


def benchmark_category(
    root: Path,
    category: str,
    experts: Sequence[str],
    backbones: Backbones,
    model: ModelConfig,
    training: TrainingConfig,
    on_row: Callable[[BenchmarkRow], None] = lambda row: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    judge_all: bool = False,
) -> list[BenchmarkRow]:
    """`judge_all`: also fit and test the candidates the automatic choice left unfitted (over the per-frame
    budget or out of time); by default they get a row with their verdict and no test metrics."""
    images = load_task_images(Path(root) / category / "train" / "good", training, model.seed)
    fit, validation_frames = images.frames["fit"], images.frames["validation"]
    keys = select_keys(routing_tokens(backbones, fit, model, training.batch_size), model.num_keys, model.seed)
    test = _load_test(root, category, images.splits.unused, training.min_image_side)

    started = time.perf_counter()
    auto = [Candidate(e, s) for e in AUTO_EXPERTS if e in experts for s in candidate_specs(e, fit)]
    selection = choose(auto, fit, make_validation_set(validation_frames, model.seed), backbones, model, training,
                       deadline=started + training.add_budget_s, on_progress=on_progress) if auto else None
    rows: list[BenchmarkRow] = []

    def add(expert: Expert, spec: InputSpec, fit_seconds: float, validation_score: float, status: str,
            label: str | None = None) -> BenchmarkRow:
        row = _evaluate(category, expert, spec, label or expert.name, status, fit_seconds, validation_score, len(fit),
                        test, backbones, keys, images.frames["calibration"], model, training)
        on_row(row)
        rows.append(row)
        return row

    def fit_here(name: str, spec: InputSpec, expert: Expert | None = None) -> tuple[Expert, float]:
        """Candidates the automatic choice did not fit (over budget, out of time, or outside its pool)."""
        expert = expert or build_expert(name, model)
        t0 = time.perf_counter()
        expert.fit(fit_batches(fit, spec, backbones, training.batch_size), backbones.for_spec(spec.backbone))
        return expert, time.perf_counter() - t0

    chosen_row = None
    for result, fitted in zip(selection.results if selection else [], selection.fitted if selection else []):
        if fitted is None and result.status == "failed":
            continue
        if fitted is None and not judge_all:
            row = _unjudged(category, result, len(fit), len(test.frames))
            on_row(row)
            rows.append(row)
            continue
        expert, fit_seconds = (fitted, result.fit_seconds) if fitted is not None else fit_here(result.expert, result.spec)
        row = add(expert, result.spec, fit_seconds, result.score, result.status)
        if selection.chosen is result:
            chosen_row = row
    for name in (e for e in experts if e not in AUTO_EXPERTS):
        spec = candidate_specs(name, fit)[0]
        expert, fit_seconds = fit_here(name, spec)
        add(expert, spec, fit_seconds, math.nan, "named")
        if isinstance(expert, UCAD):  # the prompt ablation: the same knowledge without any prompt
            plain, plain_seconds = fit_here(name, spec, UCAD(replace(expert.config, prompt_epochs=0)))
            add(plain, spec, plain_seconds, math.nan, "ablation", label="ucad (no prompt)")
    if chosen_row is not None:
        auto_row = BenchmarkRow(**{**asdict(chosen_row), "expert": "auto"})
        on_row(auto_row)
        rows.append(auto_row)
    return rows


def _unjudged(category: str, result, num_fit: int, num_test: int) -> BenchmarkRow:
    """A candidate the automatic choice did not fit: its verdict and measured cost, no test metrics."""
    nan = math.nan
    return BenchmarkRow(category=category, expert=result.expert, chosen_expert=result.expert, spec=result.spec.describe(),
                        status=result.status, num_fit_images=num_fit, num_test_images=num_test, num_far_normals=0,
                        fit_seconds=nan, ms_per_frame=result.ms_per_frame, state_bytes=0, validation_score=nan,
                        image_auroc=nan, image_ap=nan, pixel_auroc=nan, aupro=nan, pixel_ap=nan, pixel_f1_max=nan,
                        recall_at_threshold=nan, far_at_threshold=nan, recall_at_1pct_far=nan, note=result.detail)


def _load_test(root: Path, category: str, unused: Sequence[Path], min_side: int) -> _TestData:
    items = labeled_test_images(root, category)
    frames = [decode_image(item.path.read_bytes(), _MAX_PIXELS) for item in items]
    has_masks = any(item.mask_path is not None for item in items)
    masks = [read_mask(item.mask_path, frame.shape[:2]) for item, frame in zip(items, frames)] if has_masks else None
    extra, _, _ = load_frames(unused, min_side)
    return _TestData(frames, [item.is_anomalous for item in items], masks, extra)


def _evaluate(category: str, expert: Expert, spec: InputSpec, label: str, status: str, fit_seconds: float, validation_score: float,
              num_fit: int, test: _TestData, backbones: Backbones, keys: np.ndarray, calibration_frames: list[np.ndarray],
              model: ModelConfig, training: TrainingConfig) -> BenchmarkRow:
    calibration = calibrate(expert, spec, backbones, keys, calibration_frames, model, training, FAR_TARGET)
    started = time.perf_counter()
    outputs = run_on_frames(expert, spec, backbones, test.frames, training.batch_size)
    ms_per_frame = 1000 * (time.perf_counter() - started) / len(test.frames)
    extra = run_on_frames(expert, spec, backbones, test.extra_normals, training.batch_size).scores if test.extra_normals else np.empty(0)
    # Operating point: every test anomaly against every available normal (test/good + unused train/good).
    op_labels = test.labels + [False] * len(extra)
    op_scores = np.concatenate([outputs.scores, extra])
    point = operating_point(op_labels, op_scores, calibration.threshold)
    pixels = _pixel_metrics(test.masks, outputs.maps)
    image = image_metrics(test.labels, outputs.scores)
    summary = expert.fit_summary()
    note = ""
    if "validation_auroc_no_prompt" in summary:
        kept = f"prompt of epoch {summary['prompt_epoch_kept']} kept" if summary["prompt_kept"] else "no prompt kept"
        note = (f"{kept}; validation AUROC without prompt {summary['validation_auroc_no_prompt']:.4f}, per epoch "
                + ", ".join(f"{v:.4f}" for v in summary["validation_auroc_per_epoch"]))
    return BenchmarkRow(
        category=category, expert=label, chosen_expert=expert.name, spec=spec.describe(), status=status,
        num_fit_images=num_fit, num_test_images=len(test.frames), num_far_normals=len(op_labels) - sum(op_labels),
        fit_seconds=fit_seconds, ms_per_frame=ms_per_frame, state_bytes=len(expert.to_bytes()),
        validation_score=validation_score, image_auroc=image["image_auroc"], image_ap=image["image_ap"], **pixels,
        recall_at_threshold=point["recall"], far_at_threshold=point["false_alarm_rate"],
        recall_at_1pct_far=recall_at_false_alarm_rate(op_labels, op_scores, FAR_TARGET), note=note,
    )


def _pixel_metrics(masks: list[np.ndarray] | None, maps: list[np.ndarray]) -> dict[str, float]:
    keys = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max")
    if masks is None:
        return {key: math.nan for key in keys}
    values = pixel_metrics(masks, maps)
    return {key: values[key] for key in keys}


def _cell(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[BenchmarkRow]) -> str:
    lines = [
        "| category | expert | input spec | choice | fit s | ms/frame | state MB | val score | image AUROC | pixel AUROC "
        "| AUPRO | pixel AP | recall @thr | FAR @thr | recall @1% FAR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**auto → {r.chosen_expert}**" if r.expert == "auto" else r.expert
        cells = [_cell(r.fit_seconds, 1), _cell(r.ms_per_frame, 0), _cell(r.state_bytes / 1e6 if r.state_bytes else math.nan, 2),
                 _cell(r.validation_score), _cell(r.image_auroc), _cell(r.pixel_auroc), _cell(r.aupro), _cell(r.pixel_ap),
                 _cell(r.recall_at_threshold, 3), _cell(r.far_at_threshold, 3), _cell(r.recall_at_1pct_far, 3)]
        lines.append(f"| {r.category} | {name} | {r.spec} | {r.status} | " + " | ".join(cells) + " |")
    notes = [f"- {r.category} / {r.expert}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def rows_as_dicts(rows: Sequence[BenchmarkRow]) -> list[dict]:
    return [asdict(r) for r in rows]
