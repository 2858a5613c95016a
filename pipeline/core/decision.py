"""How a task turns its expert's output into the frame's image score: the image decision.

An expert's own image score is one choice. Where a defect is found on the map but drowned by normal
variation elsewhere, a score read from the map does better:
- the aggregation: the expert's own score, the map's maximum, or the mean of its top 1% of cells, each on
  the map averaged onto a coarse grid (at most GRID_LONG_SIDE cells on the long side: a smoothing of its
  own, and cheap);
- position-aware: for aligned products (every frame of one size), each grid cell z-scored by the mean and
  spread of normal frames' maps at that cell, so a place that always scores high (an edge, a thread, a
  reflection) stops dominating the maximum. The statistics come from the task's statistics split: normal
  frames that neither built the expert nor judge the choice.

Which decision a task uses is chosen on validation (normal frames plus synthetic anomalies) and stored
with the task; calibration and the live path apply the same decision. A task stored without one uses the
expert's own score, as it always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common.serialization import pack, unpack
from pipeline.data.metrics import roc_auc

Aggregation = Literal["expert", "max", "top_k_mean"]
AGGREGATIONS: tuple[Aggregation, ...] = ("expert", "max", "top_k_mean")
GRID_LONG_SIDE = 96
TOP_K_FRACTION = 0.01
# A cell whose normal maps barely vary would turn noise into huge z-scores: its spread is floored at
# this share of the median spread over the grid.
SPREAD_FLOOR = 0.1
# A decision other than the expert's own score must beat the simpler ones before it by this much validation
# image AUROC: a few dozen validation frames cannot tell smaller gains from noise.
MIN_GAIN = 0.005


def grid_shape(height: int, width: int, long_side: int = GRID_LONG_SIDE) -> tuple[int, int]:
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_grid(score_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The map averaged onto `grid` cells (area average)."""
    tensor = torch.from_numpy(np.require(score_map, np.float32, ["C", "W"]))[None, None]  # writable: torch warns otherwise
    return F.adaptive_avg_pool2d(tensor, grid)[0, 0].numpy()


@dataclass(frozen=True)
class MapStatistics:
    """Per-cell mean and (floored) spread of normal frames' maps on one grid."""

    mean: np.ndarray
    spread: np.ndarray

    @classmethod
    def from_maps(cls, maps: Sequence[np.ndarray]) -> "MapStatistics":
        if len(maps) < 2:
            raise ValueError("per-position statistics need the maps of at least two normal frames")
        grid = grid_shape(*maps[0].shape[:2])
        cells = np.stack([to_grid(m, grid) for m in maps]).astype(np.float64)
        spread = cells.std(axis=0)
        spread = np.maximum(spread, SPREAD_FLOOR * float(np.median(spread)) + 1e-12)
        return cls(cells.mean(axis=0).astype(np.float32), spread.astype(np.float32))

    def z(self, score_map: np.ndarray) -> np.ndarray:
        return (to_grid(score_map, self.mean.shape) - self.mean) / self.spread


@dataclass(frozen=True)
class ImageDecision:
    aggregation: Aggregation = "expert"
    statistics: MapStatistics | None = None  # position-aware when set

    def describe(self) -> str:
        if self.aggregation == "expert":
            return "expert score"
        return ("position-aware " if self.statistics is not None else "") + self.aggregation.replace("_", " ")

    def scores(self, expert_scores: np.ndarray, maps: Sequence[np.ndarray]) -> np.ndarray:
        """N image scores of the frames whose expert scores and frame-resolution maps are given."""
        if self.aggregation == "expert":
            return np.asarray(expert_scores, dtype=np.float32)
        return np.array([self._aggregate(self._cells(m)) for m in maps], dtype=np.float32)

    def _cells(self, score_map: np.ndarray) -> np.ndarray:
        if self.statistics is not None:
            return self.statistics.z(score_map)
        return to_grid(score_map, grid_shape(*score_map.shape[:2]))

    def _aggregate(self, cells: np.ndarray) -> float:
        values = cells.ravel()
        if self.aggregation == "max":
            score = float(values.max())
        else:
            k = max(1, int(round(TOP_K_FRACTION * values.size)))
            score = float(np.partition(values, values.size - k)[-k:].mean())
        # z-scores can fall below zero; thresholds assume positive raw scores: softplus is monotone and positive
        return float(np.logaddexp(0.0, score)) if self.statistics is not None else score

    def to_bytes(self) -> bytes:
        arrays = {} if self.statistics is None else {"mean": self.statistics.mean, "spread": self.statistics.spread}
        return pack({"aggregation": self.aggregation, "top_k_fraction": TOP_K_FRACTION}, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageDecision":
        meta, arrays = unpack(data)
        if meta["aggregation"] not in AGGREGATIONS:
            raise ValueError(f"unknown image decision {meta['aggregation']!r}")
        statistics = MapStatistics(arrays["mean"], arrays["spread"]) if "mean" in arrays else None
        return cls(meta["aggregation"], statistics)


def candidate_decisions(statistics: MapStatistics | None) -> list[ImageDecision]:
    """In the order choose_decision prefers them. Without statistics: simplest first (the expert's own
    score, then map aggregations). With them (an aligned product), the position-aware ones first: a
    product whose frames line up has places that always score high, and on each aligned product measured
    (ball screws, commutators, tyres) z-scoring per position raised recall at 1% false alarms; a plain
    decision must then beat them clearly, as a map decision must beat the expert's score otherwise."""
    plain = [ImageDecision(aggregation) for aggregation in AGGREGATIONS]
    if statistics is None:
        return plain
    return [ImageDecision(aggregation, statistics) for aggregation in AGGREGATIONS if aggregation != "expert"] + plain


def choose_decision(labels: Sequence[bool], expert_scores: np.ndarray, maps: Sequence[np.ndarray],
                    statistics: MapStatistics | None) -> tuple[ImageDecision, dict[str, float]]:
    """The decision with the best validation image AUROC, trying them in candidate_decisions' order (a
    later one must beat the kept one by MIN_GAIN), and every decision's AUROC by its description."""
    aurocs: dict[str, float] = {}
    best, best_auroc = None, -np.inf
    for decision in candidate_decisions(statistics):
        auroc = roc_auc(labels, decision.scores(expert_scores, maps))
        aurocs[decision.describe()] = auroc
        if best is None or (not np.isnan(auroc) and auroc > best_auroc + MIN_GAIN):
            best, best_auroc = decision, (auroc if not np.isnan(auroc) else -np.inf)
    return best, aurocs
