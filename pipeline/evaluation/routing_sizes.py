"""Routing at other key-pass sizes: does task identification hold when routing's ViT pass (DINOv2 ViT-S/14
to block 7) runs on a smaller square than `ModelConfig.image_size` (224)?

Measurement only: the product's routing is not changed. Every number goes through the code training and
the inspector use, with only `image_size` changed:
- keys: `routing_tokens` of the fit split, `select_keys` (farthest-point sampling), as `train_task`;
- bounds: the calibration split's distances to the task's own keys, made into the bound by
  `Calibration.from_normals` (slack x the highest), as `calibrate`; the split is `load_task_images`'
  seeded role split, so keys and bounds come from the frames training would use;
- identification: `KeyTaskIdentifier.identify` with the line's `routing_candidates`, as the inspector.

Per size and product, over the product's test frames (good and defective):
- task-ID accuracy with every product in the store (unknown counts as wrong, as in the continual benchmark);
- unknown rejection: the share of its frames called unknown by a store of every *other* product;
- margins from the exhaustive distances: nearest other task / own task, own task / own bound, and, in the
  store without the product, nearest task / that task's bound (above 1: rejected);
- the key pass's cost: tokens, counted GFLOP per frame (`pipeline.core.cost.counted`) and ms per frame
  measured on one thread (best of a few repeats; a shared machine makes it a rough figure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.calibration import Calibration
from pipeline.core.cost import counted
from pipeline.core.task_id import KeyTaskIdentifier, select_keys
from pipeline.core.training import load_frames, load_task_images, routing_tokens
from pipeline.data.datasets import SYNTHETIC_TEXTURES, discover_categories, labeled_test_images, write_synthetic_category
from pipeline.data.elpv import ELPV_CONTINUAL_CATEGORY, default_elpv_root, materialise_elpv
from pipeline.evaluation.continual import TaskSource
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig
from schemas.spec import routing_spec

log = logging.getLogger(__name__)
DEFAULT_SIZES = (112, 140, 168, 224)
TIMED_FRAMES = 8  # frames of one timed key pass
TIMING_REPEATS = 3
# Calibration.from_normals derives a threshold too; any valid target does, only its task bound is read here.
_ANY_FALSE_ALARM_RATE = 0.01


@dataclass(frozen=True)
class KeyPassCost:
    tokens: int  # patch tokens per frame
    gflop_per_frame: float  # counted by torch's FLOP counter (the ViT's matrix products)
    ms_per_frame: float  # measured, one torch thread, best of TIMING_REPEATS


@dataclass(frozen=True)
class RoutingRow:
    size: int  # requested square side; the pass runs at routing_spec(size)
    product: str
    frames: int  # test frames (good and defective)
    task_id_accuracy: float  # routed to its own task with every product stored
    unknown_rejection: float  # called unknown by a store without the product
    other_over_own_median: float  # distance to the nearest other task / to its own task
    other_over_own_p5: float
    own_over_bound_median: float  # distance to its own task / its own task's bound
    own_over_bound_p95: float
    left_out_over_bound_p5: float  # without the product stored: nearest task's distance / that task's bound
    tokens: int
    gflop_per_frame: float
    ms_per_frame: float


# ------------------------------------------------------------------------------------------ products
def product_sources(root: Path | None, elpv: bool, synthetic_dir: Path | None, seed: int) -> list[TaskSource]:
    """The MVTec-layout categories under `root`, the ELPV product (materialised into the cache root) and the
    synthetic texture categories (written under `synthetic_dir`), in that order."""
    sources = [TaskSource(c, root) for c in (discover_categories(root) if root is not None and root.is_dir() else [])]
    if elpv:
        materialise_elpv(default_elpv_root(), seed=seed)
        sources.append(TaskSource(ELPV_CONTINUAL_CATEGORY, default_elpv_root()))
    if synthetic_dir is not None:
        for texture in SYNTHETIC_TEXTURES:
            name = f"synthetic_{texture}"
            write_synthetic_category(synthetic_dir, name, texture, seed=seed)
            sources.append(TaskSource(name, synthetic_dir))
    return sources


def load_test_frames(source: TaskSource, training: TrainingConfig, cap: int | None, seed: int) -> list[np.ndarray]:
    """The product's decoded test frames, good and defective; a seeded sample of `cap` of them when capped."""
    paths = [item.path for item in labeled_test_images(source.root, source.category)]
    if cap is not None and cap < len(paths):
        chosen = np.random.default_rng(seed).choice(len(paths), size=cap, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    frames, _, _ = load_frames(paths, training.min_image_side)
    return frames


def sized(model: ModelConfig, size: int) -> ModelConfig:
    return model.model_copy(update={"image_size": size})


# ---------------------------------------------------------------------------------- keys and bounds
@dataclass
class RoutingStore:
    """Every product's keys and unknown bound at one key-pass size."""

    keys: dict[str, np.ndarray]
    bounds: dict[str, float]

    def identifier(self, model: ModelConfig, leave_out: str | None = None) -> KeyTaskIdentifier:
        names = [n for n in self.keys if n != leave_out]
        return KeyTaskIdentifier({n: self.keys[n] for n in names}, {n: self.bounds[n] for n in names},
                                 model.routing_candidates)


def own_distances(keys: np.ndarray, tokens: torch.Tensor) -> np.ndarray:
    """Each frame's distance to one task's keys, as `calibrate` measures it."""
    return KeyTaskIdentifier({"self": keys}, {"self": float("inf")}).distances(tokens)[:, 0].numpy()


def task_keys_and_bound(backbones: Backbones, frames: dict[str, list[np.ndarray]], model: ModelConfig,
                        training: TrainingConfig) -> tuple[np.ndarray, float]:
    """Keys from the fit split and the unknown bound from the calibration split, as training makes them."""
    keys = select_keys(routing_tokens(backbones, frames["fit"], model, training.batch_size), model.num_keys, model.seed)
    distances = own_distances(keys, routing_tokens(backbones, frames["calibration"], model, training.batch_size))
    calibration = Calibration.from_normals(distances, distances, distances, _ANY_FALSE_ALARM_RATE, model.unknown_slack)
    return keys, calibration.task_bound


def build_stores(sources: Sequence[TaskSource], backbones: Backbones, model: ModelConfig, training: TrainingConfig,
                 sizes: Sequence[int]) -> dict[int, RoutingStore]:
    """Per size, the keys and bounds of every product; each product's training frames are decoded once."""
    stores = {size: RoutingStore({}, {}) for size in sizes}
    for source in sources:
        images = load_task_images(source.root / source.category / "train" / "good", training, model.seed)
        for size in sizes:
            keys, bound = task_keys_and_bound(backbones, images.frames, sized(model, size), training)
            stores[size].keys[source.category], stores[size].bounds[source.category] = keys, bound
        log.info("%s: keys from %d fit frames, bounds from %d calibration frames at %s px", source.category,
                 len(images.frames["fit"]), len(images.frames["calibration"]), ", ".join(map(str, sizes)))
    return stores


# ------------------------------------------------------------------------------------------ cost
def key_pass_cost(backbones: Backbones, frames: Sequence[np.ndarray], model: ModelConfig) -> KeyPassCost:
    """Tokens, counted GFLOP and one-thread ms per frame of routing's pass over `frames` at model.image_size."""
    tokens, work = counted(lambda: routing_tokens(backbones, frames[:1], model, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one inference worker's share of the CPU
    try:
        seconds = min(_timed(lambda: routing_tokens(backbones, frames, model, len(frames))) for _ in range(TIMING_REPEATS))
    finally:
        torch.set_num_threads(threads)
    return KeyPassCost(tokens.shape[1], work.dense / 1e9, 1000 * seconds / len(frames))


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


# -------------------------------------------------------------------------------------- measuring
def product_row(store: RoutingStore, product: str, tokens: torch.Tensor, size: int, model: ModelConfig,
                cost: KeyPassCost) -> RoutingRow:
    """One product's routing at one size, from its test frames' routing tokens."""
    everyone, left_out = store.identifier(model), store.identifier(model, leave_out=product)
    known, without = everyone.identify(tokens), left_out.identify(tokens)
    distances = everyone.distances(tokens).numpy()  # exhaustive: every task, every patch
    own_column = everyone.names.index(product)
    own = distances[:, own_column]
    nearest_other = np.delete(distances, own_column, axis=1).min(axis=1) if distances.shape[1] > 1 else np.full_like(own, np.inf)
    left_out_ratio = _nearest_over_bound(left_out.distances(tokens).numpy(), [store.bounds[n] for n in left_out.names])
    other_over_own = nearest_other / np.maximum(own, 1e-12)
    own_over_bound = own / store.bounds[product]
    return RoutingRow(
        size=size, product=product, frames=len(tokens),
        task_id_accuracy=float(np.mean([m.category == product for m in known])),
        unknown_rejection=float(np.mean([m.category is None for m in without])),
        other_over_own_median=float(np.median(other_over_own)), other_over_own_p5=float(np.percentile(other_over_own, 5)),
        own_over_bound_median=float(np.median(own_over_bound)), own_over_bound_p95=float(np.percentile(own_over_bound, 95)),
        left_out_over_bound_p5=float(np.percentile(left_out_ratio, 5)),
        tokens=cost.tokens, gflop_per_frame=cost.gflop_per_frame, ms_per_frame=cost.ms_per_frame,
    )  # fmt: skip


def _nearest_over_bound(distances: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Per frame, the smallest distance / bound over the tasks: above 1 for every task means unknown."""
    if distances.shape[1] == 0:
        return np.full(distances.shape[0], np.inf)
    return (distances / np.asarray(bounds)[None, :]).min(axis=1)


def measure_routing_sizes(sources: Sequence[TaskSource], backbones: Backbones, model: ModelConfig,
                          training: TrainingConfig, sizes: Sequence[int] = DEFAULT_SIZES,
                          max_test_frames: int | None = None) -> list[RoutingRow]:
    """Rows by size, then product. `max_test_frames`: a seeded sample of each product's test frames."""
    if len(sources) < 2:
        raise ValueError("unknown rejection needs at least two products: a store without the one streamed")
    torch.manual_seed(model.seed)
    with torch.inference_mode():
        stores = build_stores(sources, backbones, model, training, sizes)
        costs: dict[int, KeyPassCost] = {}
        rows: list[RoutingRow] = []
        for source in sources:
            frames = load_test_frames(source, training, max_test_frames, model.seed)
            if not costs:  # the cost depends on the size, not on the frames: timed once, on the first product's
                costs = {size: key_pass_cost(backbones, frames[:TIMED_FRAMES], sized(model, size)) for size in sizes}
            for size in sizes:
                tokens = routing_tokens(backbones, frames, sized(model, size), training.batch_size)
                rows.append(product_row(stores[size], source.category, tokens, size, model, costs[size]))
            log.info("%s: %d test frames routed at %s px", source.category, len(frames), ", ".join(map(str, sizes)))
    return sorted(rows, key=lambda r: (sizes.index(r.size), [s.category for s in sources].index(r.product)))


# ------------------------------------------------------------------------------------------ reporting
_COLUMNS = ("key pass", "tokens", "GFLOP/frame", "ms/frame (1 thread)", "product", "test frames", "task-ID acc",
            "unknown rejected", "other/own median", "other/own p5", "own/bound median", "own/bound p95",
            "left out: nearest/bound p5")


def markdown_table(rows: Sequence[RoutingRow]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---" * len(_COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def _cells(r: RoutingRow) -> list[str]:
    side = routing_spec(r.size).height
    ratios = (r.other_over_own_median, r.other_over_own_p5, r.own_over_bound_median, r.own_over_bound_p95,
              r.left_out_over_bound_p5)
    return [f"{side}x{side}", str(r.tokens), f"{r.gflop_per_frame:.2f}", f"{r.ms_per_frame:.1f}", r.product, str(r.frames),
            f"{r.task_id_accuracy:.4f}", f"{r.unknown_rejection:.4f}", *(f"{v:.3f}" for v in ratios)]


def rows_as_dicts(rows: Sequence[RoutingRow]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["DEFAULT_SIZES", "KeyPassCost", "RoutingRow", "RoutingStore", "build_stores", "key_pass_cost", "markdown_table",
           "measure_routing_sizes", "product_row", "product_sources", "rows_as_dicts", "task_keys_and_bound", "load_test_frames"]
