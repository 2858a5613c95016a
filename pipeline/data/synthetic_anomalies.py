"""Training-time synthetic anomalies made from normal images: confetti noise and cut-paste.

Used as outlier exposure by experts that learn from anomalies (FCDD) and, by training, to build a
validation set of normal images plus synthetic anomalies for the automatic expert choice. The test-time
defects of synthetic categories (pipeline.data.datasets) are drawn by a different generator.

- `confetti_noise`: FCDD's outlier exposure for MVTec-AD (Liznerski et al., ICLR 2021): many small
  blobs (rectangles, rotated rectangles, ellipses) of random size, either blended in a random colour or
  grey level, or added as a signed offset; some are smoothed (soft edges).
- `cut_paste`: CutPaste (Li et al., CVPR 2021): a rectangle (or a thin "scar") cut from the image,
  optionally re-lit and rotated, pasted elsewhere.
- `synthesize`: one of the two per image.

Every function takes B x 3 x H x W pixels in [0, 1] (H and W need not be equal) and returns (pixels,
masks): the altered pixels, same shape and dtype, clipped to [0, 1], and B x H x W bool masks of the
changed region (never empty: a defect that happens to change nothing visible is redrawn stronger).
Defect sizes scale with sqrt(H * W) (areas with H * W), positions are uniform over the whole H x W
canvas, and a pasted patch's sides are capped by the shorter side; for square S x S inputs every one of
these is exactly the S of the square-only version, so square outputs are bit-identical to it for the
same generator state. Randomness comes only from the generator
passed in (a CPU torch.Generator, or a numpy Generator from which one torch seed is drawn), so results
are deterministic given the generator's state; images are processed one by one in batch order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

GeneratorLike = torch.Generator | np.random.Generator

CONFETTI_TOLERANCE = 0.05  # a confetti pixel counts as changed when some channel moved more than this
_MIN_MEAN_CHANGE = 0.02  # a cut-paste that moves its footprint less than this on average is re-lit


# ------------------------------------------------------------------------------------------ public
def confetti_noise(pixels: torch.Tensor, generator: GeneratorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Many small blobs per image. Mask: pixels where some channel changed by more than
    CONFETTI_TOLERANCE (the faint halo of a smoothed blob is not marked)."""
    return _per_image(pixels, generator, lambda image, g: _confetti_one(image, g))


def cut_paste(pixels: torch.Tensor, generator: GeneratorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One pasted patch per image. Mask: exactly the pixels that differ from the input."""
    return _per_image(pixels, generator, lambda image, g: _cut_paste_one(image, g))


def synthesize(pixels: torch.Tensor, generator: GeneratorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Confetti noise or cut-paste, chosen per image with equal probability."""

    def one(image: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return _confetti_one(image, g) if _uniform(g) < 0.5 else _cut_paste_one(image, g)

    return _per_image(pixels, generator, one)


# ----------------------------------------------------------------------------------------- helpers
def _torch_generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, np.random.Generator):
        return torch.Generator().manual_seed(int(generator.integers(0, 2**63 - 1)))
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("synthetic anomalies need a CPU torch.Generator")
        return generator
    raise TypeError(f"expected a torch.Generator or numpy Generator, got {type(generator).__name__}")


def _per_image(pixels: torch.Tensor, generator: GeneratorLike, make) -> tuple[torch.Tensor, torch.Tensor]:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or min(pixels.shape[2:]) < 1:
        raise ValueError(f"expected B x 3 x H x W pixels, got {tuple(pixels.shape)}")
    g = _torch_generator(generator)
    original = pixels.detach().clamp(0.0, 1.0)
    source = original.to("cpu", torch.float32)
    outputs, masks = [], []
    for image in source:
        out, mask = make(image, g)
        outputs.append(out.clamp(0.0, 1.0))
        masks.append(mask)
    out = torch.stack(outputs)
    untouched = (out == source).all(dim=1, keepdim=True).to(pixels.device)
    # Untouched pixels are the input's own values, bit for bit, whatever the input's dtype.
    out = torch.where(untouched, original, out.to(pixels.device, pixels.dtype))
    return out, torch.stack(masks).to(pixels.device)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=g))


