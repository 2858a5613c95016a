from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from pipeline.data.datasets import (
    SYNTHETIC_DEFECT,
    SYNTHETIC_TEXTURES,
    LabeledImage,
    discover_categories,
    list_images,
    read_mask,
    labeled_test_images as load_test_images,  # aliased: pytest would collect a name starting with test_
    train_images,
    write_synthetic_category,
)
from pipeline.data.datasets import _add_defects, _normal_image
from pipeline.features.imaging import decode_image, encode_png

REAL_DATASETS = Path("/work/shared/datasets")
SMALL = dict(n_train=4, n_test_good=3, n_test_defect=6, size=96)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for texture in SYNTHETIC_TEXTURES:
        write_synthetic_category(root, texture, texture, **SMALL, seed=3)
    return root


def _load(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), max_pixels=10**8)


# ------------------------------------------------------------------------------------- list_images
def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    png = encode_png(np.zeros((4, 4), np.uint8))
    for name in ("b.PNG", "a.jpg", "c.JPEG", "d.bmp", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(png)
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JPEG", "d.bmp"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image"):
        list_images(tmp_path)


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic_layout_is_valid(synthetic_root: Path) -> None:
    assert discover_categories(synthetic_root) == sorted(SYNTHETIC_TEXTURES)
    for category in SYNTHETIC_TEXTURES:
        train = train_images(synthetic_root, category)
        assert len(train) == SMALL["n_train"]
        tests = load_test_images(synthetic_root, category)
        normal = [item for item in tests if not item.is_anomalous]
        anomalous = [item for item in tests if item.is_anomalous]
        assert len(normal) == SMALL["n_test_good"] and all(i.mask_path is None for i in normal)
        assert all(i.defect == "good" for i in normal)
        assert len(anomalous) == SMALL["n_test_defect"]
        for item in anomalous:
            assert item.defect == SYNTHETIC_DEFECT and item.category == category
            assert item.mask_path == synthetic_root / category / "ground_truth" / SYNTHETIC_DEFECT / (
                f"{item.path.stem}_mask.png"
            )
        image = _load(train[0])
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8


def test_synthetic_masks_cover_the_defects(synthetic_root: Path) -> None:
    for category in SYNTHETIC_TEXTURES:
        for item in (i for i in load_test_images(synthetic_root, category) if i.is_anomalous):
            image = _load(item.path)[:, :, 0].astype(float)
            mask = read_mask(item.mask_path, image.shape)
            assert 0.001 < mask.mean() < 0.3, f"{item.path}: mask covers {mask.mean():.4f}"
            # Defects pull pixels towards black or white: inside the mask the typical distance to
            # the normal surface level is much larger than the texture's own spread outside it.
            distance = np.abs(image - np.median(image[~mask]))
            assert np.median(distance[mask]) > 1.5 * np.median(distance[~mask]), item.path


def test_defects_change_exactly_the_masked_pixels() -> None:
    rng = np.random.default_rng(0)
    texture = skimage.data.gravel().astype(np.float32)
    for _ in range(50):
        normal = _normal_image(texture, 128, rng)
        defective, mask = _add_defects(normal, rng)
        assert mask.any()
        np.testing.assert_array_equal(defective[~mask], normal[~mask])
        assert (np.abs(defective - normal)[mask] > 20).mean() > 0.5


