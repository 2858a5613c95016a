"""Validation anomalies: seeded, masks non-empty and exact outside, visible, grayscale kept, every family
reachable, any resolution."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from pipeline.data.validation_anomalies import (
    FAMILIES,
    MIN_MEAN_CHANGE,
    make_validation_anomalies,
    make_validation_anomaly,
    validation_anomalies,
    validation_anomaly,
)

SIZES = [(60, 100), (460, 1130)]  # H x W: a tiny frame and a wide real one


def textured(height: int, width: int, gray: bool, seed: int = 0) -> np.ndarray:
    """A smooth random surface with some fine grain and a few edges, uint8 H x W x 3."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 16), max(2, width // 16), 1 if gray else 3))
    rows = np.linspace(0, coarse.shape[0] - 1, height).round().astype(int)
    cols = np.linspace(0, coarse.shape[1] - 1, width).round().astype(int)
    surface = 60 + 120 * coarse[rows][:, cols] + 25 * rng.random((height, width, coarse.shape[2]))
    surface[:, width // 3 : width // 3 + max(1, width // 50)] += 50  # a seam
    image = np.clip(surface, 0, 255).astype(np.uint8)
    return np.repeat(image, 3, axis=2) if gray else image


def check(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert mask.any(), "the mask is never empty"
    assert np.array_equal(out[~mask], image[~mask]), "pixels outside the mask are unchanged, bit for bit"
    change = np.abs(out.astype(np.int16) - image.astype(np.int16))[mask]
    assert change.mean() >= MIN_MEAN_CHANGE, "the change is visible"


@pytest.mark.parametrize("gray", [True, False], ids=["gray", "colour"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_masks_outside_pixels_visibility_and_grayscale(family: str, size: tuple[int, int], gray: bool) -> None:
    image = textured(*size, gray=gray, seed=1)
    before = image.copy()
    details = Counter()
    for seed in range(12):
        anomaly = validation_anomaly(image, np.random.default_rng(seed), family)
        assert anomaly.family == family
        check(image, anomaly.image, anomaly.mask)
        if gray:
            assert np.array_equal(anomaly.image[..., 0], anomaly.image[..., 1])
            assert np.array_equal(anomaly.image[..., 1], anomaly.image[..., 2])
        details[anomaly.detail] += 1
    assert np.array_equal(image, before), "the input is not modified"
    # the defect is local: it never covers most of the frame
    assert anomaly.mask.mean() < 0.2
    assert len(details) >= 2, f"several kinds within {family}: {dict(details)}"


def test_deterministic_given_the_generator() -> None:
    image = textured(120, 200, gray=False, seed=2)
    for family in (None, *FAMILIES):
        a = make_validation_anomaly(image, np.random.default_rng(5), family)
        b = make_validation_anomaly(image, np.random.default_rng(5), family)
        c = make_validation_anomaly(image, np.random.default_rng(6), family)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_every_family_reachable_at_random() -> None:
    image = textured(60, 100, gray=True, seed=3)
    families = Counter(validation_anomaly(image, np.random.default_rng(seed)).family for seed in range(80))
    assert set(families) == set(FAMILIES), dict(families)
    assert min(families.values()) >= 8  # roughly one in four each


def test_flat_and_saturated_frames_still_get_a_visible_defect() -> None:
    """On a flat surface a blur, warp or scramble changes nothing: it is redrawn stronger, then forced."""
    for level in (0, 128, 255):
        image = np.full((80, 90, 3), level, dtype=np.uint8)
        forced = 0
        for seed in range(24):
            anomaly = validation_anomaly(image, np.random.default_rng(seed))
            check(image, anomaly.image, anomaly.mask)
            forced += anomaly.detail.endswith("+forced")
        assert forced > 0  # warps of a flat surface need the fallback


def test_sizes_follow_the_short_side() -> None:
    """The same draws on a frame twice as large cover about the same fraction of it."""
    small, large = textured(230, 565, gray=True, seed=4), textured(460, 1130, gray=True, seed=4)
    for family in FAMILIES:
        fractions = []
        for image in (small, large):
            areas = [validation_anomaly(image, np.random.default_rng(s), family).mask.mean() for s in range(10)]
            fractions.append(float(np.median(areas)))
        ratio = fractions[1] / fractions[0]
        assert 0.25 < ratio < 4.0, f"{family}: {fractions}"
    # spots are tiny: at most a few percent of the short side across (plus a rim)
    for seed in range(20):
        mask = validation_anomaly(large, np.random.default_rng(seed), "spot").mask
        assert mask.sum() <= 4 * np.pi * (0.03 * 460) ** 2


def test_batch_helper_is_seeded_per_image() -> None:
    images = [textured(60, 100, True, seed=5), textured(90, 70, False, seed=6), textured(100, 100, False)]
    out_a, masks_a = make_validation_anomalies(images, seed=11)
    out_b, masks_b = make_validation_anomalies(images, seed=11)
    assert len(out_a) == len(masks_a) == 3
    for image, out, mask, again, mask_again in zip(images, out_a, masks_a, out_b, masks_b):
        check(image, out, mask)
        assert np.array_equal(out, again) and np.array_equal(mask, mask_again)
    # an image's anomaly depends on the seed and its position, not on the images after it
    first, first_mask = make_validation_anomalies(images[:1], seed=11)
    assert np.array_equal(first[0], out_a[0]) and np.array_equal(first_mask[0], masks_a[0])
    other, _ = make_validation_anomalies(images, seed=12)
    assert not all(np.array_equal(a, b) for a, b in zip(out_a, other))
    assert make_validation_anomalies([], seed=0) == ([], [])


def test_several_per_image_are_of_different_families_and_keep_the_first() -> None:
    images = [textured(60, 100, True, seed=5), textured(90, 70, False, seed=6), textured(100, 100, False)]
    single = validation_anomalies(images, seed=11)
    for per_image in (2, 4):
        several = validation_anomalies(images, seed=11, per_image=per_image)
        assert len(several) == per_image * len(images)
        for i, image in enumerate(images):
            own = several[i * per_image : (i + 1) * per_image]  # image by image
            for anomaly in own:
                check(image, anomaly.image, anomaly.mask)
            assert len({a.family for a in own}) == per_image  # each another kind of defect
            # the first is the single draw: adding kinds never changes the anomalies already judged
            assert np.array_equal(own[0].image, single[i].image) and own[0].family == single[i].family
    every = validation_anomalies(images, seed=11, per_image=len(FAMILIES))
    assert Counter(a.family for a in every) == Counter({family: len(images) for family in FAMILIES})
    for per_image in (0, len(FAMILIES) + 1):
        with pytest.raises(ValueError):
            validation_anomalies(images, seed=11, per_image=per_image)


def test_bad_input_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_validation_anomaly(np.zeros((50, 50, 3), dtype=np.float32), rng)
    with pytest.raises(ValueError):
        make_validation_anomaly(np.zeros((50, 50), dtype=np.uint8), rng)
    with pytest.raises(ValueError):
        make_validation_anomaly(np.zeros((50, 50, 3), dtype=np.uint8), rng, family="confetti")
    with pytest.raises(TypeError):
        make_validation_anomaly(np.zeros((50, 50, 3), dtype=np.uint8), 0)  # type: ignore[arg-type]


def test_cost_on_a_wide_frame_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted (the machine is shared): the cost per 1130 x 460 frame, per family."""
    lines = []
    for gray in (True, False):
        image = textured(460, 1130, gray=gray, seed=7)
        for family in FAMILIES:
            times = []
            for seed in range(10):
                start = time.perf_counter()
                validation_anomaly(image, np.random.default_rng(seed), family)
                times.append(1000 * (time.perf_counter() - start))
            kind = "gray" if gray else "colour"
            lines.append(f"{kind} {family}: median {np.median(times):.1f} ms, max {max(times):.1f} ms")
    with capsys.disabled():
        print("\nvalidation anomalies, 1130 x 460:\n  " + "\n  ".join(lines))
