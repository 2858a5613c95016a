"""Image folders in the MVTec AD layout, and synthetic categories made from CC0 textures.

Layout of one category:
    <root>/<category>/train/good/*.png             normal images to train on
    <root>/<category>/test/good/*.png              normal test images
    <root>/<category>/test/<defect>/<name>.png     anomalous test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png   their pixel masks (optional)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.features.imaging import encode_jpeg, encode_png
from schemas.messages import CATEGORY_PATTERN

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SYNTHETIC_TEXTURES = ("brick", "grass", "gravel")
SYNTHETIC_DEFECT = "synthetic"
_SYNTHETIC_MARKER = "synthetic.json"  # written last: its presence with matching params = complete


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class LabeledImage:
    path: Path
    category: str
    is_anomalous: bool
    defect: str
    mask_path: Path | None


def _image_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS leaves "._name.png" resource forks next to copied images.
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder does not exist or is not a folder: {folder}")
    images = _image_files(folder)
    if not images:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def discover_categories(root: Path) -> list[str]:
    """Names of the sub-folders of `root` that have a train/good folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def train_images(root: Path, category: str) -> list[Path]:
    return list_images(Path(root) / category / "train" / "good")


def labeled_test_images(root: Path, category: str) -> list[LabeledImage]:
    """All test images of a category: test/good normal, every other test/<defect> anomalous."""
    base = Path(root) / category
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"no test folder for category {category!r}: {test_dir}")
    items: list[LabeledImage] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in _image_files(defect_dir):
            mask = None
            if defect != "good":
                candidate = base / "ground_truth" / defect / f"{path.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            items.append(LabeledImage(path, category, defect != "good", defect, mask))
    if not items:
        raise ValueError(f"no test image in {test_dir}")
    return items


