"""Validation-time synthetic anomalies: a defect family that no expert trains on.

The automatic expert choice (pipeline.core.expert_selection) judges candidates on held-out normal
frames plus synthetic anomalies made from them. pipeline.data.synthetic_anomalies (confetti noise and
cut-paste) is FCDD's outlier exposure: validating on it would reward FCDD for recognising its own
training distribution rather than for finding defects. This module draws a different family, with
no shared shapes or operations, and closer to real surface defects:

- `crack`: thin cracks and scratches, a random-walk polyline (sometimes with a branch) of 5-30% of the
  frame's short side, 1-4 px wide at a 460 px short side (scaled with it, by 0.5 to 3), darker or
  brighter than the surface under it, with a rough intensity along its length.
- `region`: a DRAEM-style fractal-noise blob (6-35% of the short side; the shape only, no external
  texture is pasted) inside which the surface changes locally: an intensity shift, a contrast change,
  a blur, added noise, or scrambled texture (every pixel replaced by a random close neighbour).
- `warp`: a local deformation of the surface itself (radius 4-14% of the short side, smoothly fading
  to nothing at its edge): an elastic warp, a swirl, or a smear (the surface dragged along a
  direction). Its mask is where the surface moved by half a pixel or more.
- `spot`: one to four tiny spots or pits, from 2 px to about 3% of the short side, darker or brighter,
  some pits with a bright rim: fine defects matter.

Unlike synthetic_anomalies (B x 3 x S x S float tensors on a square training canvas), this works on
decoded frames at their native resolution: a uint8 H x W x 3 numpy image in, (a uint8 H x W x 3 image,
a bool H x W mask) out, with every size relative to the frame's short side, so 100 px and 1500 px frames
get the same defects relative to the part. All work happens inside the defect's window: a 1130 x 460
frame costs about 5-20 ms on a shared 2-core machine, most of it copying the frame.

Guarantees: deterministic given the numpy Generator; the mask is never empty; pixels outside the mask
are the input's, bit for bit; the change is visible (a defect whose mean absolute change inside its
mask is below MIN_MEAN_CHANGE grey levels is redrawn stronger, and after REDRAWS tries its region is
pushed away from its own grey level, which always passes); a grayscale frame (three equal channels)
stays grayscale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FAMILIES = ("crack", "region", "warp", "spot")
REGION_CHANGES = ("shift", "contrast", "blur", "noise", "scramble")
WARP_KINDS = ("elastic", "swirl", "smear")
MIN_MEAN_CHANGE = 6.0  # grey levels (of 255): the mean absolute change inside the mask must reach this
REDRAWS = 3  # tries, each stronger, before the forced fallback
_STRENGTHS = (1.0, 1.6, 2.5)
_FORCED_OFFSET = 60.0  # the fallback moves every masked pixel this far, towards the side with room
_REFERENCE_SIDE = 460.0  # crack widths are 1-4 px at this short side


@dataclass(frozen=True)
class ValidationAnomaly:
    image: np.ndarray  # uint8 H x W x 3
    mask: np.ndarray  # bool H x W, never empty
    family: str  # one of FAMILIES
    detail: str  # the sub-kind ("dark", "blur", "swirl", ...); "+forced" when the fallback was used
    strength: float  # the strength of the accepted draw (0.0 for the forced fallback)


# ------------------------------------------------------------------------------------------ public
def validation_anomaly(image: np.ndarray, rng: np.random.Generator, family: str | None = None) -> ValidationAnomaly:
    """One synthetic defect in `image` (uint8 H x W x 3, not modified); the family is drawn from `rng`
    unless given. See the module docstring for the families and the guarantees."""
    image = _check_image(image)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected a numpy Generator, got {type(rng).__name__}")
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    elif family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, choose from {FAMILIES}")
    gray = bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))
    work = image[..., :1] if gray else image  # a grayscale frame is altered on one channel, then copied
    draw = _DRAWERS[family]
    for strength in _STRENGTHS[:REDRAWS]:
        window, altered, footprint, detail = draw(work, rng, strength)
        new, change = _quantise(work, window, altered, footprint)
        if change >= MIN_MEAN_CHANGE:
            return _finish(image, work, window, new, footprint, family, detail, strength, gray)
    # Still invisible (a flat or saturated surface): push the last region away from its own level.
    y0, y1, x0, x1 = window
    before = work[y0:y1, x0:x1].astype(np.float32)
    forced = np.where(before < 128.0, before + _FORCED_OFFSET, before - _FORCED_OFFSET)
    new, _ = _quantise(work, window, forced, footprint)
    return _finish(image, work, window, new, footprint, family, f"{detail}+forced", 0.0, gray)


def make_validation_anomaly(
    image: np.ndarray, rng: np.random.Generator, family: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(altered uint8 H x W x 3, bool H x W mask) of `validation_anomaly`."""
    anomaly = validation_anomaly(image, rng, family)
    return anomaly.image, anomaly.mask


