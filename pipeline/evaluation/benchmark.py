"""Offline benchmark of the experts on categories in the MVTec AD layout: cost, quality and the operating
point, reproducible, and the automatic choice judged on test labels it never saw.

Per category, a seeded share of train/good is held back first (enough that, with test/good, at least
FAR_NORMALS normals measure false alarms where the product has them), then the rest is split by role
exactly as adding the task does (same seed, pipeline.core.training). The automatic choice runs as it does
live (same candidates, validation set, image decisions, budgets, pipeline.core.expert_selection), once at
each frame budget of `frame_budgets_ms` (the first is the default; each later one reuses the fits of the
earlier ones, which are deterministic); every candidate gets a row per frame budget with that budget's
verdict (kept, over the per-frame budget, out of add time). Every candidate a choice fitted (by default; `judge`
"chosen": only those the choices kept; "all": every candidate), plus every requested expert outside the automatic
pool at its first candidate spec, are then calibrated on the calibration split and run on the test set
through the live path (frame-resolution maps, its image decision). Reported per (category,
expert, spec): fit time, ms per frame (measured on the test frames: views, backbone, expert, stitching),
stored state size, validation score, image AUROC / AP, pixel AUROC, AUPRO, pixel AP and F1-max
(full-resolution masks), and the operating point: recall and false-alarm rate at the calibrated threshold
and recall at 1% false alarms from the ROC, over every test anomaly and every normal no role used; per
defect type (each test/<type>), image AUROC against those normals and recall at the threshold; per
defect size (the mask's share of the frame, where the category has masks), recall at the threshold and at
1% false alarms; and the normals that score highest, by name (those that set the 1% point). Per
category, the Spearman rank correlation between validation score and test image AUROC over the tested
candidates ("fitted" or "all") says whether the choice can be trusted. One more row per frame budget repeats the candidate
the automatic choice kept, as `auto` (default budget) and `auto@<ms>ms`; it was chosen without test labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from pipeline.core.cost import MachineSpeed
from pipeline.core.decision import ImageDecision
from pipeline.core.expert_selection import (AUTO_EXPERTS, Candidate, CandidateResult, FitCache, Selection,
                                            candidate_specs, choose, default_candidates, make_validation_set,
                                            rotated)
from pipeline.core.task_id import select_keys
from pipeline.core.training import (CALIBRATION_RESERVE, calibrate, highest_normals, load_frames, load_task_images,
                                    routing_tokens)
from pipeline.data.datasets import labeled_test_images, list_images, read_mask
from pipeline.data.metrics import (false_alarm_cut, image_metrics, operating_point, pixel_metrics,
                                   recall_at_false_alarm_rate, roc_auc)
from pipeline.experts import Expert, build_expert
from pipeline.experts.ucad import UCAD
from pipeline.experts.frames import fit_batches, run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import BENCH_JUDGE_MODES, DEFAULT_BENCH_JUDGE, DEFAULT_FRAME_BUDGET_MS, ModelConfig, TrainingConfig
from schemas.spec import InputSpec

_MAX_PIXELS = 100_000_000
FAR_TARGET = 0.01
FAR_NORMALS = 250  # normals behind the false-alarm rates, test/good plus held-back train/good, where they exist
MAX_HOLD_BACK_FRACTION = 0.25  # of train/good: the roles keep the rest
GPU_CLASS_FRAME_BUDGET_MS = 2500.0  # about what a GPU does in ~25 ms, measured here
# Defect sizes, as the share of the frame its mask covers: the upper edges of the buckets but the last. A
# share, not pixels, so frames of any resolution compare (0.02% of a 1130 x 460 frame is 104 px).
DEFECT_SIZE_EDGES = (0.0002, 0.001, 0.005)


@dataclass(frozen=True)
class BenchmarkRow:
    category: str
    expert: str  # "auto" / "auto@<ms>ms" for the automatically chosen configuration's rows
    chosen_expert: str
    spec: str
    status: str  # the automatic choice's verdict: ok, over_budget, skipped (fitted here anyway), named
    num_fit_images: int
    num_test_images: int
    num_far_normals: int  # normals behind the false-alarm rates: test/good + held-back train/good
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
    frame_budget_ms: float = DEFAULT_FRAME_BUDGET_MS  # the per-frame budget the verdict was reached at
    decision: str = ""  # the image decision (chosen on validation)
    estimated_ms_per_frame: float = math.nan  # what the budget judged (pipeline.core.cost)
    per_defect_type: dict = field(default_factory=dict)  # type -> {image_auroc, recall_at_threshold}
    per_defect_size: dict = field(default_factory=dict)  # size bucket -> {count, recall_at_threshold, recall_at_1pct_far}
    highest_normals: list = field(default_factory=list)  # [{image, score, above_threshold}], highest score first
    validation_test_spearman: float = math.nan  # per category, over its fitted candidates


@dataclass
class _TestData:
    frames: list[np.ndarray]
    labels: list[bool]
    defect_types: list[str]  # "good" for normals
    masks: list[np.ndarray] | None  # None: the category has no pixel masks (pixel metrics are NaN)
    extra_normals: list[np.ndarray]  # held-back train/good frames
    names: list[str]  # "test/good/003.png": the test frames' files, below the category's folder
    extra_names: list[str]  # "train/good/570.png": the held-back frames' files

    def normal_names(self) -> list[str]:
        """The false-alarm normals' names, in the order of their scores in _evaluate."""
        return [name for name, label in zip(self.names, self.labels) if not label] + self.extra_names


