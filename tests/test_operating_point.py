"""Operating-point metrics: the strict decision rule, NaN for empty classes, the ROC-based recall at a
false-alarm budget against scikit-learn on data with ties, and the score cut of that ROC point."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pipeline.data.metrics import false_alarm_cut, operating_point, recall_at_false_alarm_rate


def test_operating_point_is_strict_and_counts_per_class() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.5, 0.9, 0.5, 0.7, 0.2]
    # 0.5 itself is not flagged: only 0.9 among the negatives, 0.7 among the positives
    assert operating_point(labels, scores, 0.5) == {"recall": 1 / 3, "false_alarm_rate": 1 / 4}
    just_below = float(np.nextafter(0.5, -np.inf))
    assert operating_point(labels, scores, just_below) == {"recall": 2 / 3, "false_alarm_rate": 3 / 4}
    assert operating_point(labels, scores, 1.0) == {"recall": 0.0, "false_alarm_rate": 0.0}
    assert operating_point(labels, scores, -math.inf) == {"recall": 1.0, "false_alarm_rate": 1.0}


def test_operating_point_nan_for_an_empty_class() -> None:
    only_normal = operating_point([False, False], [0.2, 0.8], 0.5)
    assert math.isnan(only_normal["recall"]) and only_normal["false_alarm_rate"] == 0.5
    only_anomalous = operating_point([True, True, True, True], [0.2, 0.8, 0.9, 0.1], 0.5)
    assert only_anomalous["recall"] == 0.5 and math.isnan(only_anomalous["false_alarm_rate"])
    with pytest.raises(ValueError):
        operating_point([0, 1], [0.1], 0.5)


def _sklearn_recall_at(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= far].max())


@pytest.mark.parametrize("seed", range(20))
def test_recall_at_false_alarm_rate_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.6)
    labels[:2] = [True, False]  # both classes present
    # rounded scores: many ties, some of them across the two classes
    scores = np.round(rng.normal(labels * rng.uniform(0.5, 2.0), 1.0), int(rng.integers(0, 2)))
    for far in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0):
        assert recall_at_false_alarm_rate(labels, scores, far) == _sklearn_recall_at(labels, scores, far)


def test_recall_at_false_alarm_rate_edges_and_consistency_with_operating_point() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.8, 0.9, 0.95, 0.25])
    # ties at 0.8 move together: admitting the positive at 0.8 brings in a negative (FAR 1/4)
    assert recall_at_false_alarm_rate(labels, scores, 0.0) == 0.5
    assert recall_at_false_alarm_rate(labels, scores, 0.25) == 0.75
    assert recall_at_false_alarm_rate(labels, scores, 0.49) == 0.75
    assert recall_at_false_alarm_rate(labels, scores, 0.5) == 1.0  # the positive at 0.25 costs 0.3
    # the tied top score: at far = 0 nothing can be flagged
    assert recall_at_false_alarm_rate([0, 1], [0.5, 0.5], 0.0) == 0.0
    # the strict rule reaches the ROC point just below the score
    point = operating_point(labels, scores, float(np.nextafter(0.8, -np.inf)))
    assert point == {"recall": 0.75, "false_alarm_rate": 0.25}
    assert math.isnan(recall_at_false_alarm_rate([1, 1], [0.1, 0.2]))
    assert math.isnan(recall_at_false_alarm_rate([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError):
        recall_at_false_alarm_rate(labels, scores, 1.5)


@pytest.mark.parametrize("seed", range(20))
def test_false_alarm_cut_reaches_the_roc_point_of_recall_at_false_alarm_rate(seed: int) -> None:
    """Flagging scores above the cut gives exactly that point's recall and at most its false alarms, ties
    included: the per-subset recall (e.g. per defect size) is then mean(subset > cut)."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.6)
    labels[:2] = [True, False]
    scores = np.round(rng.normal(labels * rng.uniform(0.5, 2.0), 1.0), int(rng.integers(0, 2)))
    for far in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0):
        cut = false_alarm_cut(scores[~labels], far)
        assert np.mean(scores[labels] > cut) == recall_at_false_alarm_rate(labels, scores, far)
        assert np.mean(scores[~labels] > cut) <= far


def test_false_alarm_cut_edges() -> None:
    assert false_alarm_cut([0.1, 0.5, 0.9], 0.0) == 0.9
    assert false_alarm_cut([0.1, 0.5, 0.9], 0.34) == 0.5  # one of three may be flagged
    assert false_alarm_cut([0.1, 0.5, 0.9], 1.0) == -math.inf  # every normal may be flagged
    for bad in ([], [0.1, math.nan]):
        with pytest.raises(ValueError):
            false_alarm_cut(bad, 0.01)
    with pytest.raises(ValueError):
        false_alarm_cut([0.1], 1.5)
