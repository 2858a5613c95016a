"""Per-task input specs: frames to views and maps back, letterbox and tiles, on real experts too."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from pydantic import ValidationError

from pipeline.experts.base import Expert, ExpertOutput
from pipeline.experts.frames import run_on_frames
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.features.backbone import Backbones, FeatureBatch
from pipeline.features.geometry import frame_views, stitch, tile_starts
from schemas.spec import InputSpec, legacy_spec, routing_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _GreyMap(Expert):
    """Test double for geometry alone: the map is the view's own first channel, the score its maximum."""

    name = "grey_map"

    def fit(self, batches, backbone=None) -> None: ...

    def predict(self, batch: FeatureBatch, backbone=None) -> ExpertOutput:
        maps = batch.pixels[:, 0].cpu().numpy()
        return ExpertOutput(scores=maps.reshape(len(maps), -1).max(axis=1), maps=maps)

    def to_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls, data: bytes) -> "_GreyMap":
        return cls()


def _gradient_frame(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    grey = (255 * (0.3 * y / height + 0.7 * x / width)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# ------------------------------------------------------------------------------------------ specs
def test_spec_validation() -> None:
    with pytest.raises(ValidationError, match="multiples of 14"):
        InputSpec(backbone="dinov2_vits14", height=448, width=450)
    with pytest.raises(ValidationError, match="apply to resize='tiles' only"):
        InputSpec(resize="letterbox", tile_overlap=8)
    with pytest.raises(ValidationError, match="half the tile"):
        InputSpec(resize="tiles", height=64, width=64, tile_overlap=40)
    assert legacy_spec(224).resize == "squeeze" and routing_spec(128).height == 126
    spec = InputSpec(resize="tiles", height=256, width=256, tile_overlap=32)
    assert InputSpec.model_validate_json(spec.model_dump_json()) == spec
    assert "tiles 256x256" in spec.describe()


def test_tile_starts_cover_with_overlap() -> None:
    assert tile_starts(200, 256, 32) == [0]
    starts = tile_starts(1130, 256, 32)
    assert starts[0] == 0 and starts[-1] == 1130 - 256
    gaps = np.diff(starts)
    assert (gaps <= 256 - 32).all() and gaps.max() - gaps.min() <= 1  # evenly spread, >= 32 px shared


# ------------------------------------------------------------------------------------------ views
def test_letterbox_keeps_the_aspect_and_pads_by_edge() -> None:
    frame = _gradient_frame(100, 300)
    (view,) = frame_views(frame, InputSpec(resize="letterbox", height=224, width=224))
    assert view.pixels.shape == (3, 224, 224)
    top, left, bottom, right = view.content
    assert (left, right) == (0, 224) and bottom - top == 75  # 100 x 300 scaled by 224 / 300
    np.testing.assert_array_equal(view.pixels[:, 0], view.pixels[:, top])  # padding repeats the edge row


@pytest.mark.parametrize("spec", [
    InputSpec(resize="letterbox", height=224, width=544),
    InputSpec(resize="letterbox", height=224, width=224),
    InputSpec(resize="tiles", height=128, width=128, tile_overlap=16),
    InputSpec(resize="tiles", height=128, width=128, tile_overlap=16, tile_scale=0.5),
    InputSpec(resize="squeeze", height=96, width=96),
])
def test_stitched_maps_line_up_with_the_frame(spec: InputSpec) -> None:
    """A map equal to each view's own pixels stitches back into the frame itself: every view's map is
    placed where the view came from, at the frame's resolution."""
    frame = _gradient_frame(230, 565)
    views = frame_views(frame, spec)
    out = run_on_frames(_GreyMap(), spec, Backbones(_no_backbone()), [frame], batch_size=4)
    assert out.maps[0].shape == frame.shape[:2]
    expected = frame[:, :, 0].astype(np.float32) / 255
    tolerance = 0.02 if spec.resize != "squeeze" else 0.03  # interpolation of a smooth ramp
    assert np.abs(out.maps[0] - expected).max() < tolerance
    assert out.scores[0] == pytest.approx(max(v.pixels[0].max() for v in views))
    if spec.resize == "tiles":
        assert len(views) > 1 and {v.pixels.shape for v in views} == {(3, 128, 128)}


def test_stitch_averages_overlaps() -> None:
    frame = _gradient_frame(128, 240)
    spec = InputSpec(resize="tiles", height=128, width=128, tile_overlap=16)
    views = frame_views(frame, spec)
    assert len(views) == 2
    ones = [np.full((128, 128), value, dtype=np.float32) for value in (1.0, 3.0)]
    stitched = stitch(views, ones, frame.shape[:2])
    assert stitched[:, 0].max() == 1.0 and stitched[:, -1].min() == 3.0
    shared = stitched[:, views[1].region[1] + 1 : views[0].region[3] - 1]
    np.testing.assert_allclose(shared, 2.0)


def _no_backbone():
    """The CNN-less extractor the grey-map double needs (its pixels are all it reads)."""
    from pipeline.features.backbone import Backbone

    return Backbone()


# ------------------------------------------------------------------------ a real expert on tiles
def _large_texture_frames(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    texture = np.tile(skimage.data.brick(), (2, 3))  # 1024 x 1536 CC0 texture
    frames = []
    for _ in range(count):
        y, x = rng.integers(0, 1024 - 480), rng.integers(0, 1536 - 900)
        frames.append(np.repeat(texture[y : y + 480, x : x + 900, None], 3, axis=2))
    return frames


def test_tiled_patchcore_map_finds_a_defect_on_a_tile_border() -> None:
    """Native-resolution tiles of a 480 x 900 frame: a small defect straddling the border between two
    tiles is where the stitched map peaks, at the frame's own coordinates."""
    rng = np.random.default_rng(0)
    spec = InputSpec(resize="tiles", height=256, width=256, tile_overlap=32)
    backbones = Backbones.pretrained()
    normal = _large_texture_frames(5, rng)
    expert = PatchCore(PatchCoreConfig(coreset_ratio=0.1, max_coreset_size=2000, seed=0))
    from pipeline.experts.frames import fit_batches

    expert.fit(fit_batches(normal, spec, backbones, batch_size=8))
    frame = _large_texture_frames(1, rng)[0].copy()
    starts = tile_starts(900, 256, 32)
    border_x = starts[1] + 16  # inside the overlap of tiles 0 and 1
    cy, cx, radius = 300, border_x, 9
    yy, xx = np.mgrid[0:480, 0:900]
    defect = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    frame[defect] = 255
    (score_map,) = run_on_frames(expert, spec, backbones, [frame], batch_size=8).maps
    assert score_map.shape == (480, 900)
    peak_y, peak_x = np.unravel_index(np.argmax(score_map), score_map.shape)
    assert abs(peak_y - cy) <= 24 and abs(peak_x - cx) <= 24, (peak_y, peak_x)
    assert score_map[defect].mean() > np.quantile(score_map[~defect], 0.99)


# ------------------------------------------------------------------------------ padding is not the product
def test_letterboxed_views_mark_their_padding() -> None:
    from pipeline.experts.frames import view_batches

    spec = InputSpec(resize="letterbox", height=64, width=64)
    frames = [_gradient_frame(32, 64), _gradient_frame(64, 64)]
    [(_, views, features)] = list(view_batches(frames, spec, Backbones(_no_backbone()), batch_size=4))
    assert features.valid.shape == (2, 64, 64)
    assert features.valid[0].sum() == 32 * 64 and features.valid[1].all()
    cells = features.valid_grid((4, 4))
    assert cells[0].tolist() == [[False] * 4, [True] * 4, [True] * 4, [False] * 4] and cells[1].all()


def test_image_scores_come_from_the_frame_not_the_padding() -> None:
    import torch

    from pipeline.experts.patchcore.memory_bank import MemoryBank

    bank = MemoryBank(np.zeros((4, 2), dtype=np.float32), num_neighbors=3)
    query = torch.zeros(1, 2, 2, 2)
    query[0, 0, 0] = 10.0  # far from every normal patch, but in a padded cell
    valid = torch.tensor([[[False, True], [True, True]]])
    everywhere, maps = bank.score(query, (4, 4), 0.0)
    framed, framed_maps = bank.score(query, (4, 4), 0.0, valid)
    assert everywhere[0] > 1.0 and framed[0] == 0.0
    np.testing.assert_array_equal(maps, framed_maps)  # the map still covers every patch (stitching crops it)
