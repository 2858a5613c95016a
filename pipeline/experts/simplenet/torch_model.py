"""SimpleNet's torch parts: a linear feature adaptor, and a discriminator telling adapted normal patch
features from the same features moved by Gaussian noise (the paper's anomalous feature generator)."""

from __future__ import annotations

import torch
from torch import nn


class Adaptor(nn.Module):
    """Standardises frozen patch features with the fit patches' statistics, then one linear layer: the
    frozen backbone's features are moved towards what this product's normal patches need."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


class Discriminator(nn.Module):
    """Patch normality: high for normal adapted features, low for anomalous ones."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)[:, 0]


class SimpleNetModel(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.adaptor = Adaptor(dim)
        self.discriminator = Discriminator(dim, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """N x D frozen patch features -> N anomaly scores: softplus of the negated normality, monotone in
        it and positive, as thresholds on raw scores assume."""
        return nn.functional.softplus(-self.discriminator(self.adaptor(features)))


def truncated_l1(normal: torch.Tensor, anomalous: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's loss on normality outputs: normal ones pushed above +margin, anomalous below -margin."""
    return torch.relu(margin - normal).mean() + torch.relu(margin + anomalous).mean()
