"""ELPV as optional real products: the labelling rule (no package needed) and, when the optional
package is installed, the materialised MVTec-layout categories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import elpv
from pipeline.data.datasets import discover_categories, labeled_test_images, train_images
from pipeline.features.imaging import decode_image

pytestmark = pytest.mark.slow


def test_labelling_rule() -> None:
    assert elpv.elpv_label(0.0) == "good"
    assert elpv.elpv_label(1 / 3) is None
    assert elpv.elpv_label(0.3333333333333333) is None
    assert elpv.elpv_label(2 / 3) == "defective"
    assert elpv.elpv_label(0.6666666666666666) == "defective"
    assert elpv.elpv_label(1.0) == "defective"
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            elpv.elpv_label(bad)


def test_split_follows_the_rule_and_the_seed() -> None:
    rng = np.random.default_rng(0)
    n = 200
    probabilities = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=n)
    types = rng.choice(["mono", "poly"], size=n)
    names = [f"cell{i:04d}.png" for i in range(n)]
    splits = elpv.split_elpv(names, probabilities, types, seed=3)
    assert sorted(splits) == ["elpv_mono", "elpv_poly"]
    for cell_type in ("mono", "poly"):
        parts = splits[f"elpv_{cell_type}"]
        mine = types == cell_type
        normal = {names[i] for i in np.flatnonzero(mine & (probabilities == 0))}
        defective = {names[i] for i in np.flatnonzero(mine & (probabilities >= 2 / 3))}
        assert set(parts["train/good"]) | set(parts["test/good"]) == normal
        assert not set(parts["train/good"]) & set(parts["test/good"])
        assert len(parts["test/good"]) == int(np.floor(0.25 * len(normal) + 0.5))
        assert set(parts["test/defective"]) == defective  # the 1/3 cells are nowhere
    assert elpv.split_elpv(names, probabilities, types, seed=3) == splits
    assert elpv.split_elpv(names, probabilities, types, seed=4) != splits
    with pytest.raises(ValueError):
        elpv.split_elpv(names, probabilities, np.array(["thin"] * n), seed=0)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_elpv(name, *args, **kwargs):
        if name.startswith("elpv_dataset"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_elpv)
    with pytest.raises(ImportError, match=r"pip install '\.\[elpv\]'"):
        elpv.materialise_elpv(tmp_path)


def test_default_destination_is_under_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INSPECTION_CACHE_DIR", str(tmp_path))
    assert elpv.default_elpv_root() == tmp_path / "datasets" / "elpv"
    assert elpv.ELPV_CONTINUAL_CATEGORY in [elpv.category_name(t) for t in elpv.CELL_TYPES]


def test_falls_back_to_load_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without labels.csv where load_dataset reads it, the arrays of load_dataset() are encoded."""
    utils = pytest.importorskip("elpv_dataset.utils")
    monkeypatch.setattr(utils, "__file__", str(tmp_path / "nowhere" / "utils.py"))
    images = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    names, probabilities, types, png_bytes = elpv._package_cells(
        lambda: (images, np.array([0.0, 1.0]), np.array(["mono", "poly"]))
    )
    assert names == ["cell0001.png", "cell0002.png"] and list(types) == ["mono", "poly"]
    decoded = decode_image(png_bytes(1), 100)
    assert np.array_equal(decoded[..., 1], images[1])


@pytest.fixture(scope="module")
def materialised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    pytest.importorskip("elpv_dataset")
    root = tmp_path_factory.mktemp("elpv")
    return root, elpv.materialise_elpv(root, seed=0)


def test_real_package_counts_and_layout(materialised: tuple[Path, list[str]]) -> None:
    from elpv_dataset.utils import load_dataset

    root, categories = materialised
    assert categories == ["elpv_mono", "elpv_poly"]
    assert discover_categories(root) == categories  # no staging folder left behind either
    assert sorted(p.name for p in root.iterdir()) == categories
    _, probabilities, types = load_dataset()
    for category in categories:
        mine = types == category.removeprefix("elpv_")
        n_normal = int(np.sum(mine & (probabilities == 0)))
        n_defective = int(np.sum(mine & (probabilities >= 2 / 3 - 1e-6)))
        n_train = len(train_images(root, category))
        tests = labeled_test_images(root, category)
        n_test_good = sum(not t.is_anomalous for t in tests)
        assert n_train + n_test_good == n_normal
        assert n_test_good == int(np.floor(0.25 * n_normal + 0.5))
        assert sum(t.is_anomalous for t in tests) == n_defective
        assert {t.defect for t in tests} == {"good", "defective"}
        assert all(t.mask_path is None for t in tests)
        assert not (root / category / "ground_truth").exists()
        train = {p.name for p in train_images(root, category)}
        assert not train & {t.path.name for t in tests}
        marker = json.loads((root / category / "elpv.json").read_text())
        assert marker["counts"] == {"train/good": n_train, "test/good": n_test_good, "test/defective": n_defective}
    # the published numbers of package 1.0.0.post1 (also in the module docstring)
    mono, poly = (json.loads((root / c / "elpv.json").read_text())["counts"] for c in categories)
    assert mono == {"train/good": 441, "test/good": 147, "test/defective": 369}
    assert poly == {"train/good": 690, "test/good": 230, "test/defective": 452}
    for category in categories:
        first = train_images(root, category)[0]
        image = decode_image(first.read_bytes(), 10**7)  # as the pipeline reads it: RGB, three equal channels
        assert image.shape == (300, 300, 3) and np.array_equal(image[..., 0], image[..., 2])


def test_real_package_idempotent(materialised: tuple[Path, list[str]]) -> None:
    root, categories = materialised
    marker = root / "elpv_poly" / "elpv.json"
    stamp = marker.stat().st_mtime_ns
    assert elpv.materialise_elpv(root, seed=0) == categories
    assert marker.stat().st_mtime_ns == stamp  # complete: not rewritten
    # an incomplete category (a file lost) is rebuilt; the complete one is left alone
    lost = next((root / "elpv_mono" / "test" / "good").iterdir())
    lost.unlink()
    mono_marker = root / "elpv_mono" / "elpv.json"
    assert elpv.materialise_elpv(root, seed=0) == categories
    assert lost.is_file() and marker.stat().st_mtime_ns == stamp
    assert mono_marker.is_file()


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    pytest.importorskip("elpv_dataset")
    (tmp_path / "elpv_mono").mkdir()
    (tmp_path / "elpv_mono" / "mine.txt").write_text("not ELPV")
    with pytest.raises(FileExistsError):
        elpv.materialise_elpv(tmp_path)
