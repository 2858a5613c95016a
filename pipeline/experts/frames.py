"""Frames in, frame-resolution outputs out: one expert at one task's InputSpec.

The one path by which frames reach an expert, for live inspection, calibration, the automatic choice
and the benchmarks alike: each frame becomes its spec's views (pipeline.features.geometry), views of
all frames are batched through the spec's backbone and the expert, and each frame's views are stitched
back into one map at the frame's own resolution; a frame's image score is its largest view score.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.experts.base import Expert
from pipeline.features.backbone import Backbones, FeatureBatch
from pipeline.features.geometry import View, frame_views, stitch
from pipeline.features.imaging import resize_map
from schemas.spec import InputSpec


@dataclass
class FrameOutputs:
    scores: np.ndarray  # N raw image scores
    maps: list[np.ndarray]  # N float32 maps, each at its frame's H x W


def view_batches(images: Sequence[np.ndarray], spec: InputSpec, backbones: Backbones, batch_size: int,
                 keys: bool = False) -> Iterator[tuple[list[int], list[View], FeatureBatch]]:
    """(frame index of each view, the views, their features) per batch of at most `batch_size` views."""
    backbone = backbones.for_spec(spec.backbone)
    owners, views = [], []
    for index, image in enumerate(images):
        frame = frame_views(image, spec)
        owners.extend([index] * len(frame))
        views.extend(frame)
    for start in range(0, len(views), batch_size):
        chunk = views[start : start + batch_size]
        features = backbone.extract([v.pixels for v in chunk], keys=keys, cnn=spec.uses_cnn)
        features.valid = _valid_pixels(chunk)
        yield owners[start : start + batch_size], chunk, features


def _valid_pixels(views: Sequence[View]) -> torch.Tensor | None:
    """B x H x W: where each view shows its frame (None when every view is all frame, e.g. tiles)."""
    h, w = views[0].pixels.shape[-2:]
    if all(v.content == (0, 0, h, w) for v in views):
        return None
    valid = torch.zeros(len(views), h, w, dtype=torch.bool)
    for row, view in enumerate(views):
        y0, x0, y1, x1 = view.content
        valid[row, y0:y1, x0:x1] = True
    return valid


def fit_batches(images: Sequence[np.ndarray], spec: InputSpec, backbones: Backbones, batch_size: int) -> list[FeatureBatch]:
    """Features of every view of the given normal frames, for Expert.fit."""
    return [features for _, _, features in view_batches(images, spec, backbones, batch_size)]


def run_on_frames(expert: Expert, spec: InputSpec, backbones: Backbones, images: Sequence[np.ndarray],
                  batch_size: int = 16, shared: FeatureBatch | None = None) -> FrameOutputs:
    """Scores and frame-resolution maps. `shared`: features the caller already computed for exactly
    these frames at exactly this spec (routing's pass), used instead of running the backbone again."""
    backbone = backbones.for_spec(spec.backbone)
    if shared is not None:
        output = expert.predict(shared, backbone)
        # a squeezed frame is one full-canvas view: stitching it is a resize to the frame
        maps = [resize_map(m, image.shape[:2]) for m, image in zip(output.maps, images)]
        return FrameOutputs(np.asarray(output.scores, dtype=np.float32), maps)
    per_frame_views: list[list[View]] = [[] for _ in images]
    per_frame_maps: list[list[np.ndarray]] = [[] for _ in images]
    scores = np.full(len(images), -np.inf, dtype=np.float32)
    for owners, views, features in view_batches(images, spec, backbones, batch_size):
        output = expert.predict(features, backbone)
        for owner, view, score, score_map in zip(owners, views, output.scores, output.maps):
            per_frame_views[owner].append(view)
            per_frame_maps[owner].append(score_map)
            scores[owner] = max(scores[owner], float(score))
    maps = [stitch(v, m, image.shape[:2]) for v, m, image in zip(per_frame_views, per_frame_maps, images)]
    return FrameOutputs(scores, maps)