def hold_back_count(num_train: int, num_test_good: int) -> int:
    """Train/good images held back for false alarms: enough for FAR_NORMALS with test/good, at most
    MAX_HOLD_BACK_FRACTION of train/good."""
    return max(0, min(FAR_NORMALS - num_test_good, int(num_train * MAX_HOLD_BACK_FRACTION)))


def benchmark_category(
    root: Path,
    category: str,
    experts: Sequence[str],
    backbones: Backbones,
    model: ModelConfig,
    training: TrainingConfig,
    on_row: Callable[[BenchmarkRow], None] = lambda row: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    judge: str = DEFAULT_BENCH_JUDGE,
    frame_budgets_ms: Sequence[float] | None = None,
    speed: MachineSpeed | None = None,
) -> list[BenchmarkRow]:
    """`judge` (BENCH_JUDGE_MODES) says which candidates are run on the test set: "fitted" (the default),
    every candidate a choice fitted (and the validation-test Spearman); "chosen", only those an automatic
    choice kept (the others get a row with their verdict, validation score and estimated cost: quicker);
    "all", also those it left unfitted (over the per-frame budget or out of time), fitted here.
    `frame_budgets_ms` None: the training config's budget alone."""
    if judge not in BENCH_JUDGE_MODES:
        raise ValueError(f"judge must be one of {BENCH_JUDGE_MODES}, not {judge!r}")
    speed = speed or MachineSpeed.cached(backbones)
    frame_budgets_ms = list(frame_budgets_ms or [training.expert_budget_ms])
    train_dir = Path(root) / category / "train" / "good"
    test_items = labeled_test_images(root, category)
    hold_back = hold_back_count(len(list_images(train_dir)), sum(not item.is_anomalous for item in test_items))
    images = load_task_images(train_dir, training, model.seed, hold_back=hold_back)
    fit = images.frames["fit"]
    keys = select_keys(routing_tokens(backbones, fit, model, training.batch_size), model.num_keys, model.seed)
    test = _load_test(test_items, images.splits.unused, training.min_image_side)
    validation = make_validation_set(images.frames["validation"], model.seed, images.frames["statistics"],
                                     training.validation_anomalies_per_normal)

    auto = [c for c in default_candidates(fit, None, None) if c.expert in experts]
    cache: FitCache = {}
    selections: list[tuple[float, Selection]] = []
    for budget_ms in (frame_budgets_ms if auto else ()):
        at_budget = training.at_frame_budget(budget_ms)
        selections.append((budget_ms, choose(auto, fit, validation, backbones, model, at_budget,
                                             at_budget.scaled_add_budget_s * (1 - CALIBRATION_RESERVE), speed,
                                             on_progress, cache)))
    rows: list[BenchmarkRow] = []

    def emit(row: BenchmarkRow) -> BenchmarkRow:
        on_row(row)
        rows.append(row)
        return row

    def judged(expert: Expert, spec: InputSpec, decision: ImageDecision, result: CandidateResult | None,
               fit_seconds: float, status: str, label: str | None = None) -> BenchmarkRow:
        name = expert.name if result is None else result.candidate.label  # an ensemble's label names its members
        row = _evaluate(category, expert, spec, decision, label or name, status, fit_seconds,
                        math.nan if result is None else result.score, len(fit), test, backbones, keys,
                        images.frames["calibration"], model, training)
        if result is not None:
            row = replace(row, chosen_expert=name, spec=_spec_text(result), estimated_ms_per_frame=result.ms_per_frame,
                          frame_budget_ms=frame_budgets_ms[0])
        return row

    def fit_here(name: str, spec: InputSpec, expert: Expert | None = None, orientations: int = 1) -> tuple[Expert, float]:
        """Candidates no automatic choice fitted (over budget, out of time, or outside its pool)."""
        expert = expert or build_expert(name, model)
        t0 = time.perf_counter()
        expert.fit(fit_batches(rotated(fit, orientations), spec, backbones, training.batch_size),
                   backbones.for_spec(spec.backbone))
        return expert, time.perf_counter() - t0

    # Every budget's verdict on every candidate gets a row; a candidate is run on test at most once. A
    # candidate one budget left unfitted may have been fitted at another: its row carries that fit's
    # validation score whatever the verdict.
    fitted_results = {result.candidate: result for _, selection in selections for result in selection.results
                      if not math.isnan(result.score)}
    by_candidate: dict[Candidate, BenchmarkRow] = {}
    for budget_ms, selection in selections:
        for result in selection.results:
            candidate = result.candidate
            if candidate not in by_candidate and candidate in cache and judge != "chosen":
                done = cache[candidate]
                by_candidate[candidate] = judged(done.expert, result.spec, done.judgement.decision,
                                                 fitted_results.get(candidate, result), done.wall_seconds, result.status)
            elif candidate not in by_candidate and result.status != "failed" and candidate not in cache \
                    and judge == "all" and not result.members:  # an ensemble is composed by a choice, not fitted here
                expert, seconds = fit_here(result.expert, result.spec, orientations=result.orientations)
                by_candidate[candidate] = judged(expert, result.spec, ImageDecision(), result, seconds, result.status)
            if candidate in by_candidate:
                emit(replace(by_candidate[candidate], status=result.status, frame_budget_ms=budget_ms))
            elif result.status != "failed":
                emit(replace(_untested(category, result, len(fit), len(test.frames)), frame_budget_ms=budget_ms))
    for name in (e for e in experts if e not in AUTO_EXPERTS):
        spec = candidate_specs(name, fit)[0]
        expert, fit_seconds = fit_here(name, spec)
        emit(judged(expert, spec, ImageDecision(), None, fit_seconds, "named"))
        if isinstance(expert, UCAD):  # the prompt ablation: the same knowledge without any prompt
            plain, plain_seconds = fit_here(name, spec, UCAD(replace(expert.config, prompt_epochs=0)))
            emit(judged(plain, spec, ImageDecision(), None, plain_seconds, "ablation", label="ucad (no prompt)"))
    for budget_ms, selection in selections:
        kept = selection.chosen.candidate
        if kept not in by_candidate:  # not tested among the candidates' rows: tested here, once
            done = cache[kept]
            by_candidate[kept] = judged(done.expert, selection.chosen.spec, done.judgement.decision, selection.chosen,
                                        done.wall_seconds, selection.chosen.status)
        chosen = by_candidate[kept]
        label = "auto" if budget_ms == frame_budgets_ms[0] else f"auto@{budget_ms:g}ms"
        emit(replace(chosen, expert=label, frame_budget_ms=budget_ms, status=selection.chosen.status))
    return _with_spearman(rows)


