"""FCDD's torch parts (Liznerski et al., "Explainable Deep One-Class Classification", ICLR 2021).

A fully convolutional network maps an image to a low-resolution map phi(X); A(X) = sqrt(phi^2 + 1) - 1
(pseudo-Huber) is the anomaly heatmap. Here the network is the frozen pretrained backbone (stage 2,
stride 8, with stage 3 upsampled onto its grid) followed by a small trainable conv head. Heatmaps are
brought to input resolution by FCDD's receptive-field upsampling: a transposed convolution with a fixed
Gaussian kernel, stride = the output stride.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_STRIDE = {2: 8, 3: 16, 4: 32}  # backbone stage -> stride; the finest chosen stage sets the grid


def fcdd_features(stages: Mapping[int, torch.Tensor], chosen: Sequence[int]) -> torch.Tensor:
    """Chosen backbone stages on the grid of the first (finest) one, concatenated: B x C x h x w."""
    maps = [stages[s].float() for s in chosen]
    grid = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(maps, dim=1)


class FCDDHead(nn.Module):
    """1x1 conv to hidden[0], then a 3x3 conv per further width (each with BN + ReLU), then a 1x1 conv to
    the single-channel phi. Replicate padding: no artificial edge at the image border."""

    def __init__(self, in_channels: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(hidden):
            kernel = 1 if i == 0 else 3
            layers += [
                nn.Conv2d(channels, width, kernel, padding=kernel // 2, padding_mode="replicate", bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> A(X): B x 1 x h x w, non-negative."""
        return pseudo_huber(self.layers(features))


def pseudo_huber(phi: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(phi * phi + 1.0) - 1.0


def per_sample_loss(heatmaps: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """FCDD's objective per sample: mean(A) for normal samples, -log(1 - exp(-mean(A))) for anomalies.
    heatmaps: B x 1 x h x w; anomalous: B bool."""
    mean = heatmaps.flatten(1).mean(dim=1)
    # -log(1 - exp(-m)) = -log(-expm1(-m)); m is clamped away from 0, where the term diverges
    anomaly_term = -torch.log(-torch.expm1(-mean.clamp_min(1e-6)))
    return torch.where(anomalous, anomaly_term, mean)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """size x size Gaussian, centred between the middle pixels for even sizes, summing to 1."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = k1[:, None] * k1[None, :]
    return kernel / kernel.sum()


def upsample_matrix(size: int, cells: int, stride: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """size x cells weights of the 1-D receptive-field upsampling: pixel p takes from cell i the Gaussian
    weight of its distance to the cell's centre i * stride + (stride - 1) / 2, within the kernel's
    support (|d| <= (kernel_size - 1) / 2), rows normalised to sum to 1."""
    centres = torch.arange(cells, dtype=torch.float64) * stride + (stride - 1) / 2
    distance = torch.arange(size, dtype=torch.float64)[:, None] - centres[None, :]
    weights = torch.exp(-(distance**2) / (2 * sigma**2)) * (distance.abs() <= (kernel_size - 1) / 2)
    # A pixel no cell reaches (a grid smaller than size / stride) takes the nearest cell.
    nearest = torch.zeros_like(weights).scatter_(1, distance.abs().argmin(dim=1, keepdim=True), 1.0)
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, nearest)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def receptive_upsample(heatmaps: torch.Tensor, image_hw: tuple[int, int], stride: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """FCDD's Gaussian receptive-field upsampling of B x 1 x h x w heatmaps to B x H x W.

    The paper's transposed convolution with a fixed kernel_size x kernel_size Gaussian at stride =
    the output stride: each low-resolution cell spreads its value over its receptive field, centred on
    the centre of its input patch, and the result is cropped to the input. The Gaussian is separable,
    so it is computed exactly as two small matrix products (M_y A M_x^T), far cheaper on CPU than
    conv_transpose2d with a large kernel. Unlike the paper, the sum is divided by the summed kernel
    weights (the same upsampling of a map of ones), a normalised convolution: values keep the scale of
    A, and pixels near the border, where fewer cells reach, are not pulled towards zero."""
    h, w = heatmaps.shape[-2:]
    rows = upsample_matrix(image_hw[0], h, stride, kernel_size, sigma).to(heatmaps.device, heatmaps.dtype)
    cols = upsample_matrix(image_hw[1], w, stride, kernel_size, sigma).to(heatmaps.device, heatmaps.dtype)
    return rows @ heatmaps[:, 0] @ cols.T


__all__ = [
    "OUTPUT_STRIDE",
    "FCDDHead",
    "fcdd_features",
    "gaussian_kernel",
    "per_sample_loss",
    "pseudo_huber",
    "receptive_upsample",
    "upsample_matrix",
]
