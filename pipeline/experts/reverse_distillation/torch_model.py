"""Reverse Distillation's torch parts (Deng & Li, CVPR 2022): the one-class bottleneck embedding (OCBE),
the student decoder, the multi-scale cosine loss and the anomaly map.

The teacher is the shared frozen backbone: its stages 1, 2, 3 (strides 4, 8, 16) come precomputed in a
FeatureBatch, so no encoder runs here. The student decoder reconstructs them from the OCBE's compact
embedding (stride 32), in reverse order (stage 3 first).

Adaptation to EfficientNet-Lite0: the backbone's stage outputs are linear bottlenecks (projection conv + BN,
no activation), so they take negative values. Each decoder block therefore keeps a hidden post-ReLU state
that feeds the next block, and emits its reconstruction through a linear 1x1 head (the ResNet decoder of
the paper ends each block in a ReLU, which matched its post-ReLU teacher).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.experts.patchcore.torch_model import gaussian_blur, upsample_maps

TEACHER_STAGES = (1, 2, 3)  # strides 4, 8, 16


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convs), projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion onto stage 3's grid, then a stride-2 residual block."""

    def __init__(self, channels: Sequence[int], embedding_channels: int):
        super().__init__()
        c1, c2, c3 = channels
        # stage 1 (stride 4) -> stride 16 in two strided 3x3 convs, stage 2 (stride 8) -> stride 16 in one
        self.down1 = nn.Sequential(_conv_bn_relu(c1, c2, 3, 2), _conv_bn_relu(c2, c3, 3, 2))
        self.down2 = _conv_bn_relu(c2, c3, 3, 2)
        self.fuse = _conv_bn_relu(3 * c3, embedding_channels, 1, 1)
        self.block = ResidualBlock(embedding_channels, embedding_channels, stride=2)

    def forward(self, teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = teacher
        grid = f3.shape[-2:]
        l1, l2 = _fit_to(self.down1(f1), grid), _fit_to(self.down2(f2), grid)
        return self.block(self.fuse(torch.cat([l1, l2, f3], dim=1)))


class DecoderBlock(nn.Module):
    """x2 upsampling (transposed conv), a 3x3 conv, and a linear 1x1 head onto a teacher stage."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(cin, hidden, 2, stride=2, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.conv = _conv_bn_relu(hidden, hidden, 3, 1)
        self.head = nn.Conv2d(hidden, cout, 1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.conv(_fit_to(self.up(x), size))
        return hidden, self.head(hidden)


class StudentDecoder(nn.Module):
    """Mirror of the teacher: embedding (stride 32) -> stage 3 (16) -> stage 2 (8) -> stage 1 (4)."""

    def __init__(self, channels: Sequence[int], embedding_channels: int, hidden: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        h1, h2, h3 = hidden
        self.block3 = DecoderBlock(embedding_channels, h3, c3)
        self.block2 = DecoderBlock(h3, h2, c2)
        self.block1 = DecoderBlock(h2, h1, c1)

    def forward(self, embedding: torch.Tensor, sizes: Sequence[torch.Size]) -> list[torch.Tensor]:
        x, s3 = self.block3(embedding, sizes[2])
        x, s2 = self.block2(x, sizes[1])
        _, s1 = self.block1(x, sizes[0])
        return [s1, s2, s3]


class ReverseDistillationNet(nn.Module):
    """Trainable part: OCBE + student decoder. Input: teacher stages [1, 2, 3]; output: the student's."""

    def __init__(self, channels: Sequence[int], embedding_channels: int, decoder_channels: Sequence[int]):
        super().__init__()
        self.bottleneck = OneClassBottleneck(channels, embedding_channels)
        self.decoder = StudentDecoder(channels, embedding_channels, decoder_channels)

    def forward(self, teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(teacher), [t.shape[-2:] for t in teacher])


def _fit_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Only for input sizes that are not multiples of 32 (TF 'same' padding rounds stage grids up)."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def cosine_distance_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale, B x h x w maps of 1 - cosine similarity along channels."""
    return [1.0 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]


def distillation_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's Eq. 3: per scale the mean over locations (and images) of 1 - cos, summed over scales."""
    return sum(d.mean() for d in cosine_distance_maps(teacher, student))


def per_image_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """B values of the loss above, one per image (validation)."""
    return sum(d.flatten(1).mean(dim=1) for d in cosine_distance_maps(teacher, student))


def anomaly_maps(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], image_hw: tuple[int, int], sigma: float
) -> torch.Tensor:
    """B x H x W: per-scale 1 - cos upsampled bilinearly to the input size, summed, then smoothed."""
    total = sum(upsample_maps(d, image_hw, 0.0) for d in cosine_distance_maps(teacher, student))
    return gaussian_blur(total, sigma)