def _with_spearman(rows: list[BenchmarkRow]) -> list[BenchmarkRow]:
    """Every row of the category with the rank correlation of validation score and test AUROC over the
    fitted automatic candidates, each counted once whatever the budgets that judged it (NaN with fewer
    than three)."""
    fitted = list({(r.expert, r.spec): r for r in rows if not r.expert.startswith("auto")
                   and not math.isnan(r.validation_score) and not math.isnan(r.image_auroc)}.values())
    rho = float(spearmanr([r.validation_score for r in fitted], [r.image_auroc for r in fitted]).statistic) \
        if len(fitted) >= 3 else math.nan
    return [replace(r, validation_test_spearman=rho) for r in rows]


def _untested(category: str, result: CandidateResult, num_fit: int, num_test: int) -> BenchmarkRow:
    """A candidate not run on the test set: its verdict, validation score (NaN when it was not fitted)
    and estimated cost, no test metrics."""
    nan = math.nan
    return BenchmarkRow(category=category, expert=result.candidate.label, chosen_expert=result.candidate.label,
                        spec=_spec_text(result),
                        status=result.status, num_fit_images=num_fit, num_test_images=num_test, num_far_normals=0,
                        fit_seconds=result.measured_fit_seconds, ms_per_frame=nan, state_bytes=0,
                        validation_score=result.score,
                        image_auroc=nan, image_ap=nan, pixel_auroc=nan, aupro=nan, pixel_ap=nan, pixel_f1_max=nan,
                        recall_at_threshold=nan, far_at_threshold=nan, recall_at_1pct_far=nan, note=result.detail,
                        estimated_ms_per_frame=result.ms_per_frame)


