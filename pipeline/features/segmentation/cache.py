"""On-disk cache of structure label maps: SAM runs once per training image, not once per epoch or run.

A label map depends on the image, the masker's settings and the weights, so the key hashes all
three (plus a format version of the label map itself). Files are compressed .npz written to a
temporary name and renamed into place, so a crash never leaves a half-written entry behind; an
unreadable entry is simply recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.common.assets import MOBILE_SAM
from pipeline.features.imaging import decode_image
from pipeline.common.local_files import cache_root, write_atomically
from pipeline.features.segmentation.masker import MaskerConfig

LABEL_MAP_FORMAT = 1  # bump when the meaning of a stored label map changes
MAX_IMAGE_PIXELS = 100_000_000
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class LabelMapper(Protocol):
    """What the cache needs of a masker (StructureMasker, or a stand-in in tests)."""

    config: MaskerConfig

    def label_map(self, image_rgb_uint8: np.ndarray) -> np.ndarray: ...


def default_cache_dir() -> Path:
    return cache_root() / "sam-masks"


def config_digest(config: MaskerConfig) -> str:
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def image_digest(image: bytes | np.ndarray) -> str:
    """sha256 of the encoded file bytes, or of an array's shape, dtype and pixels."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.data)
    return digest.hexdigest()


def cache_key(image: bytes | np.ndarray, config: MaskerConfig,
              weights_sha256: str = MOBILE_SAM.sha256) -> str:
    """Image, masker settings, checkpoint and label-map format: anything that changes the result."""
    parts = (f"v{LABEL_MAP_FORMAT}", image_digest(image), config_digest(config), weights_sha256)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class MaskCache:
    """Label maps by (image, masker config, checkpoint); default directory
    `$INSPECTION_CACHE_DIR/sam-masks` or `~/.cache/continual-inspection/sam-masks`."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path_for(self, image: bytes | np.ndarray, config: MaskerConfig) -> Path:
        return self.directory / f"{cache_key(image, config)}.npz"

    def get_or_compute(self, image: bytes | np.ndarray, masker: LabelMapper) -> np.ndarray:
        """The cached label map, or compute (JPEG/PNG bytes are decoded to RGB) and store it."""
        path = self.path_for(image, masker.config)
        expected_shape = None if isinstance(image, (bytes, bytearray, memoryview)) else np.shape(image)[:2]
        cached = self._read(path, expected_shape)
        if cached is not None:
            return cached
        pixels = decode_image(bytes(image), MAX_IMAGE_PIXELS) if expected_shape is None else image
        label_map = np.asarray(masker.label_map(pixels), dtype=np.int32)
        self._write(path, label_map)
        return label_map

    @staticmethod
    def _read(path: Path, expected_shape: tuple[int, ...] | None) -> np.ndarray | None:
        """The stored map, or None when absent, unreadable or not a plausible label map."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                label_map = stored["label_map"]
        except _UNREADABLE:
            return None
        if label_map.dtype != np.int32 or label_map.ndim != 2:
            return None
        if expected_shape is not None and label_map.shape != tuple(expected_shape):
            return None
        return label_map

    @staticmethod
    def _write(path: Path, label_map: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, label_map=label_map)
        write_atomically(path, buffer.getvalue())
