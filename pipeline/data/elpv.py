"""ELPV (electroluminescence images of solar cells) as optional real products, in the MVTec AD layout.

The ELPV dataset (Buerhop-Lutz et al., EU PVSEC 2018; Deitsch et al., Solar Energy 2019 / Machine
Vision and Applications 2021) holds 2,624 cells cut from EL images of solar modules, 300 x 300 8-bit
grayscale, each with a defect probability assigned by an expert (0, 1/3, 2/3 or 1) and a cell type
(monocrystalline or polycrystalline). It ships in the PyPI package `elpv-dataset` under
CC BY-NC-SA 4.0 (non-commercial), so it is an optional extra, never a dependency:
`pip install '.[elpv]'`.

`materialise_elpv` writes one category per cell type, `elpv_mono` and `elpv_poly`:

    <destination>/elpv_<type>/train/good/cellNNNN.png      normal cells to train on
    <destination>/elpv_<type>/test/good/cellNNNN.png       normal test cells
    <destination>/elpv_<type>/test/defective/cellNNNN.png  defective test cells (no ground_truth: ELPV has no masks)

Labelling rule (`elpv_label`):
- defect probability 0 -> normal (`good`);
- defect probability >= 2/3 (2/3 or 1) -> defective (`test/defective`);
- defect probability 1/3 -> ambiguous, left out (neither trained on nor tested).

Normal cells are split per category with a seeded shuffle: 25% (rounded) to `test/good`, the rest to
`train/good`. Files keep the package's names (`cell0001.png`, ...) and are written as 8-bit grayscale
PNG; the pipeline decodes them to three equal channels.

With package version 1.0.0.post1 this gives (train/good, test/good, test/defective):
`elpv_mono` 441 / 147 / 369 (117 ambiguous left out), `elpv_poly` 690 / 230 / 452 (178 left out).

Idempotent and atomic, like `write_synthetic_category`: each category is built under a temporary
folder next to it and renamed at the end; a marker file (`elpv.json`, with the parameters and the
counts) is written last, so an interrupted run never looks complete, and a complete category with the
same parameters is returned untouched.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common.local_files import cache_root
from pipeline.features.imaging import encode_png

ELPV_PACKAGE = "elpv-dataset"
ELPV_VERSION = "1.0.0.post1"
INSTALL_HINT = "pip install '.[elpv]'"
CELL_TYPES = ("mono", "poly")
DEFECT = "defective"
ELPV_CONTINUAL_CATEGORY = "elpv_mono"  # the one ELPV product `inspection continual --elpv` adds
TEST_FRACTION = 0.25  # of the normal cells, to test/good
_MARKER = "elpv.json"  # written last: its presence with matching params = complete
_TOLERANCE = 1e-6  # the package stores 1/3 and 2/3 as decimals


def default_elpv_root() -> Path:
    """Where materialise_elpv writes by default: cache_root() / "datasets" / "elpv"."""
    return cache_root() / "datasets" / "elpv"


def category_name(cell_type: str) -> str:
    return f"elpv_{cell_type}"


def elpv_label(probability: float) -> str | None:
    """The labelling rule: 0 -> "good", >= 2/3 -> "defective", 1/3 (ambiguous) -> None (left out)."""
    p = float(probability)
    if not (-_TOLERANCE <= p <= 1.0 + _TOLERANCE):  # also refuses NaN
        raise ValueError(f"defect probability must be in [0, 1], got {probability!r}")
    if p <= _TOLERANCE:
        return "good"
    if p >= 2.0 / 3.0 - _TOLERANCE:
        return DEFECT
    return None


def split_elpv(
    names: list[str], probabilities: np.ndarray, types: np.ndarray, seed: int = 0, test_fraction: float = TEST_FRACTION
) -> dict[str, dict[str, list[str]]]:
    """Per category, the file names of each split: {"elpv_mono": {"train/good": [...], "test/good": [...],
    "test/defective": [...]}, ...}, sorted by name; ambiguous cells are left out. Deterministic given seed."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not len(names) == len(probabilities) == len(types):
        raise ValueError(f"{len(names)} names, {len(probabilities)} probabilities, {len(types)} types")
    unknown = sorted(set(map(str, types)) - set(CELL_TYPES))
    if unknown:
        raise ValueError(f"unknown cell types {unknown}, expected {CELL_TYPES}")
    splits: dict[str, dict[str, list[str]]] = {}
    for cell_type in CELL_TYPES:
        category = category_name(cell_type)
        normal, defective = [], []
        for name, probability, kind in zip(names, probabilities, types):
            if str(kind) != cell_type:
                continue
            label = elpv_label(probability)
            if label == "good":
                normal.append(name)
            elif label == DEFECT:
                defective.append(name)
        normal.sort()
        # The category joins the seed so that the two cell types get independent shuffles.
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        order = rng.permutation(len(normal))
        n_test = int(math.floor(test_fraction * len(normal) + 0.5))
        test = sorted(normal[i] for i in order[:n_test])
        train = sorted(normal[i] for i in order[n_test:])
        splits[category] = {"train/good": train, "test/good": test, f"test/{DEFECT}": sorted(defective)}
    return splits


