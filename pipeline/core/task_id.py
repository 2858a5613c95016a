"""Task identification by nearest keys: UCAD's key bank, on the frozen, unprompted ViT.

Each task keeps K keys: farthest-point samples of its training images' patch tokens (ViT block
`KEY_LAYER`, see pipeline.features.backbone). A frame's
distance to a task is the mean, over the frame's patches, of the distance to the task's nearest key.
All tasks are scored at once: one batched distance computation over a T x K x D key tensor, never a
Python loop over tasks. A frame whose best distance exceeds that task's calibrated bound is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.features.backbone import KEY_LAYER, FeatureBatch
from pipeline.common.sampling import farthest_point_sampling


def task_features(batch: FeatureBatch) -> torch.Tensor:
    """B x P x D patch features used for keys and identification."""
    if KEY_LAYER not in batch.tokens:
        raise ValueError("task identification needs the ViT's key tokens: build the backbone with Backbone.pretrained()")
    return batch.tokens[KEY_LAYER].float().cpu()


def select_keys(features: torch.Tensor, num_keys: int, seed: int) -> np.ndarray:
    """K x D keys from N x P x D training patch features."""
    flat = features.reshape(-1, features.shape[-1])
    return flat[farthest_point_sampling(flat, num_keys, seed)].numpy().astype(np.float32)


@dataclass(frozen=True)
class TaskMatch:
    category: str | None  # None: farther than every task's bound
    nearest: str | None  # best task even when unknown, for diagnostics
    distance: float
    margin: float  # (second best - best) / best; 1.0 when only one task is known


class KeyTaskIdentifier:
    """Scores frames against every task's keys in one vectorised pass."""

    def __init__(self, keys: dict[str, np.ndarray], bounds: dict[str, float]):
        self.names = sorted(keys)
        if not self.names:
            self._keys = torch.empty(0)
            self._bounds = torch.empty(0)
            return
        k = max(len(keys[n]) for n in self.names)
        # Pad every task to K keys by repeating its first key: a duplicate never changes a minimum.
        padded = [np.concatenate([keys[n], np.repeat(keys[n][:1], k - len(keys[n]), axis=0)]) for n in self.names]
        self._keys = torch.from_numpy(np.stack(padded))  # T x K x D
        self._bounds = torch.tensor([bounds[n] for n in self.names], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.names)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """B x P x D features -> B x T mean nearest-key distances."""
        t, k, d = self._keys.shape
        pairwise = torch.cdist(features, self._keys.reshape(t * k, d)[None].expand(features.shape[0], -1, -1))
        return pairwise.view(features.shape[0], features.shape[1], t, k).amin(dim=3).mean(dim=1)

    def identify(self, features: torch.Tensor) -> list[TaskMatch]:
        if not self.names:
            return [TaskMatch(None, None, float("inf"), 0.0) for _ in range(features.shape[0])]
        distances = self.distances(features)
        best = distances.argmin(dim=1)
        matches = []
        for row, index in zip(distances, best.tolist()):
            distance = float(row[index])
            second = float(row.kthvalue(2).values) if len(self.names) > 1 else float("inf")
            margin = min(1.0, (second - distance) / max(distance, 1e-12))
            known = distance <= float(self._bounds[index])
            name = self.names[index]
            matches.append(TaskMatch(name if known else None, name, distance, margin))
        return matches