def _rotated_rect(
    hw: tuple[int, int], cy: float, cx: float, h: float, w: float, angle: float,
    window: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Footprint (bool) of an h x w rectangle centred at (cy, cx), rotated by `angle`, and the
    patch-frame coordinates (u along h, v along w) of every pixel; over the whole H x W image (`hw`), or
    over `window` = (y0, y1, x0, x1) only."""
    y0, y1, x0, x1 = window if window is not None else (0, hw[0], 0, hw[1])
    dy = torch.arange(y0, y1, dtype=torch.float32)[:, None] - cy
    dx = torch.arange(x0, x1, dtype=torch.float32)[None, :] - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u = dy * cos + dx * sin
    v = -dy * sin + dx * cos
    inside = (u.abs() <= h / 2) & (v.abs() <= w / 2)
    return inside, u, v


def _blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an H x W map, zero padding (a blob fades out at the border)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(mask[None, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out[0, 0]


def _changed(before: torch.Tensor, after: torch.Tensor, tolerance: float) -> torch.Tensor:
    return (after - before).abs().amax(dim=0) > tolerance


def _scale(hw: tuple[int, int]) -> float:
    """The side of the square of the same area, sqrt(H * W): what defect sizes are relative to. For a
    square, exactly S (sqrt of a perfect square is exact in IEEE arithmetic)."""
    return math.sqrt(hw[0] * hw[1])


# ---------------------------------------------------------------------------------------- confetti
def _confetti_one(image: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    out = image.clone()
    for _ in range(_randint(g, 3, 12)):
        out = _confetti_blob(out, g, hw)
    mask = _changed(image, out, CONFETTI_TOLERANCE)
    if not mask.any():  # every blob matched its background: one hard blob of the opposite extreme
        out = _confetti_blob(out, g, hw, force=True)
        mask = _changed(image, out, CONFETTI_TOLERANCE)
    return out, mask


def _confetti_blob(out: torch.Tensor, g: torch.Generator, hw: tuple[int, int], force: bool = False) -> torch.Tensor:
    """Draw one blob into `out` (in place, within the blob's window) and return `out`."""
    height, width = hw
    h = max(2.0, _uniform(g, 0.025, 0.12) * _scale(hw))
    w = max(2.0, h * math.exp(_uniform(g, -0.7, 0.7)))
    cy, cx = _uniform(g, 0, height - 1), _uniform(g, 0, width - 1)
    angle = _uniform(g, 0, math.pi)
    shape = _randint(g, 0, 2)  # 0: axis-aligned rectangle, 1: rotated rectangle, 2: ellipse
    soft = not force and _uniform(g) < 0.5
    sigma = _uniform(g, 0.5, max(0.6, min(h, w) / 4)) if soft else 0.0
    # Work on the blob's window only: its half-diagonal plus the blur's reach.
    reach = math.hypot(h, w) / 2 + 3 * sigma + 2
    window = (
        max(0, int(cy - reach)), min(height, int(cy + reach) + 1),
        max(0, int(cx - reach)), min(width, int(cx + reach) + 1),
    )  # fmt: skip
    y0, y1, x0, x1 = window
    hard, u, v = _rotated_rect(hw, cy, cx, h, w, angle if shape == 1 else 0.0, window)
    if shape == 2:
        _, u, v = _rotated_rect(hw, cy, cx, h, w, angle, window)
        hard = (u / (h / 2)) ** 2 + (v / (w / 2)) ** 2 <= 1.0
    if not hard.any():  # a sliver that fell between pixel centres
        hard[min(y1 - 1, int(round(cy))) - y0, min(x1 - 1, int(round(cx))) - x0] = True
    strength = _uniform(g, 0.6, 1.0)
    alpha = hard.float()
    if soft:
        alpha = _blur(alpha, sigma)
        alpha = alpha / alpha.max().clamp_min(1e-6)
    alpha = alpha * (1.0 if force else strength)
    region = out[:, y0:y1, x0:x1]
    region_mean = region[:, hard].mean(dim=1)  # 3
    if force:
        colour = (region_mean.mean() < 0.5).float().expand(3)
        region.copy_(region * (1 - alpha) + colour[:, None, None] * alpha)
        return out
    grey = _uniform(g) < 0.5
    if _uniform(g) < 0.6:  # blend towards a colour that stands out from the region
        if grey:
            colour = torch.full((3,), _uniform(g))
        else:
            colour = torch.rand(3, generator=g)
        if (colour - region_mean).abs().max() < 0.25:
            colour = torch.where(region_mean > 0.5, region_mean - 0.4, region_mean + 0.4)
        region.copy_(region * (1 - alpha) + colour[:, None, None] * alpha)
        return out
    # additive, signed offset (FCDD adds its confetti to the image)
    magnitude = torch.full((3,), _uniform(g, 0.25, 0.6)) if grey else 0.25 + 0.35 * torch.rand(3, generator=g)
    sign = -1.0 if float(region_mean.mean()) > 0.5 else 1.0  # towards the side with room
    if _uniform(g) < 0.2:
        sign = -sign
    region.copy_((region + sign * magnitude[:, None, None] * alpha).clamp(0.0, 1.0))
    return out


# --------------------------------------------------------------------------------------- cut-paste
def _cut_paste_one(image: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    height, width = hw
    scale, short = _scale(hw), min(hw)
    if _uniform(g) < 0.3:  # scar: long and thin, always rotated
        h = _uniform(g, 0.1, 0.3) * scale
        w = _uniform(g, 0.01, 0.04) * scale
        angle = _uniform(g, 0, math.pi)
    else:
        area = _uniform(g, 0.02, 0.12) * height * width
        aspect = math.exp(_uniform(g, math.log(0.3), math.log(1 / 0.3)))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        angle = _uniform(g, 0, math.pi) if _uniform(g) < 0.3 else 0.0
    # Capped by the shorter side, so the axis-aligned source box fits whichever way it lies.
    h, w = min(max(h, 2.0), short * 0.6), min(max(w, 2.0), short * 0.6)
    # Source: an axis-aligned h x w box inside the image. Destination: the (rotated) box, its bounding
    # box inside the image.
    sy = _uniform(g, h / 2, height - h / 2)
    sx = _uniform(g, w / 2, width - w / 2)
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    bh, bw = h * cos + w * sin, h * sin + w * cos
    dy = _uniform(g, min(bh / 2, height / 2), max(height - bh / 2, height / 2))
    dx = _uniform(g, min(bw / 2, width / 2), max(width - bw / 2, width / 2))
    footprint, u, v = _rotated_rect(hw, dy - 0.5, dx - 0.5, h, w, angle)
    if not footprint.any():
        footprint[min(height - 1, int(dy)), min(width - 1, int(dx))] = True
    src_y = (sy - 0.5 + u).round().long().clamp(0, height - 1)
    src_x = (sx - 0.5 + v).round().long().clamp(0, width - 1)
    patch = image[:, src_y, src_x]  # 3 x H x W: the source pixel for every destination pixel

    if _uniform(g) < 0.7:  # re-light: brightness, contrast and a slight colour cast
        mean = patch[:, footprint].mean(dim=1)[:, None, None]
        contrast = _uniform(g, 0.7, 1.3)
        brightness = _uniform(g, -0.15, 0.15)
        cast = 1.0 + 0.1 * (2 * torch.rand(3, generator=g) - 1)
        patch = ((patch - mean) * contrast + mean) * cast[:, None, None] + brightness

    out = torch.where(footprint, patch, image).clamp(0.0, 1.0)
    if float((out - image).abs().amax(dim=0)[footprint].mean()) < _MIN_MEAN_CHANGE:
        # Pasted onto look-alike content (flat images): shift it away from the destination's level.
        level = float(image[:, footprint].mean())
        shift = -0.25 if level > 0.5 else 0.25
        out = torch.where(footprint, patch + shift, image).clamp(0.0, 1.0)
    mask = (out != image).any(dim=0)
    return out, mask
