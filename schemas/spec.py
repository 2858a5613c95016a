"""How one task's frames reach its expert: backbone, input geometry and tiling. Stored with the task.

Routing is shared and cheap (every frame, one low-resolution ViT pass, `ROUTING_SPEC`); each task's
expert then sees its frames at its own specification:
- `letterbox`: the whole frame, aspect kept, scaled into a height x width canvas and padded by
  replicating its edges; a canvas with the product's own aspect is an aspect-preserving resize.
- `tiles`: the frame, scaled by `tile_scale` (1 = native resolution), cut into overlapping
  height x width tiles whose maps are stitched back (averaged where tiles overlap).
- `squeeze`: the frame stretched to height x width, ignoring its aspect. Only routing and tasks stored
  before per-task specs existed use it; new tasks never do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackboneName = Literal["efficientnet_lite0", "efficientnet_lite2", "dinov2_vits14"]
CNN_BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite2")
VIT_BACKBONE = "dinov2_vits14"
VIT_STRIDE = 14
CNN_STRIDE = 32  # the CNNs take any size; multiples of their output stride avoid padded edges


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneName = "efficientnet_lite0"
    resize: Literal["squeeze", "letterbox", "tiles"] = "letterbox"
    height: int = Field(default=224, ge=28, le=2048, description="Canvas (or tile) height, pixels.")
    width: int = Field(default=224, ge=28, le=2048, description="Canvas (or tile) width, pixels.")
    tile_overlap: int = Field(default=0, ge=0, description="Tiles only: pixels shared by neighbouring tiles.")
    tile_scale: float = Field(default=1.0, gt=0.05, le=4.0, description="Tiles only: frame scale before tiling.")

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        if self.backbone == VIT_BACKBONE and (self.height % VIT_STRIDE or self.width % VIT_STRIDE):
            raise ValueError(f"{self.backbone} needs height and width in multiples of {VIT_STRIDE}, got {self.height} x {self.width}")
        if self.resize != "tiles" and (self.tile_overlap or self.tile_scale != 1.0):
            raise ValueError("tile_overlap and tile_scale apply to resize='tiles' only")
        if self.resize == "tiles" and self.tile_overlap >= min(self.height, self.width) // 2:
            raise ValueError(f"tile_overlap {self.tile_overlap} must be under half the tile side")
        return self

    @property
    def uses_cnn(self) -> bool:
        return self.backbone in CNN_BACKBONES

    def describe(self) -> str:
        """Short human form for tables and events, e.g. 'efficientnet_lite0 letterbox 224x544'."""
        text = f"{self.backbone} {self.resize} {self.height}x{self.width}"
        if self.resize == "tiles":
            text += f" overlap {self.tile_overlap} scale {self.tile_scale:g}"
        return text


def legacy_spec(image_size: int) -> InputSpec:
    """The spec of a task stored before per-task specs: EfficientNet-Lite0, square squeeze."""
    return InputSpec(backbone="efficientnet_lite0", resize="squeeze", height=image_size, width=image_size)


def routing_spec(image_size: int) -> InputSpec:
    """Routing: every frame squeezed to the ModelConfig's square side (224) for the unprompted ViT's key
    pass, rounded down to the patch size. The keys of every stored task were made this way."""
    side = max(VIT_STRIDE, VIT_STRIDE * (image_size // VIT_STRIDE))
    return InputSpec(backbone=VIT_BACKBONE, resize="squeeze", height=side, width=side)
