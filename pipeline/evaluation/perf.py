"""Model-path performance: frames/s and per-stage latency of the live inspection path, in process.

`inspection perf` (tools/perf.py) prints these tables; the end-to-end run through Kafka is there too.

- **Model path**: JPEG bytes -> decode -> routing pass (ViT to the key block) -> key search -> each task's
  expert at its stored spec -> map PNG + boxes, exactly the calls an inference worker makes per batch
  (`Inspector.inspect`), timed per stage, for each batch size and number of tasks. The real tasks are
  fitted here on a few normal images of each category with the named expert at its first candidate spec
  (the spec the automatic choice tries first); more tasks are decoys (synthetic keys, `decoy_keys`) that
  frames never route to, so they cost the key search only, as other products' tasks do.
- **Compute bound**: the two networks every CPU frame meets, their FLOPs per frame and the rate they
  reach in fp32, channels-last and bf16 autocast, against this machine's matrix-multiply peak.
- **Routing at scale**: the key search alone (routing tokens precomputed) with 1 ... 1,000 tasks,
  exhaustive against the prototype shortlist, and on every frame whether the shortlist gives the
  exhaustive search's task and unknown decision.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import torch

from pipeline.core.expert_selection import default_candidates
from pipeline.core.inspector import Inspector, LoadedTask
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, select_keys
from pipeline.core.training import calibrate, routing_tokens
from pipeline.experts import build_expert
from pipeline.experts.frames import fit_batches
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import anomaly_map_to_png, decode_image, find_boxes
from schemas.config import ModelConfig, TrainingConfig
from schemas.store import TaskEntry

STAGES = ("decode", "features", "task_id", "expert", "encode")
_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class StageRow:
    batch_size: int
    tasks: int
    expert: str
    frames: int
    frames_per_second: float
    p50_ms: dict[str, float]  # per stage and "total", per batch
    p99_ms: dict[str, float]


@dataclass(frozen=True)
class RoutingRow:
    tasks: int
    frames: int
    exhaustive_ms_per_frame: float
    shortlist_ms_per_frame: float
    shortlist_ratio_to_one_task: float
    exhaustive_ratio_to_one_task: float
    same_task: int  # frames the exhaustive search calls known whose task the shortlist gives too
    known: int
    same_decision: int  # frames with the same known / unknown decision
    max_distance_error: float  # largest |shortlist - exhaustive| best distance over known frames


# ------------------------------------------------------------------------------------------ tasks
def fit_perf_task(category: str, images: Sequence[np.ndarray], expert_name: str, backbones: Backbones,
                  model: ModelConfig, training: TrainingConfig) -> LoadedTask:
    """One task fitted quickly: keys and the expert on the first half of `images` (the named expert at its
    first candidate spec), thresholds on the second half."""
    half = max(1, len(images) // 2)
    fit, calibration_frames = list(images[:half]), list(images[half:]) or list(images[:half])
    spec = default_candidates(fit, expert_name, None)[0].spec
    keys = select_keys(routing_tokens(backbones, fit, model, training.batch_size), model.num_keys, model.seed)
    expert = build_expert(expert_name, model)
    expert.fit(fit_batches(fit, spec, backbones, training.batch_size), backbones.for_spec(spec.backbone))
    calibration, _ = calibrate(expert, spec, backbones, keys, calibration_frames, model, training, 0.01)
    artifacts = TaskArtifacts(category, expert_name, keys, b"", calibration, {}, spec)
    entry = TaskEntry(category=category, task_version=1, expert=expert_name, blobs={}, blob_sizes={},
                      published_at=datetime.now(timezone.utc))
    return LoadedTask(entry, artifacts, expert)


def decoy_keys(real: dict[str, np.ndarray], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` synthetic tasks: a real task's keys moved by seeded Gaussian noise (per dimension, the
    spread of its keys) and shifted by a random direction of the same size, so that each decoy is a
    distinct product as far from the real ones as they are from each other."""
    rng = np.random.default_rng(seed)
    names = sorted(real)
    decoys = {}
    for i in range(count):
        source = real[names[i % len(names)]]
        spread = float(source.std())
        shift = rng.normal(0.0, spread, size=source.shape[1])
        decoys[f"decoy-{i:04d}"] = (source + rng.normal(0.0, spread, size=source.shape) + shift).astype(np.float32)
    return decoys


def with_decoys(tasks: dict[str, LoadedTask], total: int, seed: int = 0) -> dict[str, LoadedTask]:
    """The real tasks plus decoys up to `total`; a decoy shares its source's expert and calibration."""
    real = {name: task.artifacts.keys for name, task in tasks.items()}
    out = dict(tasks)
    sources = sorted(tasks)
    for i, (name, keys) in enumerate(decoy_keys(real, max(0, total - len(tasks)), seed).items()):
        source = tasks[sources[i % len(sources)]]
        out[name] = LoadedTask(source.entry.model_copy(update={"category": name}),
                               replace(source.artifacts, category=name, keys=keys), source.expert)
    return out


