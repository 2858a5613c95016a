"""PatchCore's memory bank: a coreset of normal patch features, searched exactly on the queries' device
(pipeline.common.neighbours: a chunked torch product on the CPU or a GPU; faiss-gpu when installed).

Shared by PatchCore and by UCAD's knowledge (a coreset of prompted ViT features): both score a frame by
its patches' nearest-neighbour distances, with the paper's re-weighted image score and a smoothed map.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.common.neighbours import NearestNeighbours
from pipeline.experts.patchcore.torch_model import greedy_coreset, reweighted_image_scores, upsample_maps


class MemoryBank:
    def __init__(self, bank: np.ndarray, num_neighbors: int):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # M x D
        self.num_neighbors = num_neighbors
        self._index = NearestNeighbours(self.bank, "l2")
        _, self._bank_neighbours = self._index.search(torch.from_numpy(self.bank), num_neighbors)  # itself first
        self._bank_tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

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
        flat = query.reshape(b * h * w, d).float()
        sq_dist, index = self._index.search(flat, 1)
        nn_dist = sq_dist[:, 0].clamp_min(0).sqrt().view(b, h * w)
        nn_index = index[:, 0].view(b, h * w)
        scoring = nn_dist if valid is None else nn_dist.masked_fill(~valid.reshape(b, h * w).to(nn_dist.device), 0.0)
        bank, neighbours = self._on(flat.device)
        scores = reweighted_image_scores(flat.view(b, h * w, d), scoring, nn_index, neighbours, bank)
        maps = upsample_maps(nn_dist.view(b, h, w), image_hw, map_sigma)
        return scores.cpu().numpy().astype(np.float32), maps.cpu().numpy().astype(np.float32)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank and its neighbour table as tensors on `device` (copied once)."""
        if device not in self._bank_tensors:
            self._bank_tensors[device] = (torch.from_numpy(self.bank).to(device), self._bank_neighbours.to(device))
        return self._bank_tensors[device]
