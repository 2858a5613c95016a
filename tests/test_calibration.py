"""Per-category calibration from held-out normal scores: thresholds, normalisation, bytes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.calibration import MAX_THRESHOLD_RATIO, Calibration


def _calibration(scores, far: float = 0.1, peaks=None, distances=(1.0, 3.0, 2.0), slack: float = 1.5) -> Calibration:
    scores = np.asarray(scores, dtype=np.float64)
    peaks = scores * 2 if peaks is None else np.asarray(peaks)
    return Calibration.from_normals(scores, peaks, np.asarray(distances), far, slack)


def test_threshold_is_upper_quantile_hand_examples() -> None:
    shuffled = [7.0, 2.0, 10.0, 1.0, 5.0, 9.0, 3.0, 8.0, 4.0, 6.0]  # 1..10
    # q = 0.8 -> position 0.8 * 9 = 7.2 -> the higher neighbour, index 8 of the sorted scores: 9
    cal = _calibration(shuffled, far=0.2)
    assert cal.normal_scores == tuple(float(v) for v in range(1, 11))  # kept sorted
    assert cal.threshold == 9.0
    assert cal.implied_false_alarm_rate == pytest.approx(0.1)  # only 10 is above
    assert cal.false_alarm_rate == 0.2
    # q = 0.9 -> position 8.1 -> 10: nothing is flagged among 10 images at a 10 % target
    assert _calibration(shuffled, far=0.1).threshold == 10.0
    # q = 0.5 -> position 4.5 -> 6
    assert _calibration(shuffled, far=0.49).threshold == 6.0
    # 100 scores 0..99, FAR 5 %: position 94.05 -> 95, four images (96..99) above
    cal = _calibration(np.random.default_rng(0).permutation(100), far=0.05)
    assert cal.threshold == 95.0 and cal.implied_false_alarm_rate == pytest.approx(0.04)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("far", [0.01, 0.05, 0.2])
def test_threshold_flags_at_most_far_of_normals(seed: int, far: float) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, size=int(rng.integers(5, 300)))
    cal = _calibration(scores, far=far)
    assert cal.threshold in scores  # one of the held-out scores
    assert np.mean(scores > cal.threshold) <= far + 1e-12
    assert cal.implied_false_alarm_rate == pytest.approx(np.mean(scores > cal.threshold))
    # Upper quantile: at least a (1 - far) fraction of the scores is at or below the threshold.
    assert np.mean(scores <= cal.threshold) >= 1 - far


def test_pixel_threshold_and_task_bound() -> None:
    cal = _calibration([1.0, 2.0, 3.0, 4.0], far=0.3, peaks=[40.0, 10.0, 30.0, 20.0], distances=[2.0, 8.0, 5.0],
                       slack=1.5)
    # q = 0.7 -> position 2.1 -> index 3
    assert cal.threshold == 4.0 and cal.pixel_threshold == 40.0
    assert cal.normal_map_peaks == (10.0, 20.0, 30.0, 40.0)
    assert cal.task_bound == pytest.approx(12.0)  # slack x the farthest held-out image
    assert cal.map_max_score == pytest.approx(80.0)


def test_needs_at_least_one_score() -> None:
    with pytest.raises(ValueError):
        _calibration([])


def test_with_false_alarm_rate_rederives_from_stored_scores() -> None:
    scores = np.arange(1, 101, dtype=np.float64)
    cal = _calibration(scores, far=0.01)
    looser = cal.with_false_alarm_rate(0.2)
    assert looser.false_alarm_rate == 0.2
    assert looser.threshold < cal.threshold
    assert looser.threshold == float(np.quantile(scores, 0.8, method="higher"))
    assert looser.pixel_threshold == float(np.quantile(scores * 2, 0.8, method="higher"))
    assert looser.normal_scores == cal.normal_scores and looser.task_bound == cal.task_bound
    assert looser.with_false_alarm_rate(0.01) == cal  # reversible: nothing is lost
    assert cal.threshold == _calibration(scores, far=0.01).threshold  # the original is unchanged (frozen)


def test_with_threshold_moves_pixel_threshold_by_same_ratio() -> None:
    cal = _calibration(np.arange(1, 11, dtype=np.float64), far=0.2)  # threshold 9, pixel threshold 18
    explicit = cal.with_threshold(4.5)
    assert explicit.threshold == 4.5
    assert explicit.pixel_threshold == pytest.approx(9.0)
    assert explicit.implied_false_alarm_rate == pytest.approx(0.6)  # 5..10 are above 4.5
    assert explicit.normal_scores == cal.normal_scores and explicit.task_bound == cal.task_bound
    zero = _calibration([0.0, 0.0, 0.0], far=0.1)  # threshold 0: no ratio to apply
    assert zero.with_threshold(2.0).threshold == 2.0
    assert zero.with_threshold(2.0).pixel_threshold == zero.pixel_threshold


def test_normalise_median_to_zero_threshold_to_one() -> None:
    cal = _calibration([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], far=0.1)
    median = 6.0
    assert cal.threshold == 10.0  # q = 0.9 -> position exactly 9
    assert cal.normalise(median) == pytest.approx(0.0)
    assert cal.normalise(cal.threshold) == pytest.approx(1.0)
    assert cal.normalise(14.0) == pytest.approx(2.0)
    assert cal.normalise(2.0) == pytest.approx(-1.0)
    explicit = cal.with_threshold(8.0)
    assert explicit.normalise(8.0) == pytest.approx(1.0) and explicit.normalise(median) == pytest.approx(0.0)


def test_normalise_degenerate_span() -> None:
    cal = _calibration([2.0, 2.0, 2.0], far=0.1)
    assert cal.threshold == 2.0
    assert cal.normalise(2.0) == 0.0 and cal.normalise(3.5) == pytest.approx(1.5)


def test_implied_false_alarm_rate_counts_strictly_above() -> None:
    cal = _calibration([1.0, 2.0, 2.0, 3.0], far=0.1)  # threshold 3
    assert cal.implied_false_alarm_rate == 0.0
    assert cal.with_threshold(2.0).implied_false_alarm_rate == 0.25  # ties with the threshold pass
    assert cal.with_threshold(1.5).implied_false_alarm_rate == 0.75
    assert cal.with_threshold(0.5).implied_false_alarm_rate == 1.0


def test_bytes_round_trip() -> None:
    cal = _calibration(np.random.default_rng(1).normal(size=37), far=0.05, distances=[0.5, 0.25])
    data = cal.to_bytes()
    back = Calibration.from_bytes(data)
    assert back == cal
    assert isinstance(back.normal_scores, tuple) and isinstance(back.normal_map_peaks, tuple)
    assert back.to_bytes() == data
    assert Calibration.from_bytes(cal.with_threshold(0.1).to_bytes()) == cal.with_threshold(0.1)
    assert cal.with_threshold(0.1).to_bytes() != data


# ------------------------------------------------------------------------------------ refused values
NOT_FINITE = [float("inf"), -float("inf"), float("nan"), np.float32("nan"), None, "3"]


@pytest.mark.parametrize("bad", NOT_FINITE)
def test_with_threshold_refuses_non_finite(bad) -> None:
    cal = _calibration(np.arange(1, 11, dtype=np.float64), far=0.2)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        cal.with_threshold(bad)


@pytest.mark.parametrize("bad", [0.0, -0.0, -1e-12, -5.0])
def test_with_threshold_refuses_zero_and_negative(bad: float) -> None:
    # Raw scores are non-negative distances: such a threshold would flag every frame.
    with pytest.raises(ValueError, match="must be positive"):
        _calibration([1.0, 2.0, 3.0]).with_threshold(bad)


def test_with_threshold_refuses_one_that_would_flag_nothing() -> None:
    cal = _calibration([1.0, 2.0, 4.0], far=0.1)  # highest held-out normal score 4
    assert cal.with_threshold(MAX_THRESHOLD_RATIO * 4.0).threshold == 400.0  # the bound itself is allowed
    for bad in (400.001, 1e9, 1e308):
        with pytest.raises(ValueError, match=r"would flag nothing: it is more than 100x .* \(4\)"):
            cal.with_threshold(bad)
    # All-zero held-out scores give no scale: any positive finite threshold is accepted.
    assert _calibration([0.0, 0.0]).with_threshold(1e6).threshold == 1e6


def test_with_threshold_keeps_a_plain_float() -> None:
    explicit = _calibration([1.0, 2.0, 4.0]).with_threshold(np.float32(2.5))
    assert type(explicit.threshold) is float
    assert Calibration.from_bytes(explicit.to_bytes()) == explicit  # a numpy scalar would not serialise


@pytest.mark.parametrize("bad", [*NOT_FINITE, 0.0, -0.1, 0.5, 0.7, 1.0])
def test_with_false_alarm_rate_refuses_out_of_range(bad) -> None:
    cal = _calibration(np.arange(1, 11, dtype=np.float64))
    with pytest.raises(ValueError, match=r"false-alarm rate must be a finite number in \(0, 0.5\)"):
        cal.with_false_alarm_rate(bad)
    with pytest.raises(ValueError, match="false-alarm rate"):
        _calibration([1.0, 2.0], far=bad)


@pytest.mark.parametrize("field", ["scores", "peaks", "distances"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_from_normals_refuses_non_finite_inputs(field: str, bad: float) -> None:
    values = {"scores": [1.0, 2.0, 3.0], "peaks": [2.0, 4.0, 6.0], "distances": [1.0, 2.0, 3.0]}
    values[field][1] = bad
    with pytest.raises(ValueError, match="1 of 3 held-out normal .* not finite"):
        Calibration.from_normals(np.asarray(values["scores"]), np.asarray(values["peaks"]),
                                 np.asarray(values["distances"]), 0.1, 1.5)