# ------------------------------------------------------------------------------------- model path
def time_model_path(inspector: Inspector, jpegs: Sequence[bytes], batch_size: int, min_frames: int,
                    expert: str) -> StageRow:
    """Batches of `batch_size` frames (cycling through `jpegs`) until `min_frames` were inspected, after
    one untimed batch (first-call allocations)."""
    _inspect_once(inspector, jpegs[:batch_size])
    per_stage: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    done = 0
    while done < min_frames:
        batch = [jpegs[(done + i) % len(jpegs)] for i in range(batch_size)]
        for stage, ms in _inspect_once(inspector, batch).items():
            per_stage[stage].append(ms)
        done += batch_size
    total_s = sum(per_stage["total"]) / 1000
    return StageRow(batch_size, len(inspector.tasks), expert, done, done / total_s,
                    {s: float(np.percentile(v, 50)) for s, v in per_stage.items()},
                    {s: float(np.percentile(v, 99)) for s, v in per_stage.items()})


def _inspect_once(inspector: Inspector, jpegs: Sequence[bytes]) -> dict[str, float]:
    started = time.perf_counter()
    images = [decode_image(data, _MAX_PIXELS) for data in jpegs]
    decoded = time.perf_counter()
    inspections, timings = inspector.inspect(images)
    inspected = time.perf_counter()
    for image, inspection in zip(images, inspections):
        if inspection.score_map is not None:
            anomaly_map_to_png(inspection.score_map, image.shape[:2], inspection.map_max_score)
            find_boxes(inspection.score_map, inspection.pixel_threshold, image.shape[:2])
    encoded = time.perf_counter()
    return {"decode": 1000 * (decoded - started), "features": timings.features_ms, "task_id": timings.task_id_ms,
            "expert": timings.expert_ms, "encode": 1000 * (encoded - inspected), "total": 1000 * (encoded - started)}


# ------------------------------------------------------------------------------------------- routing
def time_routing(tokens: torch.Tensor, keys: dict[str, np.ndarray], bounds: dict[str, float],
                 task_counts: Sequence[int], candidates: int, batch_size: int = 16, repeats: int = 3,
                 seed: int = 0, timing_frames: int = 128) -> list[RoutingRow]:
    """The key search alone over `tokens` (N x P x D routing tokens of real frames) with the real tasks
    plus decoys up to each count: exhaustive vs shortlist, agreement on every frame, and the time per frame
    (best of `repeats` over the first `timing_frames`) in batches of `batch_size`."""
    rows = []
    base: tuple[float, float] | None = None
    for count in task_counts:
        bank = dict(keys) if count >= len(keys) else {n: keys[n] for n in sorted(keys)[:count]}
        decoys = decoy_keys(keys, count - len(bank), seed)
        bank.update(decoys)
        task_bounds = {**bounds, **{n: bounds[sorted(keys)[i % len(keys)]] for i, n in enumerate(decoys)}}
        exhaustive = KeyTaskIdentifier(bank, task_bounds, candidates=max(1, count))
        shortlist = KeyTaskIdentifier(bank, task_bounds, candidates=candidates)
        full, short = _matches(exhaustive, tokens, batch_size), _matches(shortlist, tokens, batch_size)
        timed = tokens[:timing_frames]
        full_s = _best_time(exhaustive, timed, batch_size, repeats) / len(timed)
        short_s = _best_time(shortlist, timed, batch_size, repeats) / len(timed)
        known = [i for i, m in enumerate(full) if m.category is not None]
        base = base or (full_s, short_s)
        rows.append(RoutingRow(
            tasks=count, frames=len(full), exhaustive_ms_per_frame=1000 * full_s,
            shortlist_ms_per_frame=1000 * short_s,
            shortlist_ratio_to_one_task=short_s / base[1], exhaustive_ratio_to_one_task=full_s / base[0],
            same_task=sum(short[i].category == full[i].category for i in known), known=len(known),
            same_decision=sum((a.category is None) == (b.category is None) for a, b in zip(full, short)),
            max_distance_error=max((abs(short[i].distance - full[i].distance) for i in known), default=0.0),
        ))
    return rows


def _matches(identifier: KeyTaskIdentifier, tokens: torch.Tensor, batch_size: int) -> list:
    return [m for start in range(0, len(tokens), batch_size) for m in identifier.identify(tokens[start : start + batch_size])]


def _best_time(identifier: KeyTaskIdentifier, tokens: torch.Tensor, batch_size: int, repeats: int) -> float:
    return min(_timed(lambda: _matches(identifier, tokens, batch_size)) for _ in range(repeats))