def test_synthetic_images_are_grey_rgb(tmp_path: Path) -> None:
    root = write_synthetic_category(tmp_path, "grav", "gravel", **SMALL)
    item = next(i for i in load_test_images(tmp_path, "grav") if i.is_anomalous)
    image = _load(item.path)
    assert (image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all()
    assert root == tmp_path / "grav"


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    first = write_synthetic_category(tmp_path / "a", "brick", "brick", **SMALL, seed=7)
    second = write_synthetic_category(tmp_path / "b", "brick", "brick", **SMALL, seed=7)
    other = write_synthetic_category(tmp_path / "c", "brick", "brick", **SMALL, seed=8)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    differs = [
        (first / r).read_bytes() != (other / r).read_bytes() for r in files if r.suffix == ".png"
    ]
    assert all(differs)


def test_synthetic_is_idempotent_and_regenerates_on_new_params(tmp_path: Path) -> None:
    target = write_synthetic_category(tmp_path, "grass", "grass", **SMALL)
    stamp = {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    assert write_synthetic_category(tmp_path, "grass", "grass", **SMALL) == target
    assert stamp == {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    bigger = {**SMALL, "n_train": 5}
    write_synthetic_category(tmp_path, "grass", "grass", **bigger)
    assert len(train_images(tmp_path, "grass")) == 5
    # A deleted file makes the folder incomplete: it is rebuilt.
    (target / "train" / "good" / "000.png").unlink()
    write_synthetic_category(tmp_path, "grass", "grass", **bigger)
    assert len(train_images(tmp_path, "grass")) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left over


def test_synthetic_jpeg_and_large_size(tmp_path: Path) -> None:
    target = write_synthetic_category(
        tmp_path, "big", "brick", n_train=1, n_test_good=1, n_test_defect=1, size=600, suffix=".jpg"
    )
    image = _load(train_images(tmp_path, "big")[0])
    assert image.shape == (600, 600, 3)
    assert train_images(tmp_path, "big")[0].suffix == ".jpg"
    assert (target / "ground_truth" / SYNTHETIC_DEFECT / "000_mask.png").is_file()


def test_synthetic_refuses_bad_arguments_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="texture"):
        write_synthetic_category(tmp_path, "x", "marble")
    with pytest.raises(ValueError, match="category name"):
        write_synthetic_category(tmp_path, "Bad Name", "brick")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("do not delete")
    with pytest.raises(FileExistsError):
        write_synthetic_category(tmp_path, "mine", "brick", **SMALL)
    assert (foreign / "keep.txt").read_text() == "do not delete"


# ------------------------------------------------------------------------------------------- masks
def test_read_mask(tmp_path: Path) -> None:
    assert not read_mask(None, (5, 7)).any() and read_mask(None, (5, 7)).shape == (5, 7)
    values = np.zeros((10, 20), np.uint8)
    values[2:4, 5:9] = 255
    (tmp_path / "m255.png").write_bytes(encode_png(values))
    (tmp_path / "m1.png").write_bytes(encode_png((values > 0).astype(np.uint8)))
    for name in ("m255.png", "m1.png"):
        mask = read_mask(tmp_path / name, (10, 20))
        assert mask.dtype == bool and mask.sum() == 8 and mask[2:4, 5:9].all()
    assert read_mask(tmp_path / "m255.png", (20, 40)).sum() == 32  # nearest resize
    (tmp_path / "zero.png").write_bytes(encode_png(np.zeros((3, 3), np.uint8)))
    assert not read_mask(tmp_path / "zero.png", (3, 3)).any()


def test_test_images_without_masks_and_missing_folder(tmp_path: Path) -> None:
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    for sub in ("train/good", "test/good", "test/crack"):
        (tmp_path / "cat" / sub).mkdir(parents=True)
    for sub in ("train/good/0.png", "test/good/0.png", "test/crack/0.png", "test/crack/1.png"):
        (tmp_path / "cat" / sub).write_bytes(png)
    (tmp_path / "cat" / "ground_truth" / "crack").mkdir(parents=True)
    (tmp_path / "cat" / "ground_truth" / "crack" / "1_mask.png").write_bytes(png)
    items = load_test_images(tmp_path, "cat")
    assert [(i.path.name, i.defect, i.is_anomalous, i.mask_path is not None) for i in items] == [
        ("0.png", "crack", True, False),
        ("1.png", "crack", True, True),
        ("0.png", "good", False, False),
    ]
    with pytest.raises(FileNotFoundError):
        load_test_images(tmp_path, "nope")
    with pytest.raises(FileNotFoundError):
        train_images(tmp_path, "nope")


# ---------------------------------------------------------------------------------- real datasets
@pytest.mark.parametrize("category", ["magnetic_tile", "ball_screw"])
def test_real_dataset_layout(category: str) -> None:
    if not (REAL_DATASETS / category / "test").is_dir():
        pytest.skip(f"{REAL_DATASETS / category} not available")
    assert category in discover_categories(REAL_DATASETS)
    assert len(train_images(REAL_DATASETS, category)) > 100
    items = load_test_images(REAL_DATASETS, category)
    assert all(isinstance(i, LabeledImage) for i in items)
    normal = [i for i in items if not i.is_anomalous]
    anomalous = [i for i in items if i.is_anomalous]
    assert normal and anomalous
    with_mask = [i for i in anomalous if i.mask_path is not None]
    assert len(with_mask) == len(anomalous)
    item = with_mask[0]
    image = _load(item.path)
    mask = read_mask(item.mask_path, image.shape[:2])
    assert mask.shape == image.shape[:2] and mask.any()
