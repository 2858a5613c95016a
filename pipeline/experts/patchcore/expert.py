"""PatchCore as an Expert: locally aware CNN patch features into a memory bank, state as bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.features.backbone import PATCH_STAGES, Backbone, FeatureBatch
from pipeline.experts.base import Expert, ExpertOutput, model_setting
from pipeline.experts.patchcore.memory_bank import MemoryBank
from pipeline.experts.patchcore.torch_model import embed_patches
from pipeline.common.serialization import pack


@dataclass(frozen=True)
class PatchCoreConfig:
    """Every field is the line's (ModelConfig); `projection_dim` keeps its stored name."""

    coreset_ratio: float = model_setting("coreset_ratio")
    projection_dim: int = model_setting("coreset_projection_dim")  # random projection: speeds up coreset selection
    max_coreset_size: int = model_setting("max_coreset_size")
    num_neighbors: int = model_setting("num_neighbors")  # b of the image-score re-weighting
    map_sigma: float = model_setting("map_sigma")
    seed: int = model_setting("seed")


class PatchCore(Expert):
    name = "patchcore"
    config_type = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig = PatchCoreConfig()):
        self.config = config
        self.memory: MemoryBank | None = None

    @property
    def bank(self) -> np.ndarray | None:
        return None if self.memory is None else self.memory.bank

    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone | None = None) -> None:
        patches = torch.cat([embed_patches(b, PATCH_STAGES).flatten(0, 2) for b in batches]).float().cpu()
        c = self.config
        self.memory = MemoryBank.from_patches(patches, c.coreset_ratio, c.max_coreset_size, c.projection_dim, c.num_neighbors, c.seed)

    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self.memory is None:
            raise RuntimeError("PatchCore.predict before fit/from_bytes")
        query = embed_patches(batch, PATCH_STAGES)
        valid = batch.valid_grid(tuple(query.shape[1:3])) if batch.valid is not None else None
        scores, maps = self.memory.score(query, batch.image_hw, self.config.map_sigma, valid)
        return ExpertOutput(scores=scores, maps=maps)

    def to_bytes(self) -> bytes:
        if self.memory is None:
            raise RuntimeError("PatchCore.to_bytes before fit")
        return pack({"expert": self.name, "config": self.config.__dict__}, {"bank": self.memory.bank})

    @classmethod
    def from_bytes(cls, data: bytes) -> "PatchCore":
        meta, arrays = cls.unpack_state(data)
        expert = cls(PatchCoreConfig(**meta["config"]))
        expert.memory = MemoryBank(arrays["bank"], expert.config.num_neighbors)
        return expert