def _spec_text(result: CandidateResult) -> str:
    return result.spec.describe() + (" + rotations" if result.orientations > 1 else "")


def _load_test(items, unused: Sequence[Path], min_side: int) -> _TestData:
    frames = [decode_image(item.path.read_bytes(), _MAX_PIXELS) for item in items]
    has_masks = any(item.mask_path is not None for item in items)
    masks = [read_mask(item.mask_path, frame.shape[:2]) for item, frame in zip(items, frames)] if has_masks else None
    extra, kept, _ = load_frames(unused, min_side)
    return _TestData(frames, [item.is_anomalous for item in items], [item.defect for item in items], masks, extra,
                     [_name(item.path) for item in items], [_name(path) for path in kept])


def _name(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


def _evaluate(category: str, expert: Expert, spec: InputSpec, decision: ImageDecision, label: str, status: str,
              fit_seconds: float, validation_score: float, num_fit: int, test: _TestData, backbones: Backbones,
              keys: np.ndarray, calibration_frames: list[np.ndarray], model: ModelConfig,
              training: TrainingConfig) -> BenchmarkRow:
    calibration, _ = calibrate(expert, spec, backbones, keys, calibration_frames, model, training, FAR_TARGET, decision)
    started = time.perf_counter()
    outputs = run_on_frames(expert, spec, backbones, test.frames, training.batch_size)
    scores = decision.scores(outputs.scores, outputs.maps)
    ms_per_frame = 1000 * (time.perf_counter() - started) / len(test.frames)
    extra = np.empty(0, dtype=np.float32)
    if test.extra_normals:
        extra_outputs = run_on_frames(expert, spec, backbones, test.extra_normals, training.batch_size)
        extra = decision.scores(extra_outputs.scores, extra_outputs.maps)
    # Operating point: every test anomaly against every available normal (test/good + held-back train/good).
    op_labels = test.labels + [False] * len(extra)
    op_scores = np.concatenate([scores, extra])
    point = operating_point(op_labels, op_scores, calibration.threshold)
    normals = np.concatenate([scores[[not label for label in test.labels]], extra])  # in test.normal_names() order
    pixels = _pixel_metrics(test.masks, outputs.maps)
    image = image_metrics(test.labels, scores)
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
        decision=decision.describe(), per_defect_type=_per_defect_type(test, scores, normals, calibration.threshold),
        per_defect_size=_per_defect_size(test, scores, normals, calibration.threshold),
        highest_normals=highest_normals(test.normal_names(), normals, calibration.threshold),
    )


def _per_defect_type(test: _TestData, scores: np.ndarray, normal: np.ndarray, threshold: float) -> dict:
    """Per test/<type>: image AUROC of its frames against every normal, and recall at the threshold."""
    out = {}
    for defect in sorted({d for d, label in zip(test.defect_types, test.labels) if label}):
        mine = scores[[d == defect for d in test.defect_types]]
        out[defect] = {"image_auroc": roc_auc([False] * len(normal) + [True] * len(mine), np.concatenate([normal, mine])),
                       "recall_at_threshold": float(np.mean(mine > threshold)), "count": int(len(mine))}
    return out


