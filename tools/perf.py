"""`inspection perf`: the speed tables, in process (the model path) and through Kafka (end to end).

Parts (`--part`, default all):
- `compute`: FLOPs per frame of the ViT and the CNN and the rate they reach (fp32, channels-last, bf16)
  against this machine's matrix-multiply peak: what bounds frames/s on a CPU;
- `routing`: the key search alone with 1 ... 1,000 tasks, exhaustive vs the prototype shortlist, and
  whether they agree on every frame of the categories (pipeline.evaluation.perf.time_routing);
- `model`: decode -> routing -> task id -> expert -> encode per batch, against batch size, number of
  tasks and expert, on `--device` (cpu or cuda);
- `kafka`: a stack of its own, one synthetic task, inference workers (real processes, exactly-once),
  frames published at once: frames/s and p50/p99 of each stage as the results report them (CPU only:
  the GPU machine has no Java).
Frames are the categories' test images (`--dataset-root`, MVTec layout) or, without that folder,
synthetic categories from CC0 textures.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.expert_selection import default_candidates
from pipeline.core.inspector import Inspector
from pipeline.core.training import load_frames, routing_tokens
from pipeline.data.datasets import SYNTHETIC_TEXTURES, labeled_test_images, list_images, write_synthetic_category
from pipeline.evaluation.perf import (
    compute_table,
    fit_perf_task,
    routing_table,
    stage_table,
    time_model_path,
    time_networks,
    time_routing,
    with_decoys,
)
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

log = logging.getLogger(__name__)
KAFKA_STAGES = ("decode_ms", "features_ms", "task_id_ms", "expert_ms", "encode_ms", "end_to_end_ms")


@dataclass(frozen=True)
class PerfOptions:
    parts: tuple[str, ...] = ("compute", "routing", "model", "kafka")
    dataset_root: Path = Path("../shared/datasets")
    categories: tuple[str, ...] = ("magnetic_tile", "ball_screw")
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    task_counts: tuple[int, ...] = (1, 10, 100, 1000)
    experts: tuple[str, ...] = ("patchcore",)
    fit_images: int = 24
    frames: int = 64  # per model-path row
    routing_frames: int = 0  # 0: every test frame of the categories
    kafka_frames: int = 160
    kafka_workers: int = 2


def run_perf(options: PerfOptions) -> str:
    with tempfile.TemporaryDirectory(prefix="perf-") as folder:
        root, categories = _data(options, Path(folder))
        model, training = ModelConfig(), TrainingConfig()
        sections = []
        backbones = Backbones.pretrained(options.device) if {"compute", "routing", "model"} & set(options.parts) else None
        if "compute" in options.parts:
            sections.append(_compute(root, categories[-1], backbones, model, options))
        if "routing" in options.parts:
            sections.append(_routing(root, categories, backbones, model, training, options))
        if "model" in options.parts:
            sections.append(_model_path(root, categories, backbones, model, training, options))
        if "kafka" in options.parts:
            sections.append(_kafka(options))
    return "\n\n".join(sections)


def _data(options: PerfOptions, scratch: Path) -> tuple[Path, list[str]]:
    found = [c for c in options.categories if (options.dataset_root / c / "train" / "good").is_dir()]
    if found:
        return options.dataset_root, found
    log.info("no categories under %s: synthesising two from CC0 textures", options.dataset_root)
    names = list(SYNTHETIC_TEXTURES[:2])
    for name in names:
        write_synthetic_category(scratch, name, name, n_train=options.fit_images, n_test_good=16, n_test_defect=16)
    return scratch, names


def _fit_images(root: Path, category: str, count: int, model: ModelConfig) -> list[np.ndarray]:
    paths = list_images(root / category / "train" / "good")
    chosen = [paths[i] for i in np.random.default_rng(model.seed).permutation(len(paths))[:count]]
    return load_frames(chosen, 32)[0]


def _compute(root: Path, category: str, backbones: Backbones, model: ModelConfig, options: PerfOptions) -> str:
    spec = default_candidates(_fit_images(root, category, 4, model), "patchcore", None)[0].spec
    rows, peaks = time_networks(backbones, (spec.height, spec.width))
    return f"### Compute bound on {options.device} (batch 8; the CNN at {category}'s PatchCore canvas)\n\n" + compute_table(rows, peaks)


def _routing(root: Path, categories: list[str], backbones: Backbones, model: ModelConfig,
             training: TrainingConfig, options: PerfOptions) -> str:
    keys, bounds, tokens = {}, {}, []
    for category in categories:
        task = fit_perf_task(category, _fit_images(root, category, options.fit_images, model), "patchcore",
                             backbones, model, training)
        keys[category], bounds[category] = task.artifacts.keys, task.artifacts.calibration.task_bound
        items = labeled_test_images(root, category)
        if options.routing_frames:
            items = items[: options.routing_frames]
        frames = load_frames([item.path for item in items], 32)[0]
        tokens.append(routing_tokens(backbones, frames, model, training.batch_size))
    rows = time_routing(torch.cat(tokens), keys, bounds, options.task_counts, model.routing_candidates)
    return (f"### Routing: the key search alone ({', '.join(categories)}; {rows[0].frames} frames; "
            f"{torch.get_num_threads()} threads)\n\n" + routing_table(rows, model.routing_candidates))


def _model_path(root: Path, categories: list[str], backbones: Backbones, model: ModelConfig,
                training: TrainingConfig, options: PerfOptions) -> str:
    """Per category and expert: the batch sizes at 10 tasks (or the fewest asked above 1), then the task
    counts at batch 16 (or the largest batch asked below it)."""
    rows = []
    tasks_for_batches = min([c for c in options.task_counts if c > 1] or [1])
    batch_for_tasks = max([b for b in options.batch_sizes if b <= 16] or [min(options.batch_sizes)])
    for category in categories:
        jpegs = [item.path.read_bytes() for item in labeled_test_images(root, category)][: max(options.batch_sizes) * 2]
        fit = _fit_images(root, category, options.fit_images, model)
        for expert in options.experts:
            task = fit_perf_task(category, fit, expert, backbones, model, training)
            log.info("%s on %s at %s", expert, category, task.spec.describe())
            plan = [(b, tasks_for_batches) for b in options.batch_sizes]
            plan += [(batch_for_tasks, c) for c in options.task_counts if c != tasks_for_batches]
            for batch_size, count in plan:
                inspector = Inspector(backbones, model, batch_size=max(options.batch_sizes))
                inspector.set_tasks(with_decoys({category: task}, count), version=1)
                row = time_model_path(inspector, jpegs, batch_size, max(options.frames, batch_size), expert)
                rows.append((category, task.spec.describe(), row))
                log.info("model path %s: %s", category, row)
    lines = [f"### Model path on {options.device} ({torch.get_num_threads()} threads; ms per batch)", ""]
    for category in categories:
        mine = [r for c, _, r in rows if c == category]
        specs = sorted({spec for c, spec, _ in rows if c == category})
        lines += [f"{category} (expert at {', '.join(specs)}):", "", stage_table(mine), ""]
    return "\n".join(lines).rstrip()


def _kafka(options: PerfOptions) -> str:
    from tools.delivery_bench import bench_line

    lines = [f"### End to end through Kafka (CPU, {options.kafka_workers} inference workers of 1 thread, exactly-once, "
             f"{options.kafka_frames} frames published at once)", "",
             "| max batch | frames/s | missing | duplicates | " + " | ".join(f"{s[:-3]} p50/p99 ms" for s in KAFKA_STAGES) + " |",
             "|" + "---|" * (4 + len(KAFKA_STAGES))]
    with bench_line() as bench:
        bench.add_task()
        for batch in sorted({min(b, 64) for b in options.batch_sizes if b > 1} or {8}):
            bench.start_inference("exactly_once", options.kafka_workers, ("--max-batch-size", str(batch)))
            results, duplicates, seconds = bench.stream(options.kafka_frames)
            bench.stop_inference()
            cells = []
            for stage in KAFKA_STAGES:
                values = [getattr(r.latency, stage) for r in results.values() if getattr(r.latency, stage) is not None]
                cells.append(f"{np.percentile(values, 50):.1f} / {np.percentile(values, 99):.1f}" if values else "n/a")
            lines.append(f"| {batch} | {len(results) / seconds:.2f} | {options.kafka_frames - len(results)} | {duplicates} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)
