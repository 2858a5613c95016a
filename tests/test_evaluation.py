from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluation import accuracy, latency_summary, roc_auc
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