def read_mask(path: Path | None, hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask of shape hw (all False without a mask); resized nearest if its size differs."""
    height, width = hw
    if path is None:
        return np.zeros((height, width), dtype=bool)
    with Image.open(path) as image:
        gray = image.convert("L")
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.NEAREST)
    values = np.asarray(gray)
    # Half the maximum: works for 0/255 and 0/1 masks alike; an all-zero mask stays all False.
    return values > int(values.max()) // 2


# ---------------------------------------------------------------------------------------- synthetic
def write_synthetic_category(
    out_root: Path,
    name: str,
    texture: str,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    size: int = 256,
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """Write `out_root/name` in the MVTec layout from a CC0 skimage texture; deterministic given seed.

    Idempotent: a complete folder with the same parameters is returned untouched. The folder is built
    under a temporary name and renamed at the end, so an interrupted run never looks complete.
    """
    if texture not in SYNTHETIC_TEXTURES:
        raise ValueError(f"unknown texture {texture!r}, choose from {SYNTHETIC_TEXTURES}")
    if not re.fullmatch(CATEGORY_PATTERN, name):
        raise ValueError(f"category name {name!r} does not match {CATEGORY_PATTERN}")
    if suffix not in (".png", ".jpg"):
        raise ValueError(f"suffix must be .png or .jpg, got {suffix!r}")
    params = {
        "texture": texture, "n_train": n_train, "n_test_good": n_test_good,
        "n_test_defect": n_test_defect, "size": size, "seed": seed, "suffix": suffix,
    }  # fmt: skip
    target = Path(out_root) / name
    if _synthetic_complete(target, params):
        return target
    if target.exists():
        if any(target.iterdir()) and not (target / _SYNTHETIC_MARKER).is_file():
            raise FileExistsError(f"{target} exists and was not written by write_synthetic_category")
        shutil.rmtree(target)  # empty, or ours with other parameters: regenerate
    staging = Path(out_root) / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _write_synthetic(staging, name, params)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _synthetic_complete(target, params):  # a concurrent writer may have won the race
            raise
    return target


def _synthetic_complete(target: Path, params: dict) -> bool:
    marker = target / _SYNTHETIC_MARKER
    if not marker.is_file() or json.loads(marker.read_text()) != params:
        return False
    counts = {
        "train/good": params["n_train"],
        "test/good": params["n_test_good"],
        f"test/{SYNTHETIC_DEFECT}": params["n_test_defect"],
        f"ground_truth/{SYNTHETIC_DEFECT}": params["n_test_defect"],
    }
    return all(
        (target / sub).is_dir() and len(_image_files(target / sub)) == n for sub, n in counts.items()
    )


def _write_synthetic(folder: Path, name: str, params: dict) -> None:
    # The name and texture join the seed so that categories made with the same seed differ.
    rng = np.random.default_rng([params["seed"], zlib.crc32(f"{name}/{params['texture']}".encode())])
    texture = getattr(skimage.data, params["texture"])().astype(np.float32)
    size, suffix = params["size"], params["suffix"]
    folders = {
        sub: folder / sub
        for sub in ("train/good", "test/good", f"test/{SYNTHETIC_DEFECT}", f"ground_truth/{SYNTHETIC_DEFECT}")
    }
    for path in folders.values():
        path.mkdir(parents=True)
    for i in range(params["n_train"]):
        _save_image(folders["train/good"] / f"{i:03d}{suffix}", _normal_image(texture, size, rng))
    for i in range(params["n_test_good"]):
        _save_image(folders["test/good"] / f"{i:03d}{suffix}", _normal_image(texture, size, rng))
    for i in range(params["n_test_defect"]):
        image, mask = _add_defects(_normal_image(texture, size, rng), rng)
        _save_image(folders[f"test/{SYNTHETIC_DEFECT}"] / f"{i:03d}{suffix}", image)
        mask_path = folders[f"ground_truth/{SYNTHETIC_DEFECT}"] / f"{i:03d}_mask.png"
        mask_path.write_bytes(encode_png(mask.astype(np.uint8) * 255))
    (folder / _SYNTHETIC_MARKER).write_text(json.dumps(params, sort_keys=True))


def _save_image(path: Path, gray: np.ndarray) -> None:
    rgb = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    path.write_bytes(encode_png(rgb) if path.suffix == ".png" else encode_jpeg(rgb, quality=95))


def _normal_image(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop (native scale, upscaled only if size exceeds the texture), flips, brightness jitter."""
    side = min(texture.shape[0], texture.shape[1], size)
    y = int(rng.integers(0, texture.shape[0] - side + 1))
    x = int(rng.integers(0, texture.shape[1] - side + 1))
    crop = texture[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    if side != size:
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
        crop = np.asarray(resized, dtype=np.float32)
    return crop * np.float32(rng.uniform(0.93, 1.07))


def _add_defects(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-2 defects of random kinds; returns the image and the union of their masks."""
    image = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(0, 3))
        if kind == 0:
            region = _ellipse_mask(image.shape[0], rng)
            image[region] = _darken_or_brighten(image[region], rng)
        elif kind == 1:
            region = _scratch_mask(image.shape[0], rng)
            image[region] = _darken_or_brighten(image[region], rng)
        else:
            region = _cut_paste(image, rng)
        mask |= region
    return image, mask


def _darken_or_brighten(values: np.ndarray, rng: np.random.Generator, keep: float = 0.3) -> np.ndarray:
    # Pull towards black or white, keeping a fraction of the texture so it still looks like a surface.
    if rng.random() < 0.5:
        return values * keep
    return 255.0 - (255.0 - np.minimum(values, 255.0)) * keep


def _ellipse_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    ry, rx = rng.uniform(0.04, 0.10, 2) * size
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    # Centred well inside the frame so at least half of the line is visible.
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    half = rng.uniform(0.1, 0.25) * size
    angle = rng.uniform(0, math.pi)
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    canvas = Image.new("L", (size, size), 0)
    width = max(2, round(size * rng.uniform(0.008, 0.016)))
    ImageDraw.Draw(canvas).line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    return np.asarray(canvas) > 0


def _cut_paste(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste a rotated, re-lit disc cut from elsewhere in the image; returns the pasted region."""
    size = image.shape[0]
    side = max(8, int(rng.uniform(0.10, 0.18) * size))
    sy, sx, dy, dx = (int(v) for v in rng.integers(0, size - side + 1, 4))
    patch = ndimage.rotate(
        image[sy : sy + side, sx : sx + side], rng.uniform(30, 150), reshape=False, order=1, mode="reflect"
    )
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2 <= (side / 2) ** 2
    window = image[dy : dy + side, dx : dx + side]
    # Re-lit as well: a rotated patch of a random texture alone can pass for normal texture.
    window[disc] = _darken_or_brighten(patch[disc], rng, keep=rng.uniform(0.4, 0.55))
    mask = np.zeros(image.shape, dtype=bool)
    mask[dy : dy + side, dx : dx + side] = disc
    return mask
