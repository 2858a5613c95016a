"""PatchCore as an Expert: memory bank fitting, faiss search, state as bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from pipeline.backbone import PATCH_STAGES, Backbone, FeatureBatch
from pipeline.experts.base import Expert, ExpertOutput
from pipeline.experts.patchcore.torch_model import (
    embed_patches,
    greedy_coreset,
    reweighted_image_scores,
    upsample_maps,
)
from pipeline.serialization import pack, unpack


@dataclass(frozen=True)
class PatchCoreConfig:
    coreset_ratio: float = 0.02
    projection_dim: int = 64  # random projection used only to speed up coreset selection
    max_coreset_size: int = 8000
    num_neighbors: int = 3  # b of the image-score re-weighting
    map_sigma: float = 4.0
    seed: int = 0


class PatchCore(Expert):
    name = "patchcore"

    def __init__(self, config: PatchCoreConfig = PatchCoreConfig()):
        self.config = config
        self.bank: np.ndarray | None = None  # M x D float32
        self._index: faiss.Index | None = None
        self._bank_neighbours: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone | None = None) -> None:
        patches = torch.cat([embed_patches(b, PATCH_STAGES).flatten(0, 2) for b in batches]).float().cpu()
        size = min(self.config.max_coreset_size, max(1, int(len(patches) * self.config.coreset_ratio)))
        chosen = greedy_coreset(patches, size, self.config.projection_dim, self.config.seed)
        self._set_bank(patches[chosen].numpy())

    def _set_bank(self, bank: np.ndarray) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self._index = faiss.IndexFlatL2(self.bank.shape[1])
        self._index.add(self.bank)
        k = min(self.config.num_neighbors, len(self.bank))
        _, neighbours = self._index.search(self.bank, k)  # itself first (distance 0)
        self._bank_neighbours = torch.from_numpy(neighbours.astype(np.int64))

    # --------------------------------------------------------------------------------- inference
    def predict(self, batch: FeatureBatch) -> ExpertOutput:
        if self._index is None:
            raise RuntimeError("PatchCore.predict before fit/from_bytes")
        query = embed_patches(batch, PATCH_STAGES).float().cpu()  # B x h x w x D
        b, h, w, d = query.shape
        flat = query.reshape(b * h * w, d)
        sq_dist, index = self._index.search(np.ascontiguousarray(flat.numpy()), 1)
        nn_dist = torch.from_numpy(np.sqrt(np.maximum(sq_dist[:, 0], 0))).view(b, h * w)
        nn_index = torch.from_numpy(index[:, 0].astype(np.int64)).view(b, h * w)
        scores = reweighted_image_scores(
            query.view(b, h * w, d), nn_dist, nn_index, self._bank_neighbours, torch.from_numpy(self.bank)
        )
        maps = upsample_maps(nn_dist.view(b, h, w), batch.image_size, self.config.map_sigma)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.bank is None:
            raise RuntimeError("PatchCore.to_bytes before fit")
        return pack({"expert": self.name, "config": self.config.__dict__}, {"bank": self.bank})

    @classmethod
    def from_bytes(cls, data: bytes) -> "PatchCore":
        meta, arrays = unpack(data)
        if meta.get("expert") != cls.name:
            raise ValueError(f"state is for expert {meta.get('expert')!r}, not {cls.name!r}")
        expert = cls(PatchCoreConfig(**meta["config"]))
        expert._set_bank(arrays["bank"])
        return expert