def materialise_elpv(destination: Path | None = None, seed: int = 0) -> list[str]:
    """Write the ELPV categories (one per cell type) under `destination` in the MVTec AD layout and
    return their names, sorted. Default destination: cache_root() / "datasets" / "elpv".

    Rule: defect probability 0 -> normal; >= 2/3 -> test/defective; 1/3 -> ambiguous, left out.
    Normal cells are split with a seeded shuffle, 25% to test/good, the rest to train/good.
    Needs the optional extra: pip install '.[elpv]' (the data is CC BY-NC-SA 4.0).
    """
    destination = Path(destination) if destination is not None else default_elpv_root()
    load_dataset, version = _import_package()
    categories = [category_name(t) for t in CELL_TYPES]
    params = {"source": ELPV_PACKAGE, "version": version, "seed": int(seed), "test_fraction": TEST_FRACTION}
    pending = [c for c in categories if not _complete(destination / c, params)]
    if not pending:
        return categories
    names, probabilities, types, png_bytes = _package_cells(load_dataset)
    splits = split_elpv(names, probabilities, types, seed=int(seed))
    index = {name: i for i, name in enumerate(names)}
    destination.mkdir(parents=True, exist_ok=True)
    for category in pending:
        target = destination / category
        if target.exists():
            if any(target.iterdir()) and not (target / _MARKER).is_file():
                raise FileExistsError(f"{target} exists and was not written by materialise_elpv")
            shutil.rmtree(target)  # empty, or ours with other parameters or incomplete: rewrite
        staging = destination / f".{category}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for split, files in splits[category].items():
                folder = staging / split
                folder.mkdir(parents=True)
                for name in files:
                    (folder / name).write_bytes(png_bytes(index[name]))
            counts = {split: len(files) for split, files in splits[category].items()}
            (staging / _MARKER).write_text(json.dumps({**params, "counts": counts}, sort_keys=True))
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not _complete(target, params):  # a concurrent writer may have won the race
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return categories


# ----------------------------------------------------------------------------------------- helpers
def _import_package():
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as exc:
        raise ImportError(
            f"the ELPV categories need the optional package {ELPV_PACKAGE} (CC BY-NC-SA 4.0): {INSTALL_HINT}"
        ) from exc
    try:
        from elpv_dataset.__about__ import __version__ as version
    except ImportError:
        version = "unknown"
    return load_dataset, str(version)


def _package_cells(load_dataset) -> tuple[list[str], np.ndarray, np.ndarray, Callable[[int], bytes]]:
    """(file names, defect probabilities, cell types, PNG bytes of cell i), in the package's order.

    `load_dataset()` reads `data/labels.csv` next to the package's `utils.py` (path, probability, type
    per line) and decodes every image listed there (7 s here). When that file and the images are where
    load_dataset reads them, the labels are read from it and the PNG files are copied as they are (8-bit
    grayscale already); otherwise load_dataset() is called and its arrays are encoded.
    """
    import elpv_dataset.utils as utils

    labels = Path(utils.__file__).parent / "data" / "labels.csv"
    try:
        rows = [line.split() for line in labels.read_text().splitlines() if line.strip()]
    except OSError:
        rows = []
    paths = [labels.parent / row[0] for row in rows if len(row) == 3]
    names = [path.name for path in paths]
    if rows and len(paths) == len(rows) and len(set(names)) == len(names) and all(p.is_file() for p in paths):
        probabilities = np.array([float(row[1]) for row in rows])
        types = np.array([row[2] for row in rows])
        return names, probabilities, types, lambda i: _png_bytes(paths[i])
    images, probabilities, types = load_dataset()
    names = [f"cell{i + 1:04d}.png" for i in range(len(images))]
    return (
        names, np.asarray(probabilities, dtype=np.float64), np.asarray(types).astype(str),
        lambda i: encode_png(np.ascontiguousarray(images[i], dtype=np.uint8)),
    )  # fmt: skip


def _png_bytes(path: Path) -> bytes:
    """The file's bytes when it is an 8-bit grayscale or RGB PNG, else re-encoded as one."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG" and image.mode in ("L", "RGB"):
            return data
        return encode_png(np.asarray(image.convert("L"), dtype=np.uint8))


def _complete(target: Path, params: dict) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except ValueError:
        return False
    counts = stored.pop("counts", None)
    if stored != params or not isinstance(counts, dict):
        return False
    return all(
        (target / split).is_dir() and sum(1 for p in (target / split).iterdir() if p.suffix == ".png") == n
        for split, n in counts.items()
    )
