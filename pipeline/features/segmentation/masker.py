"""Structure masks for UCAD's structure-based contrastive learning: SAM's automatic masks as a label map.

UCAD (Liu et al., AAAI 2024) pulls together the patch tokens that lie in one Segment-Anything region
and pushes apart those of different regions. Only a region id per pixel (and then per patch) is
needed, so the masks are flattened into one label map.

SAM's automatic generator is expensive on CPU. Measured on 2 cores: the encoder costs ~3-5 s per image
whatever the input (SAM always resizes to 1024 x 1024), but the mask decoder runs its two-way
transformer over all 64 x 64 embedding tokens once per prompt point, ~0.2 s a point, so SAM's default
32 x 32 grid costs ~4-5 min an image. The grid is therefore the lever: 8 x 8 by default (~15-25 s).
Shrinking the image to `input_size` first saves only the per-mask post-processing at image resolution
(thresholds, stability scores, boxes, run-length encoding): ~4 s of ~25 s on a 1130 x 460 image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.features.segmentation.sam import build_mobile_sam

if TYPE_CHECKING:
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam


@dataclass(frozen=True)
class MaskerConfig:
    """Automatic-mask settings; every field is part of the cache key (pipeline.features.segmentation.cache)."""

    input_size: int | None = 256  # longest image side handed to SAM; None keeps the original size
    points_per_side: int = 8  # SAM's default is 32: 16x the prompts
    points_per_batch: int = 64  # prompts decoded together: peak memory (~2 GB at 64), not results
    # Below SAM's 0.88 / 0.95: at those, 8 x 8 points found a single region on a magnetic-tile image
    # (nothing to contrast); 0.8 / 0.9 found 2, and 4 on a ball screw.
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.9
    box_nms_thresh: float = 0.7
    # Masks smaller than this many pixels (at input_size scale) are dropped before painting. Unlike
    # SAM's option of the same name (which needs OpenCV and trims holes/islands inside masks), whole
    # masks are dropped.
    min_mask_region_area: int = 16
    crop_n_layers: int = 0

    def __post_init__(self) -> None:
        if self.input_size is not None and self.input_size < 16:
            raise ValueError(f"input_size must be at least 16 pixels or None, got {self.input_size}")
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be positive")
        if self.min_mask_region_area < 0 or self.crop_n_layers < 0:
            raise ValueError("min_mask_region_area and crop_n_layers must not be negative")


class StructureMasker:
    """Region label maps from MobileSAM's automatic masks; build once, reuse for many images.

    The model is built on first use (a few seconds) unless one is passed in, so several maskers
    with different configs can share one model.
    """

    def __init__(self, config: MaskerConfig = MaskerConfig(), model: Sam | None = None,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.device = device
        self._model = model
        self._generator: SamAutomaticMaskGenerator | None = None

    @property
    def model(self) -> Sam:
        if self._model is None:
            self._model = build_mobile_sam(self.device)
        return self._model

    @property
    def generator(self) -> SamAutomaticMaskGenerator:
        if self._generator is None:
            # segment_anything is imported on first use: masks cached on disk are read without it
            from segment_anything import SamAutomaticMaskGenerator

            config = self.config
            self._generator = SamAutomaticMaskGenerator(
                self.model,
                points_per_side=config.points_per_side,
                points_per_batch=config.points_per_batch,
                pred_iou_thresh=config.pred_iou_thresh,
                stability_score_thresh=config.stability_score_thresh,
                box_nms_thresh=config.box_nms_thresh,
                crop_n_layers=config.crop_n_layers,
                min_mask_region_area=0,  # SAM's version needs OpenCV; ours is applied in `masks`
                output_mode="binary_mask",
            )
        return self._generator

    def label_map(self, image_rgb_uint8: np.ndarray) -> np.ndarray:
        """H x W int32 at the original size: 0 = no mask, 1..R = regions, largest painted first."""
        image = as_rgb_uint8(image_rgb_uint8)
        small = resize_longest_side(image, self.config.input_size)
        labels = paint_label_map(self.masks(small), small.shape[:2])
        return resize_nearest(labels, image.shape[:2])

    def masks(self, image_rgb_uint8: np.ndarray) -> list[np.ndarray]:
        """SAM's boolean masks of the image as given (no resizing), small ones dropped."""
        with torch.inference_mode():
            records = self.generator.generate(as_rgb_uint8(image_rgb_uint8))
        min_area = max(self.config.min_mask_region_area, 1)
        return [record["segmentation"] for record in records if record["area"] >= min_area]


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3; grayscale (H x W or H x W x 1) is repeated into three channels."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 RGB, got shape {image.shape}")
    return np.ascontiguousarray(image)


def resized_shape(shape: tuple[int, int], longest_side: int) -> tuple[int, int]:
    height, width = shape
    scale = longest_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_longest_side(image: np.ndarray, longest_side: int | None) -> np.ndarray:
    """Bilinear (antialiased when shrinking, as pipeline.features.imaging) to the given longest side."""
    if longest_side is None or max(image.shape[:2]) == longest_side:
        return image
    height, width = resized_shape(image.shape[:2], longest_side)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def paint_label_map(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Paint masks largest first so smaller (nested) masks win on overlap; labels 1..R are then
    renumbered in painting order so that every label is visible somewhere."""
    painted = np.zeros(shape, dtype=np.int32)
    for index, mask in enumerate(sorted(masks, key=lambda m: int(m.sum()), reverse=True), start=1):
        painted[mask] = index
    present = np.unique(painted)
    present = present[present > 0]
    relabel = np.zeros(len(masks) + 1, dtype=np.int32)
    relabel[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return relabel[painted]


def resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres (labels must not be interpolated)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64),
                      labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64),
                      labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def patch_labels(label_map: np.ndarray, grid: int) -> np.ndarray:
    """grid x grid int32: the most frequent label (0 included; ties -> smallest label) in each cell.

    Gives each ViT patch token the region it mostly lies in. Cells split the image as evenly as
    possible (boundaries at round(i * H / grid)), so any image size works.
    """
    height, width = label_map.shape
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"grid must be in 1..{min(height, width)} for a {height} x {width} map, got {grid}")
    if label_map.min() < 0:
        raise ValueError("labels must not be negative")
    row_cell = np.searchsorted(np.round(np.arange(1, grid) * height / grid), np.arange(height), side="right")
    col_cell = np.searchsorted(np.round(np.arange(1, grid) * width / grid), np.arange(width), side="right")
    cell = (row_cell[:, None] * grid + col_cell[None, :]).ravel()
    num_labels = int(label_map.max()) + 1
    counts = np.bincount(cell * num_labels + label_map.ravel().astype(np.int64),
                         minlength=grid * grid * num_labels).reshape(grid * grid, num_labels)
    return counts.argmax(axis=1).astype(np.int32).reshape(grid, grid)
