"""Continual benchmark: learn tasks one after another, and after each new task evaluate every task seen so
far with the task of every frame inferred from the keys (never given), against the oracle that is told
the task.

Per step t and seen task j: image AUROC, pixel AUROC, pixel AP (full-resolution masks; NaN for a task
without pixel masks), the operating point (recall and false-alarm rate at the routed task's calibrated
threshold, recall at 1% false alarms from the ROC; false alarms on the task's test/good frames) and
task-ID accuracy (a frame counts as identified only when routed to its own task; `unknown` counts as wrong). A
frame routed to another task is scored by that task's expert, on the calibrated scale (0 at the routed
task's median normal score, 1 at its threshold; maps divided by its pixel threshold), so scores from
different experts are comparable. The oracle scores every frame with its own task on the same scale.

Forgetting FM = mean over all tasks but the last of (best score at an earlier step - final score); for
the false-alarm rate, where lower is better, (final - lowest earlier).

Tasks are frozen once trained (that is the method: a new task trains only its own keys, prompt and
knowledge), so an expert's output on a frame depends only on the (task, frame) pair. Outputs are
therefore computed once per pair and reused at later steps; only the routing is recomputed. The run
checks that premise: every earlier task's serialised bytes are hashed after each step and must not
change, and the first task's outputs are recomputed at the end and must match.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier
from pipeline.core.training import routing_tokens, train_task
from pipeline.data.datasets import labeled_test_images, read_mask
from pipeline.data.metrics import operating_point, pixel_metrics, recall_at_false_alarm_rate, roc_auc
from pipeline.experts import Expert, load_expert
from pipeline.experts.frames import run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import ModelConfig, TrainingConfig

log = logging.getLogger(__name__)
_MAX_PIXELS = 100_000_000
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "recall_at_threshold", "far_at_threshold", "recall_at_1pct_far",
           "task_id_accuracy")
LOWER_IS_BETTER = frozenset({"far_at_threshold"})


@dataclass(frozen=True)
class TaskSource:
    category: str
    root: Path  # MVTec layout: root/category/{train/good,test,ground_truth}


@dataclass
class TestSet:
    """One task's test frames, decoded once, with routing's key tokens (the same at every step)."""

    frames: list[np.ndarray]
    tokens: torch.Tensor  # N x P x D routing tokens
    labels: list[bool]
    masks: list[np.ndarray] | None  # full resolution; None: the task has no pixel masks

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass
class StepResult:
    step: int  # 0-based index of the task just added
    added: str
    train_seconds: float
    task_bytes: int
    rows: dict[str, dict[str, float]]  # seen task -> METRICS
    expert: str = ""  # the expert the task got (the automatic choice's, unless one was named)
    spec: str = ""  # its input spec


@dataclass
class ContinualReport:
    tasks: list[str]
    expert: str
    steps: list[StepResult] = field(default_factory=list)
    oracle: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metrics with task given
    final_average: dict[str, float] = field(default_factory=dict)
    oracle_average: dict[str, float] = field(default_factory=dict)
    forgetting: dict[str, float] = field(default_factory=dict)  # FM per metric
    task_id_timing: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ContinualRun:
    """Holds the tasks learnt so far and the (task, frame) output cache of one benchmark run."""

    def __init__(self, backbones: Backbones, model: ModelConfig, training: TrainingConfig, expert: str | None,
                 false_alarm_rate: float, max_train_images: int | None):
        self.backbones, self.model, self.training = backbones, model, training
        self.expert_name, self.far, self.max_train_images = expert, false_alarm_rate, max_train_images
        self.artifacts: dict[str, TaskArtifacts] = {}
        self.experts: dict[str, Expert] = {}
        self.digests: dict[str, str] = {}
        self.tests: dict[str, TestSet] = {}
        self._outputs: dict[tuple[str, str], tuple[np.ndarray, list[np.ndarray]]] = {}  # (task, test set)

    # ------------------------------------------------------------------------------------ learning
    def add_task(self, source: TaskSource) -> tuple[float, int]:
        """Learn one task; returns (seconds, stored bytes)."""
        started = time.perf_counter()
        artifacts = train_task(source.category, source.root / source.category / "train" / "good", self.expert_name,
                               self.backbones, self.model, self.training, self.far, self.max_train_images,
                               on_progress=lambda fraction, message: log.info("%s: %s", source.category, message))
        seconds = time.perf_counter() - started
        self.artifacts[source.category] = artifacts
        self.experts[source.category] = load_expert(artifacts.expert_name, artifacts.expert_state)
        self.digests[source.category] = task_digest(artifacts)
        self.tests[source.category] = self._embed_test_set(source)
        self._check_frozen()
        return seconds, sum(len(b) for b in artifacts.blobs().values())

    def _check_frozen(self) -> None:
        for name, artifacts in self.artifacts.items():
            if task_digest(artifacts) != self.digests[name]:
                raise AssertionError(f"task {name!r} changed after it was learnt")

    def _embed_test_set(self, source: TaskSource) -> TestSet:
        items = labeled_test_images(source.root, source.category)
        frames = [decode_image(item.path.read_bytes(), _MAX_PIXELS) for item in items]
        has_masks = any(item.mask_path is not None for item in items)
        masks = [read_mask(item.mask_path, f.shape[:2]) for item, f in zip(items, frames)] if has_masks else None
        tokens = routing_tokens(self.backbones, frames, self.model, self.training.batch_size)
        return TestSet(frames, tokens, [item.is_anomalous for item in items], masks)

    # ---------------------------------------------------------------------------------- evaluation
    def outputs(self, task: str, test_set: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Calibrated scores and maps of every frame of `test_set` under `task`'s expert (cached)."""
        key = (task, test_set)
        if key not in self._outputs:
            self._outputs[key] = self.compute_outputs(task, test_set)
        return self._outputs[key]

    def compute_outputs(self, task: str, test_set: str) -> tuple[np.ndarray, list[np.ndarray]]:
        expert, artifacts = self.experts[task], self.artifacts[task]
        calibration = artifacts.calibration
        output = run_on_frames(expert, artifacts.input_spec, self.backbones, self.tests[test_set].frames, self.training.batch_size)
        raw = artifacts.image_decision.scores(output.scores, output.maps)
        scores = [calibration.normalise(float(s)) for s in raw]
        maps = [m / max(calibration.pixel_threshold, 1e-12) for m in output.maps]
        return np.asarray(scores, dtype=np.float64), maps

    def route(self, test_set: str) -> tuple[list[str], list[bool]]:
        """Per frame: the task whose expert scores it (the nearest one, even when beyond every bound),
        and whether identification was right (unknown = wrong)."""
        identifier = KeyTaskIdentifier(
            {n: a.keys for n, a in self.artifacts.items()}, {n: a.calibration.task_bound for n, a in self.artifacts.items()}
        )
        routed, correct = [], []
        tokens = self.tests[test_set].tokens
        for start in range(0, len(tokens), self.training.batch_size):
            for match in identifier.identify(tokens[start : start + self.training.batch_size]):
                routed.append(match.nearest)
                correct.append(match.category == test_set)
        return routed, correct

    def evaluate(self, test_set: str, routed: Sequence[str] | None) -> dict[str, float]:
        """Metrics of one test set; `routed` None = the oracle (every frame to its own task)."""
        test = self.tests[test_set]
        routed = list(routed) if routed is not None else [test_set] * test.size
        scores = np.empty(test.size)
        maps: list[np.ndarray] = [np.empty(0)] * test.size
        for task in set(routed):
            task_scores, task_maps = self.outputs(task, test_set)
            for i, r in enumerate(routed):
                if r == task:
                    scores[i], maps[i] = task_scores[i], task_maps[i]
        pixels = pixel_metrics(test.masks, maps) if test.masks is not None else {"pixel_auroc": math.nan, "pixel_ap": math.nan}
        # Calibrated scale: 1 is the routed task's own threshold, so a frame is flagged when its score > 1.
        point = operating_point(test.labels, scores, 1.0)
        return {"image_auroc": roc_auc(test.labels, scores), "pixel_auroc": pixels["pixel_auroc"], "pixel_ap": pixels["pixel_ap"],
                "recall_at_threshold": point["recall"], "far_at_threshold": point["false_alarm_rate"],
                "recall_at_1pct_far": recall_at_false_alarm_rate(test.labels, scores, 0.01)}


