"""Frames to expert inputs and expert maps back to frames, for one task's InputSpec (schemas.spec).

`frame_views(image, spec)` turns one decoded frame into one or more views (float32 3 x h x w in [0, 1],
all of the spec's size, so views of many frames stack into one batch); `stitch(views, maps, frame_hw)`
puts the views' maps back at the frame's own resolution. An image score over several views is the
largest view score (a defect anywhere is a defect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.features.imaging import resize_map, resize_rgb
from schemas.spec import InputSpec


@dataclass(frozen=True)
class View:
    """One expert input cut from a frame. `region` is where it lies in the frame scaled by `scale`
    (y0, x0, y1, x1); `content` is the part of the view that shows the frame (the rest is padding)."""

    pixels: np.ndarray  # 3 x h x w float32 in [0, 1]
    region: tuple[int, int, int, int]
    content: tuple[int, int, int, int]
    scaled_hw: tuple[int, int]  # size of the scaled frame the regions refer to


def to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected uint8 HxW or HxWx3, got {image.dtype} {image.shape}")
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, antialiased when shrinking (PIL widens the kernel with the scale factor)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def frame_views(image: np.ndarray, spec: InputSpec) -> list[View]:
    image = to_rgb(image)
    if spec.resize == "squeeze":
        full = (0, 0, spec.height, spec.width)
        return [View(resize_rgb(image, spec.height, spec.width), full, full, (spec.height, spec.width))]
    if spec.resize == "letterbox":
        return [_letterbox(image, spec.height, spec.width)]
    return _tiles(image, spec)


def _letterbox(image: np.ndarray, height: int, width: int) -> View:
    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    resized = resize_uint8(image, new_h, new_w)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    # Edge replication, not a constant: a flat border would itself look like a structure to the CNN.
    padded = np.pad(resized, ((top, height - new_h - top), (left, width - new_w - left), (0, 0)), mode="edge")
    content = (top, left, top + new_h, left + new_w)
    return View(_chw(padded), (0, 0, new_h, new_w), content, (new_h, new_w))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles covering [0, length): at least `overlap` shared between neighbours, spread evenly,
    the last tile ending exactly at `length`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _tiles(image: np.ndarray, spec: InputSpec) -> list[View]:
    h, w = image.shape[:2]
    # Scale by tile_scale, but never below one tile: small frames are enlarged to fill a tile.
    scale = max(spec.tile_scale, spec.height / h, spec.width / w)
    scaled_h, scaled_w = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
    scaled = resize_uint8(image, scaled_h, scaled_w)
    views = []
    for y in tile_starts(scaled_h, spec.height, spec.tile_overlap):
        for x in tile_starts(scaled_w, spec.width, spec.tile_overlap):
            tile = scaled[y : y + spec.height, x : x + spec.width]
            views.append(View(_chw(tile), (y, x, y + spec.height, x + spec.width), (0, 0, spec.height, spec.width),
                              (scaled_h, scaled_w)))
    return views


def stitch(views: list[View], maps: list[np.ndarray], frame_hw: tuple[int, int]) -> np.ndarray:
    """The views' maps (each h x w, the view's size) as one float32 map at frame_hw."""
    scaled_h, scaled_w = views[0].scaled_hw
    total = np.zeros((scaled_h, scaled_w), dtype=np.float64)
    weight = np.zeros((scaled_h, scaled_w), dtype=np.float64)
    for view, score_map in zip(views, maps):
        cy0, cx0, cy1, cx1 = view.content
        y0, x0, y1, x1 = view.region
        part = resize_map(np.asarray(score_map, dtype=np.float32)[cy0:cy1, cx0:cx1], (y1 - y0, x1 - x0))
        total[y0:y1, x0:x1] += part
        weight[y0:y1, x0:x1] += 1.0
    stitched = (total / np.maximum(weight, 1.0)).astype(np.float32)
    return resize_map(stitched, frame_hw)
