"""PatchCore's torch parts (Roth et al., CVPR 2022): patch embedding, coreset selection, scoring.

Nearest-neighbour search over the memory bank is pipeline.common.neighbours' job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.features.backbone import FeatureBatch
from pipeline.common.sampling import farthest_point_sampling


def embed_patches(batch: FeatureBatch, stages: tuple[int, ...]) -> torch.Tensor:
    """Locally aware patch features: 3x3 neighbourhood average of each stage, upsampled to the finest
    stage's grid and concatenated. Returns B x h x w x D."""
    maps = [F.avg_pool2d(batch.stages[s], kernel_size=3, stride=1, padding=1) for s in stages]
    grid = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1).contiguous()


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int, seed: int) -> torch.Tensor:
    """Indices of a k-center greedy coreset. Distances are taken in a random projection (JL lemma),
    so each of the `size` steps costs N x projection_dim instead of N x D."""
    dim = features.shape[1]
    if projection_dim < dim:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        features = features @ projection
    return farthest_point_sampling(features, size, seed)


def reweighted_image_scores(
    query: torch.Tensor, nn_dist: torch.Tensor, nn_index: torch.Tensor, bank_neighbours: torch.Tensor, bank: torch.Tensor
) -> torch.Tensor:
    """PatchCore's image score: the largest patch distance s*, scaled by 1 - softmax weight of the
    matched bank entry m* among its b nearest bank neighbours (the paper's Eq. 7).

    query: B x P x D patches; nn_dist / nn_index: B x P nearest-bank distance and index;
    bank_neighbours: M x b indices of each bank entry's b nearest bank entries (itself first)."""
    best = nn_dist.argmax(dim=1)  # B
    rows = torch.arange(query.shape[0], device=query.device)
    s_star = nn_dist[rows, best]
    q_star = query[rows, best]  # B x D
    neighbours = bank[bank_neighbours[nn_index[rows, best]]]  # B x b x D
    distances = torch.linalg.vector_norm(neighbours - q_star[:, None, :], dim=-1)  # B x b
    weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weight * s_star


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of B x H x W maps, kernel radius 4 sigma, reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def upsample_maps(patch_scores: torch.Tensor, image_hw: tuple[int, int], sigma: float) -> torch.Tensor:
    """B x h x w patch scores -> B x H x W smoothed pixel map."""
    maps = F.interpolate(patch_scores[:, None], size=tuple(image_hw), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)