# ----------------------------------------------------------------------------------------- tables
def stage_table(rows: Sequence[StageRow]) -> str:
    stages = (*STAGES, "total")
    header = "| batch | tasks | expert | frames | frames/s | " + " | ".join(f"{s} p50/p99 ms" for s in stages) + " |"
    lines = [header, "|" + "---|" * (5 + len(stages))]
    for r in rows:
        cells = " | ".join(f"{r.p50_ms[s]:.1f} / {r.p99_ms[s]:.1f}" for s in stages)
        lines.append(f"| {r.batch_size} | {r.tasks} | {r.expert} | {r.frames} | {r.frames_per_second:.2f} | {cells} |")
    return "\n".join(lines)


def routing_table(rows: Sequence[RoutingRow], candidates: int) -> str:
    lines = [f"| tasks | frames | exhaustive ms/frame | x 1 task | shortlist ({candidates}) ms/frame | x 1 task "
             "| same task (known frames) | same known/unknown | max distance error |", "|" + "---|" * 9]
    lines += [f"| {r.tasks} | {r.frames} | {r.exhaustive_ms_per_frame:.3f} | {r.exhaustive_ratio_to_one_task:.2f} "
              f"| {r.shortlist_ms_per_frame:.3f} | {r.shortlist_ratio_to_one_task:.2f} | {r.same_task}/{r.known} "
              f"| {r.same_decision}/{r.frames} | {r.max_distance_error:.2e} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ compute bound
@dataclass(frozen=True)
class ComputeRow:
    network: str
    input_hw: tuple[int, int]
    variant: str  # fp32, fp32 channels-last, bf16 autocast
    gflop_per_frame: float
    ms_per_frame: float
    gflops: float  # achieved
    fraction_of_gemm_peak: float


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """This machine's matrix-multiply rate at the current thread count: the ceiling for any network here."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def time_networks(backbones: Backbones, cnn_hw: tuple[int, int], batch_size: int = 8, repeats: int = 3
                  ) -> tuple[list[ComputeRow], dict[str, float]]:
    """The two networks every CPU frame meets (routing's ViT to the key block at 224, the expert's CNN at
    its canvas), in fp32, channels-last and bf16 autocast: ms and achieved GFLOP/s against the GEMM peak."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.features.backbone import KEY_LAYER

    backbone = backbones.default
    vit_input = torch.rand(batch_size, 3, 224, 224)
    cnn_input = torch.rand(batch_size, 3, *cnn_hw)
    cases = {
        "ViT-S/14 to block 7": (vit_input, lambda x, net: backbone.vit.multi_layer_tokens(x, (KEY_LAYER,))),
        f"{backbone.cnn_name} stages 1-4": (cnn_input, lambda x, net: net(x)),
    }
    checkpoint_form = copy.deepcopy(backbone.net).to(memory_format=torch.contiguous_format)
    peaks = {"fp32": gemm_peak_gflops(torch.float32), "bf16": gemm_peak_gflops(torch.bfloat16)}
    rows = []
    for network, (pixels, run) in cases.items():
        is_cnn = "stages" in network
        channels_last = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                run(pixels, checkpoint_form)
            gflop = counter.get_total_flops() / 1e9 / batch_size
            variants = {"fp32": (pixels, checkpoint_form, nullcontext)}
            if is_cnn:
                variants["fp32 channels-last"] = (channels_last, backbone.net, nullcontext)
                variants["fp32 channels-last, norms folded (used)"] = (channels_last, backbone.inference_net, nullcontext)
            bf16_net = backbone.inference_net if is_cnn else None
            variants["bf16 autocast"] = (channels_last if is_cnn else pixels, bf16_net,
                                         lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            for variant, (x, net, context) in variants.items():
                with context():
                    run(x, net)
                    seconds = min(_timed(lambda: run(x, net)) for _ in range(repeats)) / batch_size
                peak = peaks["bf16" if variant.startswith("bf16") else "fp32"]
                rows.append(ComputeRow(network, tuple(pixels.shape[-2:]), variant, gflop, 1000 * seconds,
                                       gflop / seconds, gflop / seconds / peak))
    return rows, peaks


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def compute_table(rows: Sequence[ComputeRow], peaks: dict[str, float]) -> str:
    lines = [f"GEMM peak here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
             f"({torch.get_num_threads()} threads)", "",
             "| network | input | variant | GFLOP/frame | ms/frame | GFLOP/s | of GEMM peak |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.network} | {r.input_hw[0]}x{r.input_hw[1]} | {r.variant} | {r.gflop_per_frame:.2f} | {r.ms_per_frame:.1f} "
              f"| {r.gflops:.0f} | {r.fraction_of_gemm_peak:.0%} |" for r in rows]
    return "\n".join(lines)
