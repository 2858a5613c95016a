from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.data.metrics import (
    accuracy,
    average_precision,
    f1_max,
    image_metrics,
    latency_summary,
    pixel_metrics,
    resize_to,
    roc_auc,
)
from schemas.messages import Decision


@pytest.mark.parametrize("seed", range(10))
def test_roc_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False  # both classes present
    # Rounded scores: many ties, within and across classes.
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), 1)
    expected = roc_auc_score(labels, scores)
    assert roc_auc(labels.tolist(), scores.tolist()) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_edge_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([], []))
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, float("nan")])


def test_accuracy() -> None:
    assert accuracy([True, False, True, True], [True, True, True, False]) == 0.5
    assert accuracy([Decision.OK, Decision.DEFECTIVE], [Decision.OK, Decision.DEFECTIVE]) == 1.0
    assert accuracy(["a", "b", None], ["a", "c", None]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_latency_summary() -> None:
    values = list(range(1, 101))
    summary = latency_summary(values)
    assert summary == {
        "p50": pytest.approx(np.percentile(values, 50)),
        "p95": pytest.approx(np.percentile(values, 95)),
        "mean": 50.5,
        "max": 100.0,
    }
    assert all(math.isnan(v) for v in latency_summary([]).values())
    assert set(latency_summary([3.0])) == {"p50", "p95", "mean", "max"}


def _tied_scores(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Rounded scores: many ties within and across classes."""
    return np.round(rng.normal(size=labels.shape) + labels * rng.uniform(0, 2), 1)


def _f1_max_brute_force(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    best = 0.0
    for p, r in zip(precision, recall):
        if p + r > 0:
            best = max(best, 2 * p * r / (p + r))
    return best


@pytest.mark.parametrize("seed", range(10))
def test_average_precision_and_f1_max_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    scores = _tied_scores(rng, labels)
    assert average_precision(labels.tolist(), scores.tolist()) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert f1_max(labels, scores) == pytest.approx(_f1_max_brute_force(labels, scores), abs=1e-12)
    metrics = image_metrics(labels, scores)
    assert metrics == {
        "image_auroc": pytest.approx(roc_auc_score(labels, scores), abs=1e-12),
        "image_ap": pytest.approx(average_precision_score(labels, scores), abs=1e-12),
        "image_f1_max": pytest.approx(_f1_max_brute_force(labels, scores), abs=1e-12),
    }


def test_ranking_metric_edge_cases() -> None:
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    # All tied: one threshold, precision = prevalence, recall = 1.
    assert average_precision([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    assert f1_max([0, 1, 0, 1], [5, 5, 5, 5]) == pytest.approx(2 * 0.5 / 1.5)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert math.isnan(f1_max([], []))
    assert math.isnan(image_metrics([1, 1], [0.1, 0.2])["image_auroc"])
    assert image_metrics([1, 1], [0.1, 0.2])["image_ap"] == 1.0
    with pytest.raises(ValueError):
        average_precision([0, 1], [0.1])
    with pytest.raises(ValueError):
        f1_max([0, 1], [0.1, float("nan")])


def _blob_masks(rng: np.random.Generator, count: int, normal_every: int = 3) -> list[np.ndarray]:
    """Masks of various sizes with a few rectangular/disc blobs; every `normal_every`-th is empty."""
    masks = []
    for index in range(count):
        height, width = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        mask = np.zeros((height, width), dtype=bool)
        if index % normal_every != 0:
            yy, xx = np.mgrid[:height, :width]
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.integers(0, height), rng.integers(0, width)
                radius = rng.uniform(1.5, 7)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        masks.append(mask)
    return masks


def _noisy_maps(rng: np.random.Generator, masks: list[np.ndarray], signal: float) -> list[np.ndarray]:
    return [
        (rng.normal(size=m.shape) + signal * ndimage.gaussian_filter(m.astype(float), 1.5)).astype(np.float32)
        for m in masks
    ]


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_ap_f1_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 12)
    maps = _noisy_maps(rng, masks, signal=2.0)
    if seed % 2:  # many ties within and across classes
        maps = [np.round(m, 1) for m in maps]
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    metrics = pixel_metrics(masks, maps)
    assert set(metrics) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert metrics["pixel_f1_max"] == pytest.approx(_f1_max_brute_force(labels, scores), abs=1e-6)


def _aupro_reference(
    masks: list[np.ndarray], maps: list[np.ndarray], thresholds: np.ndarray, fpr_limit: float = 0.3
) -> float:
    """Slow, independent AUPRO: explicit loop over thresholds, per-region overlaps, trapezoid to limit."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    negatives = sum(int((~m).sum()) for m in masks)
    fprs, pros = [], []
    for threshold in np.sort(thresholds)[::-1]:
        false_positives, overlaps = 0, []
        for regions, mask, score_map in zip(labelled, masks, maps):
            above = score_map >= threshold
            false_positives += int((above & ~mask).sum())
            for region_id in range(1, regions.max() + 1):
                region = regions == region_id
                overlaps.append(above[region].mean())
        fprs.append(false_positives / negatives)
        pros.append(np.mean(overlaps))
    fprs, pros = np.array([0.0, *fprs]), np.array([0.0, *pros])
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    following = int(np.argmax(~keep))  # first point beyond the limit
    if x[-1] < fpr_limit:
        x0, x1, y0, y1 = fprs[following - 1], fprs[following], pros[following - 1], pros[following]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 6)
    maps = _noisy_maps(rng, masks, signal=2.5)
    scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.quantile(scores, np.linspace(0, 1, 2000))
    expected = _aupro_reference(masks, maps, thresholds)
    assert 0.2 < expected < 0.95
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx(expected, abs=1e-2)


def test_aupro_exact_on_few_distinct_scores() -> None:
    # With few distinct scores, looping over each of them gives the exact curve: tight agreement.
    rng = np.random.default_rng(7)
    masks = _blob_masks(rng, 6)
    maps = [np.round(m, 0) for m in _noisy_maps(rng, masks, signal=2.5)]
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))
    for fpr_limit in (0.05, 0.3, 1.0):
        expected = _aupro_reference(masks, maps, thresholds, fpr_limit)
        assert pixel_metrics(masks, maps, fpr_limit=fpr_limit)["aupro"] == pytest.approx(expected, abs=1e-9)


