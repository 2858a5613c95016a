"""Task identification by nearest keys: UCAD's key bank, on the frozen, unprompted ViT.

Each task keeps K keys: farthest-point samples of its training images' patch tokens (ViT block
`KEY_LAYER`, see pipeline.features.backbone). A frame's distance to a task is the mean, over the
frame's patches, of the distance to the task's nearest key. A frame whose best distance exceeds that
task's calibrated bound is unknown.

The search is two-level so that it stays cheap with many tasks: each task's prototype (the mean of its
keys) is compared with the frame's mean token (one B x T product), and only the `candidates` tasks
with the nearest prototypes are scored against their keys. The nearest-prototype task is scored on
every patch; the others first on a fixed eighth of the patches, and on every patch only when that
estimate comes within `REFINE_SLACK` of the first's distance (a close call: the estimate's error over
that many patches is a few percent). The best task is always one scored on every patch, so the task,
its distance and the unknown decision are the exhaustive search's whenever the exhaustively nearest
task is among the candidates (measured on the shared sets: `inspection perf --part routing`); the
margin's runner-up may be an estimate. With at most `candidates` tasks every task is scored on every
patch: the exhaustive search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.features.backbone import KEY_LAYER, FeatureBatch
from pipeline.common.sampling import farthest_point_sampling

DEFAULT_CANDIDATES = 2
ESTIMATE_FRACTION = 8  # a runner-up candidate is first scored on 1 / this of the patches
REFINE_SLACK = 0.25  # ... and on all of them when that estimate is within this of the first's distance
_MAX_SCORES_PER_CHUNK = 1 << 24  # patch x key distances held at once (64 MiB of float32)


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
    """Scores frames against the keys of their nearest-prototype tasks in one vectorised pass."""

    def __init__(self, keys: dict[str, np.ndarray], bounds: dict[str, float], candidates: int = DEFAULT_CANDIDATES):
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.names = sorted(keys)
        self.candidates = candidates
        k = max((len(keys[n]) for n in self.names), default=0)
        # Pad every task to K keys by repeating its first key: a duplicate never changes a minimum.
        padded = [np.concatenate([keys[n], np.repeat(keys[n][:1], k - len(keys[n]), axis=0)]) for n in self.names]
        self._keys = torch.from_numpy(np.stack(padded)) if padded else torch.empty(0, 0, 0)  # T x K x D
        self._key_norms = (self._keys * self._keys).sum(dim=2)  # T x K, |k|^2 for the product form
        self._prototypes = torch.from_numpy(np.stack([keys[n].mean(axis=0) for n in self.names])) if padded else None
        self._prototype_norms = None if self._prototypes is None else (self._prototypes * self._prototypes).sum(dim=1)
        self._bounds = torch.tensor([bounds[n] for n in self.names], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.names)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """B x P x D features -> B x T mean nearest-key distances to every task (the exhaustive search)."""
        every = torch.arange(len(self.names)).expand(features.shape[0], -1)
        return self._exact(features, every)

    def shortlist(self, features: torch.Tensor) -> torch.Tensor:
        """B x C task indices to score: every task when there are few, else those with the nearest
        prototypes, nearest first."""
        count = len(self.names)
        if count <= self.candidates:
            return torch.arange(count).expand(features.shape[0], -1)
        # |m - c|^2 less the frame's own |m|^2, which does not change the order
        partial = torch.addmm(self._prototype_norms, features.mean(dim=1), self._prototypes.T, alpha=-2.0)  # B x T
        return partial.topk(self.candidates, dim=1, largest=False).indices

    def _exact(self, features: torch.Tensor, tasks: torch.Tensor, squared_norms: torch.Tensor | None = None) -> torch.Tensor:
        """B x C mean nearest-key distances of each frame to the tasks `tasks` (B x C indices) names.

        |f - k|^2 = (|k|^2 - 2 f.k) + |f|^2 as one batched product (what torch.cdist does for inputs this
        size); the patch term does not change which key is nearest, so it is added after the minimum,
        and only the minimum is rooted. `squared_norms`: B x P |f|^2 when the caller has them. Frames go
        in chunks that bound the memory."""
        b, p, d = features.shape
        c, k = tasks.shape[1], self._keys.shape[1]
        if squared_norms is None:
            squared_norms = (features * features).sum(dim=2)
        chunk = max(1, _MAX_SCORES_PER_CHUNK // max(1, p * c * k))
        out = []
        for start in range(0, b, chunk):
            rows, index = features[start : start + chunk], tasks[start : start + chunk]
            keys = self._keys[index].reshape(len(rows), c * k, d)
            partial = torch.baddbmm(self._key_norms[index].reshape(len(rows), 1, c * k), rows, keys.transpose(1, 2), alpha=-2.0)
            nearest = partial.view(len(rows), p, c, k).amin(dim=3) + squared_norms[start : start + chunk, :, None]
            out.append(nearest.clamp_min_(0.0).sqrt_().mean(dim=1))
        return torch.cat(out) if out else torch.empty(0, c)

    def identify(self, features: torch.Tensor) -> list[TaskMatch]:
        if not self.names:
            return [TaskMatch(None, None, float("inf"), 0.0) for _ in range(features.shape[0])]
        tasks = self.shortlist(features)  # B x C, nearest prototype first
        distances, exact = self._candidate_distances(features, tasks)
        best = distances.masked_fill(~exact, float("inf")).argmin(dim=1)
        rows = torch.arange(len(best))
        best_distance, best_task = distances[rows, best], tasks[rows, best]
        if tasks.shape[1] > 1:
            second = distances.scatter(1, best[:, None], float("inf")).amin(dim=1)
            margin = ((second - best_distance) / best_distance.clamp_min(1e-12)).clamp(max=1.0)
        else:
            margin = torch.ones_like(best_distance)
        known = best_distance <= self._bounds[best_task]
        return [TaskMatch(self.names[t] if ok else None, self.names[t], d, m)
                for t, d, m, ok in zip(best_task.tolist(), best_distance.tolist(), margin.tolist(), known.tolist())]

    def _candidate_distances(self, features: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x C distances to the candidate tasks and B x C bool: which were scored on every patch (the
        rest are estimates from a fixed subset of patches)."""
        norms = (features * features).sum(dim=2)  # B x P, shared by every call below
        if len(self.names) <= self.candidates:  # every task, every patch
            return self._exact(features, tasks, norms), torch.ones(tasks.shape, dtype=torch.bool)
        subset = _patch_subset(features.shape[1])
        distances = torch.cat([self._exact(features, tasks[:, :1], norms),
                               self._exact(features[:, subset], tasks[:, 1:], norms[:, subset])], dim=1)
        exact = torch.zeros(tasks.shape, dtype=torch.bool)
        exact[:, 0] = True
        close = distances[:, 1:] <= distances[:, :1] * (1.0 + REFINE_SLACK)
        rows, columns = close.nonzero(as_tuple=True)
        if len(rows):
            columns = columns + 1
            distances[rows, columns] = self._exact(features[rows], tasks[rows, columns][:, None], norms[rows])[:, 0]
            exact[rows, columns] = True
        return distances, exact


def _patch_subset(patches: int) -> torch.Tensor:
    """A fixed, spatially spread 1 / ESTIMATE_FRACTION of the patch indices (seeded, so a frame's estimate
    never changes; a random subset has none of a stride's aliasing with the grid's width)."""
    count = max(1, patches // ESTIMATE_FRACTION)
    return torch.randperm(patches, generator=torch.Generator().manual_seed(patches))[:count].sort().values
