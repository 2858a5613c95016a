"""Per-category thresholds and score normalisation, kept outside the experts.

Derived from held-out normal images only (never from anomalies): the threshold is the (1 - FAR)
quantile of their raw scores, and the false-alarm rate that threshold implies on them is recorded.
The held-out scores are stored, so a new target FAR can be applied at runtime without retraining.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

# An explicit threshold above this many times the highest held-out normal score would flag nothing.
# Raw scores are distances, and a defect the expert sees scores a small multiple of the normal
# scores, not orders of magnitude more; 100x still lets an operator set a deliberately very strict
# threshold, yet refuses a typo (a few extra zeros, 1e9) that would silently pass every defective frame.
MAX_THRESHOLD_RATIO = 100.0
MAX_FALSE_ALARM_RATE = 0.5  # exclusive: flagging half the normal frames is no longer an inspection


@dataclass(frozen=True)
class Calibration:
    normal_scores: tuple[float, ...]  # held-out normal image scores, sorted
    normal_map_peaks: tuple[float, ...]  # held-out normal maps' maxima, sorted
    false_alarm_rate: float  # the target the threshold was derived from (None-like 0 if set explicitly)
    threshold: float  # decision threshold on the raw image score
    pixel_threshold: float  # pixels above this form anomalous regions (boxes)
    task_bound: float  # frames farther than this from the task's keys are not this task

    @classmethod
    def from_normals(
        cls, scores: np.ndarray, map_peaks: np.ndarray, task_distances: np.ndarray, false_alarm_rate: float, slack: float
    ) -> "Calibration":
        if len(scores) == 0:
            raise ValueError("calibration needs at least one held-out normal image")
        for name, values in (("image scores", scores), ("map peaks", map_peaks), ("task distances", task_distances)):
            _require_finite(name, values)
        base = cls(
            normal_scores=tuple(sorted(float(s) for s in scores)),
            normal_map_peaks=tuple(sorted(float(p) for p in map_peaks)),
            false_alarm_rate=false_alarm_rate,
            threshold=0.0,
            pixel_threshold=0.0,
            task_bound=float(np.max(task_distances)) * slack,
        )
        return base.with_false_alarm_rate(false_alarm_rate)

    def with_false_alarm_rate(self, far: float) -> "Calibration":
        """The threshold re-derived for a target false-alarm rate, finite and in (0, 0.5)."""
        if not (_is_finite(far) and 0 < far < MAX_FALSE_ALARM_RATE):
            raise ValueError(f"false-alarm rate must be a finite number in (0, {MAX_FALSE_ALARM_RATE}), got {far!r}")
        return replace(
            self,
            false_alarm_rate=float(far),
            threshold=_upper_quantile(self.normal_scores, 1.0 - far),
            pixel_threshold=_upper_quantile(self.normal_map_peaks, 1.0 - far),
        )

    def with_threshold(self, threshold: float) -> "Calibration":
        """An explicit operator threshold; the pixel threshold moves by the same ratio."""
        self._check_threshold(threshold)
        threshold = float(threshold)  # a numpy scalar would spread into the pixel threshold, and not serialise
        ratio = threshold / self.threshold if self.threshold > 0 else 1.0
        return replace(self, threshold=threshold, pixel_threshold=self.pixel_threshold * ratio)

    def _check_threshold(self, threshold: float) -> None:
        if not _is_finite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if threshold <= 0:
            # Raw scores are non-negative distances: 0 or below flags every frame.
            raise ValueError(f"threshold must be positive (raw scores are distances), got {threshold!r}")
        highest = max(self.normal_scores, default=0.0)
        # All-zero held-out scores give no scale to judge by; any positive threshold is then allowed.
        if highest > 0 and threshold > MAX_THRESHOLD_RATIO * highest:
            raise ValueError(
                f"threshold {threshold:.6g} would flag nothing: it is more than {MAX_THRESHOLD_RATIO:g}x the "
                f"highest held-out normal score ({highest:.6g})"
            )

    @property
    def implied_false_alarm_rate(self) -> float:
        """Fraction of held-out normal images the threshold flags."""
        return float(np.mean(np.asarray(self.normal_scores) > self.threshold))

    @property
    def map_max_score(self) -> float:
        """Raw pixel score drawn as 255 in 8-bit maps: the pixel threshold lands mid-grey."""
        return 2.0 * self.pixel_threshold if self.pixel_threshold > 0 else 1.0

    def normalise(self, raw: float) -> float:
        """0 at the median normal score, 1 at the threshold."""
        median = float(np.median(self.normal_scores))
        span = self.threshold - median
        return (raw - median) / span if span > 1e-12 else raw - median

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Calibration":
        fields = json.loads(data)
        fields["normal_scores"] = tuple(fields["normal_scores"])
        fields["normal_map_peaks"] = tuple(fields["normal_map_peaks"])
        return cls(**fields)


def _is_finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # numpy scalars too; None or a string is simply not finite
    except TypeError:
        return False


def _require_finite(name: str, values: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(np.asarray(values, dtype=np.float64))))
    if bad:
        raise ValueError(f"calibration refused: {bad} of {len(values)} held-out normal {name} are not finite "
                         "(inf or NaN)")


def _upper_quantile(sorted_values: tuple[float, ...], q: float) -> float:
    return float(np.quantile(np.asarray(sorted_values), q, method="higher"))
