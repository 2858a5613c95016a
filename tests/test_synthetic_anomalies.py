"""Training-time synthetic anomalies: seeded, in range, and their masks mark what changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.synthetic_anomalies import CONFETTI_TOLERANCE, confetti_noise, cut_paste, synthesize

GENERATORS = {"confetti_noise": confetti_noise, "cut_paste": cut_paste, "synthesize": synthesize}
SIZE = 96


def textured(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Smooth random colour texture in [0, 1] (like an image, unlike i.i.d. noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("name", GENERATORS)
def test_deterministic_for_a_seed_and_seed_dependent(name: str) -> None:
    make = GENERATORS[name]
    pixels = textured(6)
    a = make(pixels, torch.Generator().manual_seed(3))
    b = make(pixels, torch.Generator().manual_seed(3))
    c = make(pixels, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # a numpy Generator works too, and is just as deterministic
    d = make(pixels, np.random.default_rng(7))
    e = make(pixels, np.random.default_rng(7))
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


@pytest.mark.parametrize("name", GENERATORS)
def test_shapes_range_and_non_empty_masks(name: str) -> None:
    pixels = textured(8, seed=1)
    before = pixels.clone()
    out, masks = GENERATORS[name](pixels, torch.Generator().manual_seed(0))
    assert torch.equal(pixels, before), "the input must not be modified"
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert masks.shape == (8, SIZE, SIZE) and masks.dtype == torch.bool
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert masks.flatten(1).any(dim=1).all(), "every image gets a non-empty mask"
    # nothing outside the mask changed beyond the confetti tolerance, and something inside did
    change = (out - pixels).abs().amax(dim=1)
    assert float(torch.where(masks, 0.0, change).max()) <= CONFETTI_TOLERANCE
    assert all(float(change[i][masks[i]].max()) > CONFETTI_TOLERANCE for i in range(8))


def test_cut_paste_mask_is_exactly_the_changed_pixels() -> None:
    pixels = textured(10, seed=2)
    out, masks = cut_paste(pixels, torch.Generator().manual_seed(5))
    assert torch.equal(masks, (out != pixels).any(dim=1))
    # a pasted patch is a region, not a sprinkle: it covers a sensible part of the image
    area = masks.flatten(1).float().mean(dim=1)
    assert float(area.min()) > 0.001 and float(area.max()) < 0.5


def test_confetti_mask_is_the_change_above_tolerance() -> None:
    pixels = textured(10, seed=3)
    out, masks = confetti_noise(pixels, torch.Generator().manual_seed(6))
    assert torch.equal(masks, (out - pixels).abs().amax(dim=1) > CONFETTI_TOLERANCE)


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_flat_images_still_get_visible_anomalies(name: str, level: float) -> None:
    # pasting a flat image onto itself changes nothing: the generator must re-light it
    pixels = torch.full((4, 3, SIZE, SIZE), level)
    out, masks = GENERATORS[name](pixels, torch.Generator().manual_seed(0))
    assert masks.flatten(1).any(dim=1).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_untouched_pixels_keep_the_input_dtype_and_values() -> None:
    pixels = textured(3, seed=4).double()
    out, masks = cut_paste(pixels, torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64
    assert torch.equal(out[~masks[:, None].expand_as(out)], pixels[~masks[:, None].expand_as(pixels)])


def test_synthesize_uses_both_kinds_and_batches_match_single_images() -> None:
    pixels = textured(12, seed=5)
    out, masks = synthesize(pixels, torch.Generator().manual_seed(2))
    # cut-paste masks are exactly the changed pixels; confetti leaves faint changes outside its mask
    exact = [bool(torch.equal(masks[i], (out[i] != pixels[i]).any(dim=0))) for i in range(12)]
    assert any(exact) and not all(exact)
    # one generator, images in batch order: splitting the batch gives the same result
    g = torch.Generator().manual_seed(2)
    first, second = synthesize(pixels[:5], g), synthesize(pixels[5:], g)
    assert torch.equal(torch.cat([first[0], second[0]]), out)
    assert torch.equal(torch.cat([first[1], second[1]]), masks)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        synthesize(torch.rand(2, 1, 32, 32), torch.Generator())
    with pytest.raises(TypeError):
        synthesize(torch.rand(2, 3, 32, 32), 0)


def textured_hw(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """`textured` on a non-square H x W canvas."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, height // 8, width // 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, height, width, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("height, width", [(48, 136), (136, 48)])
def test_non_square_inputs(name: str, height: int, width: int) -> None:
    make = GENERATORS[name]
    pixels = textured_hw(16, height, width, seed=6)
    before = pixels.clone()
    out, masks = make(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(pixels, before)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert masks.shape == (16, height, width) and masks.dtype == torch.bool
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert masks.flatten(1).any(dim=1).all()
    change = (out - pixels).abs().amax(dim=1)
    assert float(torch.where(masks, 0.0, change).max()) <= CONFETTI_TOLERANCE
    if name == "cut_paste":
        assert torch.equal(masks, (out != pixels).any(dim=1))
    if name == "confetti_noise":
        assert torch.equal(masks, change > CONFETTI_TOLERANCE)
    # defects are placed over the whole canvas, not only over its leading square
    covered = masks.any(dim=0)
    long_axis = covered.any(dim=0) if width > height else covered.any(dim=1)
    far = long_axis[min(height, width) :]
    assert bool(far.any()), "no defect beyond the leading square of a non-square canvas"
    # deterministic, and batch order is all that matters (splitting the batch changes nothing)
    again = make(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(out, again[0]) and torch.equal(masks, again[1])
    g = torch.Generator().manual_seed(1)
    first, second = make(pixels[:7], g), make(pixels[7:], g)
    assert torch.equal(torch.cat([first[0], second[0]]), out)


@pytest.mark.parametrize("name", GENERATORS)
def test_non_square_defects_keep_the_area_scale(name: str) -> None:
    # a 64 x 256 canvas has the area of a 128 x 128 one: its defects cover a similar fraction of it
    make = GENERATORS[name]
    wide = make(textured_hw(24, 64, 256, seed=7), torch.Generator().manual_seed(3))[1]
    square = make(textured_hw(24, 128, 128, seed=7), torch.Generator().manual_seed(3))[1]
    wide_area = float(wide.flatten(1).float().mean())
    square_area = float(square.flatten(1).float().mean())
    assert 0.4 < wide_area / square_area < 2.5, (wide_area, square_area)


@pytest.mark.parametrize("name", GENERATORS)
def test_flat_non_square_images_still_get_visible_anomalies(name: str) -> None:
    pixels = torch.full((4, 3, 40, 120), 0.5)
    out, masks = GENERATORS[name](pixels, torch.Generator().manual_seed(0))
    assert masks.flatten(1).any(dim=1).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
