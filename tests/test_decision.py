"""Image decisions read from the map: position-aware statistics for aligned products, chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.decision import MIN_GAIN, ImageDecision, MapStatistics, candidate_decisions, choose_decision
from pipeline.data.metrics import roc_auc

SHAPE = (60, 150)


def _maps(count: int, seed: int, defect: bool) -> list[np.ndarray]:
    """Normal maps hot on a fixed stripe (a thread, an edge) with noise; defective ones add a dimmer spot
    elsewhere: the defect is on the map but the raw maximum is the stripe's."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(count):
        score_map = rng.normal(1.0, 0.05, SHAPE).astype(np.float32)
        score_map[:, 70:76] += rng.uniform(2.0, 3.0)  # every normal frame's hottest place
        if defect:
            y, x = rng.integers(10, 50), rng.integers(10, 60)
            score_map[y - 4 : y + 4, x - 4 : x + 4] += 1.0
        maps.append(score_map)
    return maps


def test_position_aware_decision_finds_what_the_raw_maximum_drowns() -> None:
    statistics = MapStatistics.from_maps(_maps(20, 0, defect=False))
    normal, defective = _maps(15, 1, False), _maps(15, 2, True)
    labels, maps = [False] * 15 + [True] * 15, normal + defective
    expert_scores = np.array([m.max() for m in maps])  # an expert whose own score is the raw maximum
    assert roc_auc(labels, ImageDecision("max").scores(expert_scores, maps)) < 0.8
    assert roc_auc(labels, ImageDecision("max", statistics).scores(expert_scores, maps)) > 0.99
    decision, aurocs = choose_decision(labels, expert_scores, maps, statistics)
    assert decision.statistics is not None and decision.aggregation in ("max", "top_k_mean")
    assert set(aurocs) == {d.describe() for d in candidate_decisions(statistics)}


def test_the_expert_score_is_kept_unless_a_map_decision_beats_it_clearly() -> None:
    maps = _maps(10, 3, False) + _maps(10, 4, True)
    labels = [False] * 10 + [True] * 10
    perfect = np.array([float(label) for label in labels])  # the expert's own score already separates
    decision, aurocs = choose_decision(labels, perfect, maps, None)
    assert decision.aggregation == "expert" and aurocs["expert score"] == 1.0
    assert MIN_GAIN > 0 and all(d.statistics is None for d in candidate_decisions(None))


def test_an_aligned_product_keeps_the_position_aware_decision_unless_a_plain_one_beats_it_clearly() -> None:
    statistics = MapStatistics.from_maps(_maps(20, 7, defect=False))
    maps = _maps(10, 8, False) + _maps(10, 9, True)
    labels = [False] * 10 + [True] * 10
    perfect = np.array([float(label) for label in labels])
    # a tie at a perfect validation AUROC: the position-aware maximum, tried first, is kept
    decision, aurocs = choose_decision(labels, perfect, maps, statistics)
    assert aurocs["position-aware max"] == aurocs["expert score"] == 1.0
    assert decision.statistics is not None and decision.aggregation == "max"
    # maps that carry nothing position-aware can use, and an expert score that separates: the plain score wins
    flat = [np.full(SHAPE, 1.0, dtype=np.float32) for _ in labels]
    decision, aurocs = choose_decision(labels, perfect, flat, MapStatistics.from_maps(flat[:5]))
    assert decision.aggregation == "expert" and aurocs["position-aware max"] < 1.0 - MIN_GAIN


@pytest.mark.parametrize("aggregation", ["expert", "max", "top_k_mean"])
def test_decisions_round_trip_through_bytes_deterministically(aggregation: str) -> None:
    statistics = None if aggregation == "expert" else MapStatistics.from_maps(_maps(5, 5, False))
    decision = ImageDecision(aggregation, statistics)
    data = decision.to_bytes()
    again = ImageDecision.from_bytes(data)
    assert again.to_bytes() == data == ImageDecision(aggregation, statistics).to_bytes()
    maps = _maps(4, 6, True)
    scores = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(again.scores(scores, maps), decision.scores(scores, maps))


def test_frames_of_another_size_are_put_on_the_statistics_grid() -> None:
    statistics = MapStatistics.from_maps(_maps(5, 7, False))
    other = np.ones((120, 300), dtype=np.float32)  # twice the size: the same grid after averaging
    assert np.isfinite(ImageDecision("max", statistics).scores(np.zeros(1), [other])).all()
    with pytest.raises(ValueError, match="at least two"):
        MapStatistics.from_maps(_maps(1, 8, False))