def validation_anomalies(images: list[np.ndarray], seed: int, per_image: int = 1) -> list[ValidationAnomaly]:
    """`per_image` anomalies of each image, image by image, each of another family: the first's family is
    drawn, the next ones follow it in FAMILIES' order, so every image shows several kinds of defect and the
    families stay balanced. Image i uses generators spawned from `seed` (SeedSequence(seed).spawn) for its
    position only, so its anomalies do not depend on the other images, and its first anomaly is the same
    whatever `per_image` is."""
    if not 1 <= per_image <= len(FAMILIES):
        raise ValueError(f"per_image must be 1..{len(FAMILIES)} (one anomaly per family at most), got {per_image}")
    anomalies = []
    for image, child in zip(images, np.random.SeedSequence(int(seed)).spawn(len(images))):
        first = validation_anomaly(image, np.random.default_rng(child))
        anomalies.append(first)
        start = FAMILIES.index(first.family)
        for turn, grandchild in enumerate(child.spawn(per_image - 1), start=1):
            family = FAMILIES[(start + turn) % len(FAMILIES)]
            anomalies.append(validation_anomaly(image, np.random.default_rng(grandchild), family))
    return anomalies


def make_validation_anomalies(images: list[np.ndarray], seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(altered frames, masks) of `validation_anomalies`, one per image."""
    anomalies = validation_anomalies(images, seed)
    return [a.image for a in anomalies], [a.mask for a in anomalies]


# ----------------------------------------------------------------------------------------- helpers
Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (inside the frame, non-empty)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image too small for a defect: {image.shape[:2]}")
    return image


def _quantise(
    work: np.ndarray, window: Window, altered: np.ndarray, footprint: np.ndarray
) -> tuple[np.ndarray, float]:
    """The window's new uint8 pixels (the old ones outside the footprint) and the mean absolute
    change inside the footprint."""
    y0, y1, x0, x1 = window
    before = work[y0:y1, x0:x1]
    new = np.where(footprint[..., None], np.clip(np.rint(altered), 0, 255).astype(np.uint8), before)
    change = np.abs(new.astype(np.int16) - before.astype(np.int16))[footprint]
    return new, float(change.mean())


def _finish(
    image: np.ndarray, work: np.ndarray, window: Window, new: np.ndarray, footprint: np.ndarray,
    family: str, detail: str, strength: float, gray: bool,
) -> ValidationAnomaly:  # fmt: skip
    y0, y1, x0, x1 = window
    out = image.copy()
    out[y0:y1, x0:x1] = np.repeat(new, 3, axis=2) if gray else new
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = footprint
    return ValidationAnomaly(out, mask, family, detail, strength)


def _short_side(work: np.ndarray) -> int:
    return min(work.shape[0], work.shape[1])


def _window(work: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> Window:
    """The frame's pixels within (ry, rx) of (cy, cx), at least one pixel."""
    height, width = work.shape[:2]
    y0 = int(np.clip(math.floor(cy - ry), 0, height - 1))
    x0 = int(np.clip(math.floor(cx - rx), 0, width - 1))
    y1 = int(np.clip(math.ceil(cy + ry) + 1, y0 + 1, height))
    x1 = int(np.clip(math.ceil(cx + rx) + 1, x0 + 1, width))
    return y0, y1, x0, x1


def _grid(window: Window, cy: float, cx: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dy, dx) of the window's pixels from (cy, cx), float32, broadcastable."""
    y0, y1, x0, x1 = window
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return dy, dx


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _ensure_one(footprint: np.ndarray, window: Window, cy: float, cx: float) -> np.ndarray:
    """The footprint, or its pixel nearest (cy, cx) when it came out empty."""
    if not footprint.any():
        y0, y1, x0, x1 = window
        footprint[int(np.clip(round(cy) - y0, 0, y1 - y0 - 1)), int(np.clip(round(cx) - x0, 0, x1 - x0 - 1))] = True
    return footprint


def _darken_or_brighten(values: np.ndarray, amount: np.ndarray, dark: bool) -> np.ndarray:
    """Move `values` (h x w x C) a fraction `amount` (h x w) of the way to black or to white."""
    amount = amount[..., None]
    return values * (1.0 - amount) if dark else values + amount * (255.0 - values)


def _prefer_dark(values: np.ndarray, rng: np.random.Generator) -> bool:
    """Darker more often on bright surfaces, brighter on dark ones (where there is room)."""
    level = float(values.mean()) / 255.0
    return bool(rng.random() < np.clip(level, 0.15, 0.85))


def _fractal_noise(shape: tuple[int, int], rng: np.random.Generator, cells: float, octaves: int = 3) -> np.ndarray:
    """Zero-mean, unit-variance fractal value noise: octaves of random grids (cells, 2 x cells, ...
    across the longer side) upsampled bicubically, halving the amplitude per octave."""
    height, width = shape
    total = np.zeros(shape, dtype=np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        across = cells * 2**octave
        gh = max(2, int(round(across * height / max(height, width))) + 1)
        gw = max(2, int(round(across * width / max(height, width))) + 1)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        total += amplitude * np.asarray(smooth)
        amplitude *= 0.5
    total -= total.mean()
    return total / max(float(total.std()), 1e-6)


# -------------------------------------------------------------------------------------------- crack
def _crack(work: np.ndarray, rng: np.random.Generator, strength: float):
    height, width = work.shape[:2]
    side = _short_side(work)
    length = max(6.0, rng.uniform(0.05, 0.30) * side)
    steps = int(rng.integers(6, 17))
    heading = rng.uniform(0, 2 * math.pi)
    wander = rng.uniform(0.05, 0.45)  # radians of heading change per step (std)
    turns = heading + np.cumsum(rng.normal(0.0, wander, steps))
    step = length / steps
    points = np.zeros((steps + 1, 2))
    points[1:, 0] = np.cumsum(step * np.sin(turns))
    points[1:, 1] = np.cumsum(step * np.cos(turns))
    polylines = [points]
    if rng.random() < 0.3:  # a branch from an interior vertex
        start = points[int(rng.integers(1, steps))]
        n_branch = max(2, steps // 2)
        fork = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.2)
        branch_turns = turns[0] + fork + np.cumsum(rng.normal(0, wander, n_branch))
        branch_step = rng.uniform(0.2, 0.5) * length / n_branch
        branch = np.zeros((n_branch + 1, 2))
        branch[0] = start
        branch[1:, 0] = start[0] + np.cumsum(branch_step * np.sin(branch_turns))
        branch[1:, 1] = start[1] + np.cumsum(branch_step * np.cos(branch_turns))
        polylines.append(branch)
    # Place the crack's bounding box at a random spot, inside the frame where it fits.
    stacked = np.concatenate(polylines)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    extent = high - low
    cy = rng.uniform(min(extent[0] / 2, height / 2), max(height - 1 - extent[0] / 2, height / 2))
    cx = rng.uniform(min(extent[1] / 2, width / 2), max(width - 1 - extent[1] / 2, width / 2))
    offset = np.array([cy, cx]) - (low + high) / 2
    polylines = [line + offset for line in polylines]
    scale = float(np.clip(side / _REFERENCE_SIDE, 0.5, 3.0))
    line_width = max(1, int(round(rng.uniform(1.0, 4.0) * scale)))
    reach = line_width / 2 + 2
    window = _window(work, cy, cx, extent[0] / 2 + reach, extent[1] / 2 + reach)
    y0, y1, x0, x1 = window
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    pen = ImageDraw.Draw(canvas)
    for line in polylines:
        xy = [(float(x - x0), float(y - y0)) for y, x in line]
        pen.line(xy, fill=255, width=line_width, joint="curve" if line_width > 2 else None)
    footprint = _ensure_one(np.asarray(canvas) > 0, window, polylines[0][0, 0], polylines[0][0, 1])
    before = work[y0:y1, x0:x1].astype(np.float32)
    dark = _prefer_dark(before[footprint], rng)
    depth = min(0.95, rng.uniform(0.3, 0.65) * strength)
    rough = rng.uniform(0.7, 1.0, footprint.shape).astype(np.float32)
    altered = _darken_or_brighten(before, depth * rough, dark)
    return window, altered, footprint, "dark" if dark else "bright"


# ------------------------------------------------------------------------------------------- region
def _region(work: np.ndarray, rng: np.random.Generator, strength: float):
    height, width = work.shape[:2]
    side = _short_side(work)
    diameter = max(6.0, _log_uniform(rng, 0.06, 0.35) * side)
    aspect = math.exp(rng.uniform(-0.6, 0.6))
    ry, rx = diameter / 2 * math.sqrt(aspect), diameter / 2 / math.sqrt(aspect)
    angle = rng.uniform(0, math.pi)
    cy, cx = rng.uniform(0, height - 1), rng.uniform(0, width - 1)
    change = REGION_CHANGES[int(rng.integers(len(REGION_CHANGES)))]
    sigma = max(1.0, rng.uniform(0.008, 0.025) * side) * strength  # blur / scramble reach
    margin = math.ceil(3 * sigma) if change in ("blur", "scramble") else 0
    big = max(ry, rx)
    window = _window(work, cy, cx, big + margin, big + margin)
    dy, dx = _grid(window, cy, cx)
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = dy * cos + dx * sin, -dy * sin + dx * cos
    radius = np.sqrt((u / ry) ** 2 + (v / rx) ** 2)  # 1 at the ellipse
    noise = _fractal_noise(radius.shape, rng, cells=rng.uniform(2.0, 5.0) * (radius.shape[0] / (2 * big + 1)))
    score = noise + 2.0 * (1.0 - radius**2)
    inside = radius < 1.0
    if inside.any():
        cover = rng.uniform(0.3, 0.75)
        footprint = inside & (score >= np.quantile(score[inside], 1.0 - cover))
    else:
        footprint = inside
    footprint = _ensure_one(footprint, window, cy, cx)
    y0, y1, x0, x1 = window
    before = work[y0:y1, x0:x1].astype(np.float32)
    channels = before.shape[2]
    if change == "shift":
        dark = _prefer_dark(before[footprint], rng)
        offset = (-1.0 if dark else 1.0) * rng.uniform(20.0, 50.0) * strength
        altered = before + np.float32(offset)
        if channels == 3 and rng.random() < 0.3:  # a stain: a slight colour cast as well
            altered = altered * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        change = "dark" if dark else "bright"
    elif change == "contrast":
        mean = before[footprint].mean(axis=0)
        gain = rng.uniform(0.15, 0.5) if rng.random() < 0.5 else rng.uniform(1.6, 2.4) * strength
        if gain < 1.0:
            gain = max(0.0, 1.0 - (1.0 - gain) * strength)
        altered = (before - mean) * np.float32(gain) + mean
    elif change == "blur":
        # PIL's (extended box) Gaussian blur on the uint8 window: fast at any sigma, edges repeated.
        pixels = work[y0:y1, x0:x1]
        blurred = Image.fromarray(pixels[..., 0] if channels == 1 else pixels).filter(
            ImageFilter.GaussianBlur(sigma)
        )
        altered = np.asarray(blurred, dtype=np.float32).reshape(before.shape)
    elif change == "noise":
        spread = rng.uniform(15.0, 40.0) * strength
        shared = channels == 1 or rng.random() < 0.5
        shape = (*footprint.shape, 1 if shared else channels)
        altered = before + (spread * rng.standard_normal(shape)).astype(np.float32)
    else:  # scramble: every pixel takes the value of a random neighbour within `sigma`
        reach = max(1, int(round(sigma)))
        jump_y = rng.integers(-reach, reach + 1, footprint.shape)
        jump_x = rng.integers(-reach, reach + 1, footprint.shape)
        ys = np.clip(np.arange(y1 - y0)[:, None] + jump_y, 0, y1 - y0 - 1)
        xs = np.clip(np.arange(x1 - x0)[None, :] + jump_x, 0, x1 - x0 - 1)
        altered = before[ys, xs]
    return window, altered, footprint, change


# --------------------------------------------------------------------------------------------- warp
def _warp(work: np.ndarray, rng: np.random.Generator, strength: float):
    height, width = work.shape[:2]
    side = _short_side(work)
    radius = max(4.0, _log_uniform(rng, 0.04, 0.14) * side)
    cy, cx = rng.uniform(0, height - 1), rng.uniform(0, width - 1)
    kind = WARP_KINDS[int(rng.integers(len(WARP_KINDS)))]
    if kind == "smear":
        heading = rng.uniform(0, 2 * math.pi)
        drag = rng.uniform(0.4, 1.0) * radius * strength
        reach = drag  # samples come from up to `drag` behind a pixel
    elif kind == "swirl":
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.8) * strength  # radians at the centre
        reach = 0.0  # a rotation about the centre stays within the radius
    else:  # elastic: a smooth random field
        amplitude = rng.uniform(0.15, 0.35) * radius * strength
        reach = amplitude
    # The footprint's window (outputs), inside the source window (samples).
    window = _window(work, cy, cx, radius, radius)
    dy, dx = _grid(window, cy, cx)
    r2 = dy**2 + dx**2
    weight = np.maximum(0.0, 1.0 - r2 / radius**2) ** 2  # 1 at the centre, smoothly 0 at the radius: no seam
    if kind == "smear":
        move = drag * weight
        displacement = move  # the farthest sample
    elif kind == "swirl":
        angle = turn * weight
        cos, sin = np.cos(angle), np.sin(angle)
        ddy, ddx = dy * cos - dx * sin - dy, dy * sin + dx * cos - dx
        displacement = np.sqrt(ddy**2 + ddx**2)
    else:
        ddy = amplitude * weight * _fractal_noise(weight.shape, rng, cells=3.0, octaves=2)
        ddx = amplitude * weight * _fractal_noise(weight.shape, rng, cells=3.0, octaves=2)
        displacement = np.sqrt(ddy**2 + ddx**2)
    footprint = _ensure_one((displacement >= 0.5) & (weight > 0), window, cy, cx)  # moved by half a pixel or more
    source = _window(work, cy, cx, radius + reach + 1, radius + reach + 1)
    sy0, sy1, sx0, sx1 = source
    y0, y1, x0, x1 = window
    values = work[sy0:sy1, sx0:sx1].astype(np.float32)
    rows, cols = np.nonzero(footprint)
    ys = (rows + (y0 - sy0)).astype(np.float32)  # footprint pixels in source coordinates
    xs = (cols + (x0 - sx0)).astype(np.float32)
    if kind == "smear":
        step = move[rows, cols]
        samples = 8
        moved = np.zeros((rows.size, values.shape[2]), dtype=np.float32)
        for t in np.linspace(0.0, 1.0, samples, dtype=np.float32):
            moved += _bilinear(values, ys - t * step * math.sin(heading), xs - t * step * math.cos(heading))
        moved /= samples
    else:
        moved = _bilinear(values, ys + ddy[rows, cols], xs + ddx[rows, cols])
    altered = work[y0:y1, x0:x1].astype(np.float32)
    altered[rows, cols] = moved
    return window, altered, footprint, kind


def _bilinear(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples (N x C) of h x w x C `values` at the points (ys, xs), edges repeated."""
    height, width, channels = values.shape
    ys = np.clip(ys, 0, height - 1)
    xs = np.clip(xs, 0, width - 1)
    top, left = ys.astype(np.intp), xs.astype(np.intp)  # floor: both are >= 0
    wy, wx = (ys - top)[:, None], (xs - left)[:, None]
    down = (top < height - 1) * width  # flat offsets to the next row / column (0 at the last one)
    across = (left < width - 1).astype(np.intp)
    flat = values.reshape(-1, channels)
    index = top * width + left
    a, b = np.take(flat, index, axis=0), np.take(flat, index + across, axis=0)
    c, d = np.take(flat, index + down, axis=0), np.take(flat, index + down + across, axis=0)
    upper = a + (b - a) * wx
    lower = c + (d - c) * wx
    return upper + (lower - upper) * wy


# --------------------------------------------------------------------------------------------- spot
def _spot(work: np.ndarray, rng: np.random.Generator, strength: float):
    height, width = work.shape[:2]
    side = _short_side(work)
    largest = max(4.0, 0.03 * side)
    count = int(rng.integers(1, 5))
    cy, cx = rng.uniform(0, height - 1), rng.uniform(0, width - 1)
    spread = rng.uniform(0.0, 0.08) * side  # 0: one spot where it is, more: a small cluster
    centres = np.array([cy, cx]) + rng.normal(0.0, spread + 1e-6, (count, 2))
    centres[:, 0] = np.clip(centres[:, 0], 0, height - 1)
    centres[:, 1] = np.clip(centres[:, 1], 0, width - 1)
    diameters = np.array([_log_uniform(rng, 2.0, largest) for _ in range(count)])
    rim = rng.random() < 0.3  # pits: a darker core with a bright rim
    rim_width = np.maximum(1.0, diameters / 4) if rim else np.zeros(count)
    reach = diameters / 2 + rim_width + 1
    low = (centres - reach[:, None]).min(axis=0)
    high = (centres + reach[:, None]).max(axis=0)
    centre, half = (low + high) / 2, (high - low) / 2
    window = _window(work, centre[0], centre[1], half[0], half[1])
    y0, y1, x0, x1 = window
    before = work[y0:y1, x0:x1].astype(np.float32)
    core = np.zeros(before.shape[:2], dtype=np.float32)  # depth profile of the spots, 0..1
    ring = np.zeros(before.shape[:2], dtype=bool)
    for (sy, sx), diameter, width_rim in zip(centres, diameters, rim_width):
        dy, dx = _grid(window, sy, sx)
        r = np.sqrt(dy**2 + dx**2) / max(diameter / 2, 0.5)
        core = np.maximum(core, np.where(r <= 1.0, 1.0 - 0.5 * r**2, 0.0))  # soft: half depth at the edge
        if rim:
            ring |= (r > 1.0) & (r <= 1.0 + width_rim / max(diameter / 2, 0.5))
    ring &= core == 0
    footprint = (core > 0) | ring
    footprint = _ensure_one(footprint, window, centres[0, 0], centres[0, 1])
    if not (core > 0).any():  # spots between pixel centres: the marked pixel is the spot
        core = footprint.astype(np.float32)
    dark = True if rim else _prefer_dark(before[footprint], rng)
    depth = min(0.95, rng.uniform(0.35, 0.75) * strength)
    altered = _darken_or_brighten(before, depth * core, dark)
    if rim:
        lit = _darken_or_brighten(before, np.full(core.shape, depth * 0.6, np.float32), False)
        altered = np.where(ring[..., None], lit, altered)
    return window, altered, footprint, "pit" if rim else ("dark" if dark else "bright")


_DRAWERS = {"crack": _crack, "region": _region, "warp": _warp, "spot": _spot}