def task_digest(artifacts: TaskArtifacts) -> str:
    digest = hashlib.sha256()
    for name, blob in sorted(artifacts.blobs().items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
    return digest.hexdigest()


def run_continual_benchmark(
    sources: Sequence[TaskSource],
    backbones: Backbones,
    model: ModelConfig,
    training: TrainingConfig,
    expert: str | None,
    false_alarm_rate: float = 0.01,
    max_train_images: int | None = None,
    timing_tasks: Sequence[int] = (1, 10, 100),
    on_step: Callable[[StepResult], None] = lambda step: None,
) -> ContinualReport:
    run = ContinualRun(backbones, model, training, expert, false_alarm_rate, max_train_images)
    report = ContinualReport(tasks=[s.category for s in sources], expert=expert or "auto")
    for step, source in enumerate(sources):
        seconds, task_bytes = run.add_task(source)
        rows = {}
        for seen in report.tasks[: step + 1]:
            routed, correct = run.route(seen)
            rows[seen] = run.evaluate(seen, routed) | {"task_id_accuracy": float(np.mean(correct))}
        artifacts = run.artifacts[source.category]
        result = StepResult(step, source.category, seconds, task_bytes, rows, artifacts.expert_name,
                            artifacts.input_spec.describe())
        report.steps.append(result)
        on_step(result)
    first = report.tasks[0]
    cached = run.outputs(first, first)
    fresh = run.compute_outputs(first, first)
    if not np.allclose(cached[0], fresh[0], rtol=1e-5, atol=1e-6):
        raise AssertionError(f"task {first!r} scores its own frames differently after {len(sources) - 1} more tasks")
    report.oracle = {t: run.evaluate(t, None) | {"task_id_accuracy": 1.0} for t in report.tasks}
    report.final_average = _average(report.steps[-1].rows)
    report.oracle_average = _average(report.oracle)
    report.forgetting = forgetting(report.steps, report.tasks)
    report.task_id_timing = time_task_identification(run, timing_tasks)
    return report


def _average(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over tasks, leaving out NaN (a task without pixel masks has no pixel metrics)."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in rows.values() if not math.isnan(r[m])]
        out[m] = float(np.mean(values)) if values else math.nan
    return out


def forgetting(steps: Sequence[StepResult], tasks: Sequence[str]) -> dict[str, float]:
    """FM per metric: mean over tasks except the last of (best earlier score - final score)."""
    final = steps[-1].rows
    fm = {}
    for metric in METRICS:
        drops = []
        for j, task in enumerate(tasks[:-1]):
            earlier = [steps[t].rows[task][metric] for t in range(j, len(steps) - 1)]
            if math.isnan(final[task][metric]):
                continue
            if metric in LOWER_IS_BETTER:
                drops.append(final[task][metric] - min(earlier))
            else:
                drops.append(max(earlier) - final[task][metric])
        fm[metric] = float(np.mean(drops)) if drops else 0.0
    return fm


# ------------------------------------------------------------------------------ task-ID timing
def time_task_identification(run: ContinualRun, task_counts: Sequence[int], frames: int = 32, repeats: int = 3) -> list[dict]:
    """Per-frame cost of task identification with 1, 10, 100 ... tasks: the ViT pass to the key layer
    plus the vectorised key search, and the search alone. Real tasks' keys, topped up with synthetic
    tasks (keys of a real task shifted by seeded noise) when more are asked for than were learnt."""
    first = next(iter(run.tests.values()))
    images = first.frames[:frames]
    tokens = first.tokens[:frames]
    rows = []
    for count in task_counts:
        keys, bounds = synthetic_task_keys(run.artifacts, count, seed=0)
        identifier = KeyTaskIdentifier(keys, bounds)
        search = _best_of(repeats, lambda: identifier.identify(tokens))
        full = _best_of(repeats, lambda: identifier.identify(routing_tokens(run.backbones, images, run.model, len(images))))
        rows.append({"tasks": count, "keys": count * run.model.num_keys, "frames": len(images),
                     "search_ms_per_frame": 1000 * search / len(images), "total_ms_per_frame": 1000 * full / len(images)})
    base = rows[0]
    for row in rows:
        row["search_ratio"] = row["search_ms_per_frame"] / base["search_ms_per_frame"]
        row["total_ratio"] = row["total_ms_per_frame"] / base["total_ms_per_frame"]
    return rows


def synthetic_task_keys(artifacts: dict[str, TaskArtifacts], count: int, seed: int) -> tuple[dict, dict]:
    names = sorted(artifacts)
    keys, bounds = {}, {}
    rng = np.random.default_rng(seed)
    for i in range(count):
        source = artifacts[names[i % len(names)]]
        if i < len(names):
            keys[names[i]], bounds[names[i]] = source.keys, source.calibration.task_bound
        else:
            noise = rng.normal(0, source.keys.std(), size=source.keys.shape).astype(np.float32)
            keys[f"synthetic-{i:03d}"], bounds[f"synthetic-{i:03d}"] = source.keys + noise, source.calibration.task_bound
    return keys, bounds


def _best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            work()
        best = min(best, time.perf_counter() - started)
    return best


# ------------------------------------------------------------------------------------ reporting
_HEADERS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP",
            "recall_at_threshold": "recall @thr", "far_at_threshold": "FAR @thr", "recall_at_1pct_far": "recall @1% FAR",
            "task_id_accuracy": "task-ID acc"}


def _cells(values: dict[str, float]) -> str:
    return " | ".join("n/a" if math.isnan(values[m]) else f"{values[m]:.4f}" for m in METRICS)


def markdown_report(report: ContinualReport) -> str:
    header = " | ".join(_HEADERS[m] for m in METRICS)
    rule = "|---" * (len(METRICS) + 2) + "|"
    lines = [f"Tasks, in order: {', '.join(report.tasks)}; expert: {report.expert}", "",
             f"| after task | task | {header} |", rule]
    for step in report.steps:
        for task, r in step.rows.items():
            lines.append(f"| {step.step + 1}. {step.added} | {task} | {_cells(r)} |")
    lines += ["", f"| | | {header} |", rule]
    for label, values in (("continual (final average)", report.final_average), ("oracle (task given)", report.oracle_average),
                          ("forgetting FM", report.forgetting)):
        lines.append(f"| {label} | | {_cells(values)} |")
    lines += ["", "| tasks learnt | expert | input spec | train s | task bytes |", "|---|---|---|---|---|"]
    lines += [f"| {s.step + 1}. {s.added} | {s.expert} | {s.spec} | {s.train_seconds:.1f} | {s.task_bytes / 1e6:.2f} MB |"
              for s in report.steps]
    lines += ["", "| tasks | keys | search ms/frame | x 1 task | ViT key pass + search ms/frame | x 1 task |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['tasks']} | {r['keys']} | {r['search_ms_per_frame']:.3f} | {r['search_ratio']:.2f} "
              f"| {r['total_ms_per_frame']:.2f} | {r['total_ratio']:.2f} |" for r in report.task_id_timing]
    return "\n".join(lines)