def size_bucket(share: float) -> str:
    """The DEFECT_SIZE_EDGES bucket of a mask covering `share` of its frame, e.g. '0.02-0.1%'."""
    edges = [0.0, *DEFECT_SIZE_EDGES]
    for low, high in zip(edges, DEFECT_SIZE_EDGES):
        if share < high:
            return f"< {high:.2%}" if low == 0 else f"{low:.2%}-{high:.2%}"
    return f">= {DEFECT_SIZE_EDGES[-1]:.2%}"


def _per_defect_size(test: _TestData, scores: np.ndarray, normals: np.ndarray, threshold: float) -> dict:
    """Per size bucket of the anomalies' masks (smallest first; none without masks): their count, recall at
    the threshold and at 1% false alarms over every normal. Which defects a line misses is often a size."""
    if test.masks is None:
        return {}
    cut = false_alarm_cut(normals, FAR_TARGET)
    anomalous = [i for i, label in enumerate(test.labels) if label and test.masks[i].any()]
    buckets: dict[str, list[float]] = {}
    for share, i in sorted((float(test.masks[i].mean()), i) for i in anomalous):
        buckets.setdefault(size_bucket(share), []).append(float(scores[i]))
    return {bucket: {"count": len(values), "recall_at_threshold": float(np.mean(np.greater(values, threshold))),
                     "recall_at_1pct_far": float(np.mean(np.greater(values, cut)))}
            for bucket, values in buckets.items()}


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
        "| category | expert | input spec | image decision | budget ms | choice | fit s | ms/frame (est.) | state MB | val score "
        "| image AUROC | pixel AUROC | AUPRO | pixel AP | recall @thr | FAR @thr | recall @1% FAR | FAR normals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**{r.expert} → {r.chosen_expert}**" if r.expert.startswith("auto") else r.expert
        cells = [_cell(r.fit_seconds, 1), f"{_cell(r.ms_per_frame, 0)} ({_cell(r.estimated_ms_per_frame, 0)})",
                 _cell(r.state_bytes / 1e6 if r.state_bytes else math.nan, 2),
                 _cell(r.validation_score), _cell(r.image_auroc), _cell(r.pixel_auroc), _cell(r.aupro), _cell(r.pixel_ap),
                 _cell(r.recall_at_threshold, 3), _cell(r.far_at_threshold, 3), _cell(r.recall_at_1pct_far, 3),
                 str(r.num_far_normals)]
        lines.append(f"| {r.category} | {name} | {r.spec} | {r.decision or 'n/a'} | {r.frame_budget_ms:g} | {r.status} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + _defect_lines(rows) + _notes(rows))


def _defect_lines(rows: Sequence[BenchmarkRow]) -> list[str]:
    """Of the automatic rows: per defect type, image AUROC / recall at the threshold; per defect size, recall
    at the threshold / at 1% false alarms; the normals that score highest (* above the threshold)."""
    auto = [r for r in rows if r.expert.startswith("auto") and r.per_defect_type]
    if not auto:
        return []
    lines = ["", "| category | row | defect type (count): image AUROC / recall @thr | defect size, share of the frame "
                 "(count): recall @thr / @1% FAR | highest-scoring normals (* above the threshold) |", "|---|---|---|---|---|"]
    for r in auto:
        types = ", ".join(f"{t} ({v['count']}): {_cell(v['image_auroc'], 3)} / {_cell(v['recall_at_threshold'], 2)}"
                          for t, v in r.per_defect_type.items())
        sizes = ", ".join(f"{b} ({v['count']}): {_cell(v['recall_at_threshold'], 2)} / {_cell(v['recall_at_1pct_far'], 2)}"
                          for b, v in r.per_defect_size.items()) or "n/a"
        normals = ", ".join(f"{n['image']} {n['score']:.4g}{'*' if n['above_threshold'] else ''}" for n in r.highest_normals)
        lines.append(f"| {r.category} | {r.expert} | {types} | {sizes} | {normals} |")
    return lines


def _notes(rows: Sequence[BenchmarkRow]) -> list[str]:
    spearman = {r.category: r.validation_test_spearman for r in rows}
    notes = [f"- {category}: Spearman(validation score, test image AUROC) over the fitted candidates = {_cell(rho, 3)}"
             for category, rho in spearman.items()]
    notes += [f"- {r.category} / {r.expert}: {r.note}" for r in rows if r.note]
    return [""] + notes


def rows_as_dicts(rows: Sequence[BenchmarkRow]) -> list[dict]:
    return [asdict(r) for r in rows]
