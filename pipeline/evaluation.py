"""Offline metrics: image-level ROC AUC, accuracy and latency percentiles."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: Sequence[bool | int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (positive = anomalous = truthy label); NaN with a single class.

    Mann-Whitney U from ranks, tied scores sharing their mid-rank, which equals the trapezoidal AUC.
    """
    positive = np.asarray(labels).astype(bool).ravel()
    values = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != values.shape:
        raise ValueError(f"{positive.size} labels but {values.size} scores")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(values)  # 'average' method = mid-ranks for ties
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def accuracy(pred: Sequence, truth: Sequence) -> float:
    """Fraction of equal pairs; NaN when empty. Works for bools, ints, strings and enums."""
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} predictions but {len(truth)} truths")
    if len(pred) == 0:
        return float("nan")
    return sum(bool(p == t) for p, t in zip(pred, truth)) / len(pred)


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p95, mean and max in milliseconds (all NaN when there is no value)."""
    values = np.asarray(values_ms, dtype=np.float64).ravel()
    if values.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "max": float("nan")}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }
