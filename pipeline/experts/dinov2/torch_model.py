"""AnomalyDINO's torch parts (Damm et al., 2024): normalised DINOv2 patch features, PCA foreground
masks, and the top-fraction image score.

Nearest-neighbour search over the memory bank is faiss's job (pipeline.experts.dinov2.expert).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# AnomalyDINO's mask post-processing: a 3 x 3 dilation, then a 3 x 3 closing, on the token grid.
MASK_KERNEL = 3
# AnomalyDINO's sign rule: objects sit in the middle. The centre crop (20% border off each side) must be
# foreground on more than 35% of its patches, else the other side of the first component is the object.
CENTRE_BORDER = 0.2
CENTRE_MIN_FOREGROUND = 0.35


def patch_features(tokens: Mapping[int, torch.Tensor], layers: Sequence[int], norm: nn.Module | None) -> torch.Tensor:
    """B x P x D unprompted block outputs of `layers` -> B x P x (len(layers) * D) unit-length features.

    `norm` (the ViT's final LayerNorm, or None) is applied to each block's tokens first, as DINOv2's
    `get_intermediate_layers(norm=True)` does for AnomalyDINO. Each block is L2-normalised on its own
    before concatenating, so every block weighs the same in the cosine distance."""
    parts = []
    for layer in layers:
        t = tokens[layer].float()
        if norm is not None:
            t = norm(t)
        parts.append(F.normalize(t, dim=-1))
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


def first_principal_component(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unit direction) of the first principal component of N x D features, in float64, the
    direction's sign fixed so that its largest-magnitude entry is positive (eigh's sign is arbitrary)."""
    x = features.double()
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / max(1, len(x) - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    direction = vectors[:, -1]
    if direction[direction.abs().argmax()] < 0:
        direction = -direction
    return mean, direction


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of 1-D values (256-bin histogram, the middle of tied best thresholds) and its
    separability: between-class over total variance, 1 for two point masses, 2/pi = 0.64 for a Gaussian."""
    v = values.double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return lo, 0.0
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    p = hist / hist.sum()
    width = (hi - lo) / bins
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    w0 = p.cumsum(0)[:-1]  # class 0 = bins 0..k, threshold at the upper edge of bin k
    mu0 = (p * centres).cumsum(0)[:-1]
    mu_total = float((p * centres).sum())
    w1 = 1.0 - w0
    between = (mu_total * w0 - mu0) ** 2 / (w0 * w1).clamp_min(1e-300)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.zeros_like(between))
    best = float(between.max())
    # empty bins between two clusters tie: take the middle of the gap, not the edge of one cluster
    ties = torch.nonzero(between >= best * (1 - 1e-9)).flatten()
    k = (int(ties.min()) + int(ties.max())) / 2
    total = float((p * (centres - mu_total) ** 2).sum())
    return lo + (k + 1) * width, (best / total if total > 0 else 0.0)


def projections(features: torch.Tensor, mean: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """... x D features -> ... scalar positions along the principal direction (float64)."""
    return (features.double() - mean.to(features.device, torch.float64)) @ direction.to(features.device, torch.float64)


def centre_foreground(masks: torch.Tensor) -> float:
    """Mean foreground fraction of the centre crop of B x rows x cols masks (AnomalyDINO's sign check)."""
    rows, cols = masks.shape[-2:]
    r0, r1 = int(rows * CENTRE_BORDER), int(rows * (1 - CENTRE_BORDER))
    c0, c1 = int(cols * CENTRE_BORDER), int(cols * (1 - CENTRE_BORDER))
    return float(masks[:, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)].float().mean())


def refine_masks(masks: torch.Tensor, kernel: int = MASK_KERNEL) -> torch.Tensor:
    """AnomalyDINO's post-processing of B x rows x cols boolean masks: dilation, then closing (dilation
    then erosion), square kernel. The padding never erodes from the image border, as OpenCV's default."""
    pad = kernel // 2
    x = masks.float()[:, None]

    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m, kernel, stride=1, padding=pad)

    def erode(m: torch.Tensor) -> torch.Tensor:
        return -F.max_pool2d(-m, kernel, stride=1, padding=pad)

    return erode(dilate(dilate(x)))[:, 0] > 0.5


def foreground_masks(features: torch.Tensor, grid: tuple[int, int], mean: torch.Tensor, direction: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """B x P x D features on a rows x cols grid -> B x rows x cols refined foreground masks: the side of
    the principal direction above `threshold` (the direction is stored with the object side positive)."""
    raw = projections(features, mean, direction) > threshold
    return refine_masks(raw.view(features.shape[0], *grid))


def mask_agreement(masks: torch.Tensor) -> torch.Tensor:
    """Cohen's kappa of each of N x rows x cols masks with their majority mask: 1 = the same patches,
    0 = no more agreement than chance at those coverages (a random texture split), per image."""
    flat = masks.flatten(1).float()
    consensus = (flat.mean(dim=0) > 0.5).float()
    observed = (flat == consensus).float().mean(dim=1)
    p_mask, p_consensus = flat.mean(dim=1), consensus.mean()
    expected = p_mask * p_consensus + (1 - p_mask) * (1 - p_consensus)
    return torch.where(expected < 1, (observed - expected) / (1 - expected).clamp_min(1e-12), torch.zeros_like(observed))


def top_fraction_scores(distances: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """AnomalyDINO's image score: the mean of the largest `fraction` of each image's valid patch
    distances (at least one patch; floor, as the paper). B x P distances (>= 0) and validity -> B; an
    image with no valid patch scores 0."""
    n_valid = valid.sum(dim=1)
    k = torch.clamp((n_valid.double() * fraction).floor().long(), min=1)
    # invalid patches as 0: never above a valid distance, so the top k of the row are the valid top k
    ranked = distances.masked_fill(~valid, 0.0).sort(dim=1, descending=True).values
    keep = torch.arange(distances.shape[1], device=distances.device)[None, :] < k[:, None]
    return torch.where(keep, ranked, torch.zeros_like(ranked)).sum(dim=1) / k.to(distances.dtype)
