"""PatchCore's memory bank: a coreset of normal patch features searched with faiss.

Shared by PatchCore and by UCAD's knowledge (a coreset of prompted ViT features): both score a frame by
its patches' nearest-neighbour distances, with the paper's re-weighted image score and a smoothed map.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from pipeline.experts.patchcore.torch_model import greedy_coreset, reweighted_image_scores, upsample_maps


class MemoryBank:
    def __init__(self, bank: np.ndarray, num_neighbors: int):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # M x D
        self.num_neighbors = num_neighbors
        self._index = faiss.IndexFlatL2(self.bank.shape[1])
        self._index.add(self.bank)
        _, neighbours = self._index.search(self.bank, min(num_neighbors, len(self.bank)))  # itself first
        self._bank_neighbours = torch.from_numpy(neighbours.astype(np.int64))

    @classmethod
    def from_patches(
        cls, patches: torch.Tensor, ratio: float, max_size: int, projection_dim: int, num_neighbors: int, seed: int
    ) -> "MemoryBank":
        """N x D normal patches -> a greedy coreset of ratio x N of them (at most max_size)."""
        size = min(max_size, max(1, int(len(patches) * ratio)))
        chosen = greedy_coreset(patches, size, projection_dim, seed)
        return cls(patches[chosen].numpy(), num_neighbors)

    def __len__(self) -> int:
        return len(self.bank)

    def score(self, query: torch.Tensor, image_hw: tuple[int, int], map_sigma: float,
              valid: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """B x h x w x D query patches -> (B image scores, B x H x W smoothed maps), float32. `valid`
        (B x h x w bool): the patches the image score may come from (the map covers every patch)."""
        b, h, w, d = query.shape
        flat = np.ascontiguousarray(query.reshape(b * h * w, d).float().cpu().numpy())
        sq_dist, index = self._index.search(flat, 1)
        nn_dist = torch.from_numpy(np.sqrt(np.maximum(sq_dist[:, 0], 0))).view(b, h * w)
        nn_index = torch.from_numpy(index[:, 0].astype(np.int64)).view(b, h * w)
        scoring = nn_dist if valid is None else nn_dist.masked_fill(~valid.reshape(b, h * w), 0.0)
        scores = reweighted_image_scores(
            torch.from_numpy(flat).view(b, h * w, d), scoring, nn_index, self._bank_neighbours, torch.from_numpy(self.bank)
        )
        maps = upsample_maps(nn_dist.view(b, h, w), image_hw, map_sigma)
        return scores.numpy().astype(np.float32), maps.numpy().astype(np.float32)
