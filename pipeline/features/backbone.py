"""The frozen, pretrained extractor every task shares: EfficientNet-Lite0 stages for the CNN experts and
the DINOv2 ViT-S/14's unprompted patch tokens of one intermediate block for task identification (UCAD's
keys). One pass per micro-batch feeds task identification and every expert.

The registry package ships the weights of the TF-ported EfficientNet-Lite0; they map one to one onto
timm's `tf_efficientnet_lite0` (TF "same" padding, inputs normalised with mean = std = 0.5), which
reproduces the reference implementation's logits exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.assets import EFFICIENTNET_LITE0, AssetError, verified_path
from pipeline.features.vit import ViTBackbone

# Stage indices of timm's feature_info: 1 -> stride 4 (24 ch), 2 -> stride 8 (40 ch), 3 -> stride 16 (112 ch),
# 4 -> stride 32 (320 ch)
PATCH_STAGES = (2, 3)  # mid-level: PatchCore's local patch features
KEY_LAYER = 7  # ViT block (0-based) whose unprompted patch tokens are the task keys (see README: deeper blocks
# confuse defective frames with other products, earlier ones separate unknown products less)
VIT_PATCH = 14
ALL_STAGES = (1, 2, 3, 4)
_TIMM_NAME = "tf_efficientnet_lite0"


@dataclass
class FeatureBatch:
    """One backbone pass over a batch, shared by task identification and every expert."""

    pixels: torch.Tensor  # B x 3 x S x S in [0, 1]
    stages: dict[int, torch.Tensor]  # CNN stage index -> B x C x h x w
    tokens: torch.Tensor | None = None  # B x P x D unprompted ViT patch tokens at KEY_LAYER (None: no ViT)

    @property
    def image_size(self) -> int:
        return self.pixels.shape[-1]

    def select(self, rows: list[int]) -> "FeatureBatch":
        """The sub-batch of the given rows (the same object when that is every row)."""
        if len(rows) == self.pixels.shape[0]:
            return self
        index = torch.tensor(rows, device=self.pixels.device)
        tokens = None if self.tokens is None else self.tokens[index]
        return FeatureBatch(self.pixels[index], {s: f[index] for s, f in self.stages.items()}, tokens)


class Backbone(nn.Module):
    """Frozen feature extractor; build it with `Backbone.pretrained()`."""

    mean = 0.5
    std = 0.5

    def __init__(self, stages: tuple[int, ...] = ALL_STAGES, vit: ViTBackbone | None = None):
        super().__init__()
        self.stage_ids = tuple(stages)
        self.net = timm.create_model(_TIMM_NAME, pretrained=False, features_only=True, out_indices=self.stage_ids)
        self.vit = vit  # None: a CNN-only extractor (random-weight controls in tests); no task keys then
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, device: str | torch.device = "cpu", image_size: int = 224) -> "Backbone":
        """Both networks with verified pretrained weights; the ViT runs on the largest multiple of its
        patch size that fits `image_size` (224 -> a 16 x 16 token grid)."""
        model = cls(vit=ViTBackbone.pretrained(image_size=VIT_PATCH * (image_size // VIT_PATCH)))
        model.net.load_state_dict(_timm_state_dict(model.net), strict=True)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def channels(self, stage: int) -> int:
        return self.net.feature_info.channels()[self.stage_ids.index(stage)]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, keys: bool = True) -> FeatureBatch:
        """`keys=False` skips the ViT key pass, for batches that never meet task identification
        (synthetic anomalies, offline expert benchmarks)."""
        pixels = pixels.to(self.device, non_blocking=True)
        outputs = self.net((pixels - self.mean) / self.std)
        tokens = self.vit.patch_tokens(self.vit_pixels(pixels), KEY_LAYER) if keys and self.vit is not None else None
        return FeatureBatch(pixels=pixels, stages=dict(zip(self.stage_ids, outputs)), tokens=tokens)

    def vit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch resized to the ViT's input side (a no-op at 224)."""
        side = self.vit.image_size
        if pixels.shape[-1] == side:
            return pixels
        return F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)

    def extract(self, images: list[np.ndarray], keys: bool = True) -> FeatureBatch:
        """`images`: float32 3 x S x S arrays in [0, 1] (see pipeline.features.imaging.resize_rgb)."""
        return self(torch.from_numpy(np.stack(images)), keys)


def _timm_state_dict(features_net: nn.Module) -> dict[str, torch.Tensor]:
    """Map the registry's state dict (lukemelas naming) onto timm's names, by order and shape."""
    source = torch.load(verified_path(EFFICIENTNET_LITE0), map_location="cpu", weights_only=True)
    full = timm.create_model(_TIMM_NAME, pretrained=False).state_dict()
    if len(full) != len(source):
        raise AssetError(f"EfficientNet-Lite0: {len(source)} tensors in the checkpoint, timm expects {len(full)}")
    mapped = {}
    for (timm_key, timm_value), (src_key, src_value) in zip(full.items(), source.items()):
        if timm_value.shape != src_value.shape:
            raise AssetError(f"EfficientNet-Lite0: {src_key} {tuple(src_value.shape)} does not fit {timm_key}")
        mapped[timm_key] = src_value
    wanted = features_net.state_dict().keys()
    return {key: mapped[key] for key in wanted}