def test_perfect_and_random_maps() -> None:
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 9)
    perfect = pixel_metrics(masks, [m.astype(np.float32) for m in masks])
    assert perfect == {"pixel_auroc": 1.0, "pixel_ap": 1.0, "pixel_f1_max": 1.0, "aupro": pytest.approx(1.0)}
    random = pixel_metrics(masks, [rng.random(m.shape) for m in masks])
    assert random["pixel_auroc"] == pytest.approx(0.5, abs=0.05)
    assert random["aupro"] < 0.3  # about (0.3 / 2) / 0.3 = 0.15 when PRO(t) ~ FPR(t)
    assert random["aupro"] == pytest.approx(0.15, abs=0.06)


def test_low_resolution_maps_are_resized_to_masks() -> None:
    # Each mask is a block-aligned upsampling of a coarse one; a coarse map that is perfect at its own
    # resolution stays (near) perfect after bilinear upsampling to the mask size.
    rng = np.random.default_rng(5)
    masks, maps = [], []
    for index in range(6):
        coarse = np.zeros((8, 10), dtype=bool)
        if index % 3:
            coarse[rng.integers(1, 6), rng.integers(1, 7)] = True
            coarse[rng.integers(1, 6) :, 8] = True
        fine = np.kron(coarse, np.ones((16, 16), dtype=bool))
        masks.append(fine)
        maps.append(ndimage.gaussian_filter(coarse.astype(np.float32), 0.3))
    metrics = pixel_metrics(masks, maps)
    assert metrics["aupro"] > 0.95
    assert metrics["pixel_auroc"] > 0.98
    # The metrics really are computed on the resized maps.
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([resize_to(s, m.shape).ravel() for s, m in zip(maps, masks)])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert resize_to(maps[0], (128, 160)).shape == (128, 160)


def test_empty_masks_contribute_only_negatives() -> None:
    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, 6, normal_every=2)
    maps = _noisy_maps(rng, masks, signal=2.0)
    base = pixel_metrics(masks, maps)
    # A normal image whose every pixel outscores everything: only false positives get added.
    hot = np.full((40, 30), max(float(m.max()) for m in maps) + 1, dtype=np.float32)
    with_normal = pixel_metrics([*masks, np.zeros((40, 30), dtype=bool)], [*maps, hot])
    labels = np.concatenate([*(m.ravel() for m in masks), np.zeros(1200, dtype=bool)])
    scores = np.concatenate([*(m.ravel() for m in maps), hot.ravel()])
    assert with_normal["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert with_normal["pixel_ap"] < base["pixel_ap"]
    assert with_normal["aupro"] < base["aupro"]
    # Only normal images: no positive pixel, no region -> undefined metrics, no crash.
    only_normal = pixel_metrics([np.zeros((5, 5), dtype=bool)], [rng.random((5, 5))])
    assert all(math.isnan(v) for v in only_normal.values())


def test_pixel_metrics_validation() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError):
        pixel_metrics([mask], [])
    with pytest.raises(ValueError):
        pixel_metrics([mask], [np.full((4, 4), np.nan)])
    with pytest.raises(ValueError):
        pixel_metrics([mask], [np.zeros((2, 2, 2))])
    with pytest.raises(ValueError):
        pixel_metrics([mask], [np.zeros((4, 4))], fpr_limit=0.0)
