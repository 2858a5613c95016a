"""Farthest-point (k-center greedy) sampling: UCAD's key selection and PatchCore's coreset both use it."""

from __future__ import annotations

import torch


def farthest_point_sampling(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of k rows of `points` (N x D), each the farthest from those chosen before it; the
    first is seeded-random. Returns all N indices when k >= N."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    # ||p - c||^2 = ||p||^2 + ||c||^2 - 2 p.c : one matrix-vector product per step into reused buffers,
    # no N x D temporary (the loop is memory-bound).
    points = points.float().contiguous()
    sq_norms = (points * points).sum(dim=1)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=generator)
    min_dist = torch.full((n,), float("inf"))
    dist = torch.empty(n)
    for i in range(k):
        if i > 0:
            chosen[i] = torch.argmax(min_dist)
        center = chosen[i]
        torch.mv(points, points[center], out=dist)
        dist.mul_(-2.0).add_(sq_norms).add_(sq_norms[center])
        torch.minimum(min_dist, dist, out=min_dist)
    return chosen
