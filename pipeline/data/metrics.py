"""Offline metrics: image-level ROC AUC / AP / F1-max, pixel-level AUROC / AP / F1-max / AUPRO,
accuracy and latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from pipeline.features.imaging import resize_map


def roc_auc(labels: Sequence[bool | int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (positive = anomalous = truthy label); NaN with a single class.

    Mann-Whitney U from ranks, tied scores sharing their mid-rank, which equals the trapezoidal AUC.
    """
    positive, values = _check_binary_scores(labels, scores)
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


# ---------------------------------------------------------------------------------------------
# Ranking metrics (AP, F1-max) and pixel-level / AUPRO metrics.
#
# Every ranking metric here is computed from a "ranked count table": for each distinct threshold,
# in DESCENDING score order, how many positives and negatives have exactly that score. Ties therefore
# move together (one curve point per distinct score), which is how scikit-learn defines its curves.
# Image level builds the table exactly (np.unique). Pixel level builds it from a fine histogram.
# ---------------------------------------------------------------------------------------------

PIXEL_BINS = 1 << 20
"""Histogram bins for pixel metrics (linear between the global min and max score).

Choice: quantising into 2**20 bins instead of sorting all pixels. It is O(pixels) with one
`np.bincount` per image, streams image by image (memory is a few 8 MiB histograms plus one image,
whatever the number of images: 600 x 1130x460 = 312 M pixels would need ~4 GB for an argsort), and
needs no global sort. The cost is that scores closer than (max - min) / 2**20 share a bin and are
treated as tied; on realistic maps this changes AUROC/AP/F1/AUPRO by far less than 1e-3 (the tests
check 1e-6 against scikit-learn). Distinct scores at least one bin width apart stay distinct, so
scores with a few repeated values (e.g. rounded) are handled exactly. Resolution only degrades if a
few extreme outliers stretch the range by orders of magnitude; pass a larger `bins` if needed.
"""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_binary_scores(
    labels: Sequence[bool | int], scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    positive = np.asarray(labels).astype(bool).ravel()
    values = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != values.shape:
        raise ValueError(f"{positive.size} labels but {values.size} scores")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    return positive, values


def _ranked_counts(positive: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per distinct score, highest score first (exact, for small inputs)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    pos = np.bincount(inverse.ravel(), weights=positive.astype(np.float64), minlength=distinct.size)
    total = np.bincount(inverse.ravel(), minlength=distinct.size).astype(np.float64)
    return pos[::-1], (total - pos)[::-1]


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Trapezoidal ROC AUC (ties -> diagonal segments, i.e. mid-ranks); NaN with a single class."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr = np.concatenate(([0.0], np.cumsum(pos) / n_pos))
    fpr = np.concatenate(([0.0], np.cumsum(neg) / n_neg))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _cumulative_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(positives, true positives, predicted positives) at each threshold "score >= t", highest first."""
    tp = np.cumsum(pos)
    return float(pos.sum()), tp, tp + np.cumsum(neg)


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn's definition)."""
    n_pos, tp, predicted = _cumulative_counts(pos, neg)
    if n_pos == 0:
        return float("nan")
    hit = pos > 0  # only thresholds where recall increases contribute; predicted > 0 there
    return float(np.sum(pos[hit] / n_pos * (tp[hit] / predicted[hit])))


def _f1_max_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """max over thresholds "score >= t" of F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)."""
    n_pos, tp, predicted = _cumulative_counts(pos, neg)
    if n_pos == 0:
        return float("nan")
    return float(np.max(2.0 * tp / (predicted + n_pos)))


def average_precision(labels: Sequence[bool | int], scores: Sequence[float]) -> float:
    """Average precision as sklearn.metrics.average_precision_score (step-wise, no interpolation).

    One precision/recall point per distinct score (ties together); NaN without any positive.
    """
    return _ap_from_counts(*_ranked_counts(*_check_binary_scores(labels, scores)))


def f1_max(labels: Sequence[bool | int], scores: Sequence[float]) -> float:
    """Best F1 over all thresholds "score >= t" (t = each distinct score); NaN without any positive."""
    return _f1_max_from_counts(*_ranked_counts(*_check_binary_scores(labels, scores)))


def image_metrics(labels: Sequence[bool | int], scores: Sequence[float]) -> dict[str, float]:
    """Image-level `image_auroc`, `image_ap` and `image_f1_max` (positive = anomalous), all exact."""
    positive, values = _check_binary_scores(labels, scores)
    pos, neg = _ranked_counts(positive, values)
    return {
        "image_auroc": _auroc_from_counts(pos, neg),
        "image_ap": _ap_from_counts(pos, neg),
        "image_f1_max": _f1_max_from_counts(pos, neg),
    }


def resize_to(score_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear float32 resize of a 2-D map to hw = (H, W) (no-op when already that size)."""
    return resize_map(score_map, (int(hw[0]), int(hw[1])))


def _aupro_from_counts(neg: np.ndarray, pro_weight: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """Normalised area under PRO(FPR) from FPR 0 to fpr_limit; one curve point per distinct score."""
    n_neg = neg.sum()
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    fpr = np.concatenate(([0.0], np.clip(np.cumsum(neg) / n_neg, 0.0, 1.0)))
    pro = np.concatenate(([0.0], np.clip(np.cumsum(pro_weight) / n_regions, 0.0, 1.0)))
    return _partial_trapezoid(fpr, pro, fpr_limit) / fpr_limit


def _partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of the curve (x non-decreasing, x[0] = 0) up to x_max, interpolating there."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points x[:k] lie at or before x_max
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_max:  # x[k] > x_max > x[k-1]: cut the segment at x_max
        y_cut = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_cut)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def pixel_metrics(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    bins: int = PIXEL_BINS,
) -> dict[str, float]:
    """Pixel-level `pixel_auroc`, `pixel_ap`, `pixel_f1_max` and `aupro` over a set of images.

    masks: full-resolution ground truth, one bool (H, W) array per image (sizes may differ; all False
    for a normal image, whose pixels are then all negatives). maps: one float (h, w) anomaly map per
    image, resized bilinearly to its mask's size first (`resize_to`).

    AUPRO (Bergmann et al., MVTec AD): each 8-connected component of each mask is a region; at a
    threshold t, a region's overlap is the fraction of its pixels with score >= t, PRO(t) is the mean
    over all regions of all images, and FPR(t) the fraction of all GT-negative pixels with score >= t.
    PRO is integrated over FPR by trapezoids from 0 to fpr_limit (cut exactly at fpr_limit) and
    divided by fpr_limit, so a perfect map scores 1.0 and a random one about fpr_limit / 2.
    Computed without a threshold loop: each positive pixel carries weight 1 / (its region's size),
    so sum of weights above t over n_regions is PRO(t); a weighted histogram gives the whole curve.

    Scores are quantised into `bins` linear bins between the global min and max score (see
    PIXEL_BINS for why and what it costs); one pass over the images, memory independent of their
    number. Metrics that are undefined (no positive pixel, or no negative one) are NaN.
    """
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    # Bilinear interpolation is a convex combination of input values, so the raw maps' range bounds
    # the resized maps' range: one cheap pass over the small maps fixes the histogram edges.
    low, high = np.inf, -np.inf
    for index, score_map in enumerate(maps):
        score_map = np.asarray(score_map)
        if score_map.ndim != 2 or score_map.size == 0:
            raise ValueError(f"map {index} must be a non-empty 2-D array, got shape {score_map.shape}")
        map_low, map_high = float(np.min(score_map)), float(np.max(score_map))
        if not (np.isfinite(map_low) and np.isfinite(map_high)):
            raise ValueError(f"map {index} contains NaN or infinite scores")
        low, high = min(low, map_low), max(high, map_high)
    scale = (bins - 1) / (high - low) if high > low else 0.0

    pos = np.zeros(bins, dtype=np.int64)
    neg = np.zeros(bins, dtype=np.int64)
    pro_weight = np.zeros(bins, dtype=np.float64)
    n_regions = 0
    for index, (mask, score_map) in enumerate(zip(masks, maps)):
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.ndim != 2:
            raise ValueError(f"mask {index} must be 2-D, got shape {mask.shape}")
        resized = resize_to(np.asarray(score_map, dtype=np.float32), mask.shape)
        scaled = (resized.astype(np.float64) - low) * scale
        bin_index = np.clip(scaled, 0, bins - 1).astype(np.intp)  # float32 round-off: clip
        neg += np.bincount(bin_index[~mask], minlength=bins)
        if not mask.any():
            continue
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_size = np.bincount(regions.ravel())
        positive_bins = bin_index[mask]
        pos += np.bincount(positive_bins, minlength=bins)
        pro_weight += np.bincount(positive_bins, weights=1.0 / region_size[regions[mask]], minlength=bins)
        n_regions += count

    # Highest score first, empty bins dropped (they would add duplicate curve points only).
    occupied = (pos + neg)[::-1] > 0
    pos_desc = pos[::-1][occupied].astype(np.float64)
    neg_desc = neg[::-1][occupied].astype(np.float64)
    return {
        "pixel_auroc": _auroc_from_counts(pos_desc, neg_desc),
        "pixel_ap": _ap_from_counts(pos_desc, neg_desc),
        "pixel_f1_max": _f1_max_from_counts(pos_desc, neg_desc),
        "aupro": _aupro_from_counts(neg_desc, pro_weight[::-1][occupied], n_regions, fpr_limit),
    }


# ---------------------------------------------------------------------------------------------
# Operating points: what a deployed threshold does, and the best recall a false-alarm budget allows.
# ---------------------------------------------------------------------------------------------


def operating_point(labels: Sequence[bool | int], scores: Sequence[float], threshold: float) -> dict[str, float]:
    """`recall` and `false_alarm_rate` of the decision "score > threshold" (strictly, as the pipeline
    flags a frame). Recall is over the positives (anomalous), the false-alarm rate over the negatives
    (normal); each is NaN when its class is empty."""
    positive, values = _check_binary_scores(labels, scores)
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    flagged = values > threshold
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return {
        "recall": float(flagged[positive].sum() / n_pos) if n_pos else float("nan"),
        "false_alarm_rate": float(flagged[~positive].sum() / n_neg) if n_neg else float("nan"),
    }


def recall_at_false_alarm_rate(labels: Sequence[bool | int], scores: Sequence[float], far: float = 0.01) -> float:
    """Highest recall over the ROC points whose false-alarm rate on the negatives is <= `far`.

    The ROC has one point per distinct score t (decision "score >= t", tied scores move together, as
    sklearn.metrics.roc_curve with drop_intermediate=False) plus the point (0, 0) of flagging nothing,
    so the result is 0.0 when even the highest score costs more false alarms than `far` allows. Every
    point is reachable by the pipeline's strict rule "score > threshold" with a threshold just below
    t (np.nextafter(t, -np.inf)). NaN when either class is empty.
    """
    far = _check_far(far)
    positive, values = _check_binary_scores(labels, scores)
    if positive.all() or not positive.any():
        return float("nan")
    return float(np.mean(values[positive] > false_alarm_cut(values[~positive], far)))


def false_alarm_cut(normal_scores: Sequence[float], far: float = 0.01) -> float:
    """The score a frame must exceed to be flagged at the ROC point recall_at_false_alarm_rate picks:
    the highest normal score that point leaves unflagged (-inf when `far` allows flagging every normal).
    So the recall of any subset of anomalies at that point is mean(scores > cut), e.g. per defect size."""
    far = _check_far(far)
    normals = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if normals.size == 0 or np.isnan(normals).any():
        raise ValueError("false_alarm_cut needs at least one normal score, none NaN")
    counts = np.arange(normals.size + 1)
    allowed = int(counts[counts / normals.size <= far].max())  # the same comparison as the ROC's
    return float(normals[allowed]) if allowed < normals.size else -math.inf


def _check_far(far: float) -> float:
    far = float(far)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    return far
