"""What the trained experts (Reverse Distillation, FCDD, PANDA, SimpleNet) share: seeded generators, a
seeded hold-out split of the fit images, early stopping that keeps the best weights, and network weights as packable arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class FitReport:
    """What fit did: which of the given images it trained and validated on, and the loss curve."""

    num_images: int
    train_indices: list[int]
    validation_indices: list[int]
    best_epoch: int  # 0-based; the kept weights are those after this epoch
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, validation_loss (, ...)


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """An independent, seeded CPU generator per purpose (split, shuffling, anomaly pools, ...): each
    stream of a seed gives its own sequence, and none disturbs torch's global RNG."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def split_indices(n: int, config) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) train / validation split of n images, from a config's `validation_fraction`,
    `min_validation_images` and `seed`. With too few images to keep at least two for training, nothing
    is held out and early stopping watches the training loss instead."""
    n_val = max(config.min_validation_images, int(round(n * config.validation_fraction)))
    if config.validation_fraction <= 0 or n - n_val < 2:
        n_val = 0
    order = np.random.default_rng(config.seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class EarlyStopping:
    """Keeps the weights of the epoch with the lowest monitored loss; says when `patience` epochs
    passed without a better one."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss, self.best_epoch = math.inf, -1
        self._best_state: dict[str, torch.Tensor] | None = None

    def should_stop(self, epoch: int, loss: float, net: nn.Module) -> bool:
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self._best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            return False
        return epoch - self.best_epoch >= self.patience

    def restore_best(self, net: nn.Module) -> None:
        """Load the best weights (none only if every monitored loss was NaN: the last ones stay)."""
        if self._best_state is not None:
            net.load_state_dict(self._best_state)

    def summary(self, epochs_run: int, num_images: int, num_validation_images: int) -> dict:
        return {"best_epoch": self.best_epoch, "epochs_run": epochs_run, "best_monitored_loss": self.best_loss,
                "num_images": num_images, "num_validation_images": num_validation_images}  # fmt: skip


def module_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    """A network's weights as arrays for pipeline.common.serialization.pack: floats as float32, integer
    buffers (BatchNorm's num_batches_tracked) as int64."""
    arrays = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu()
        arrays[key] = value.numpy().astype(np.float32 if value.is_floating_point() else np.int64)
    return arrays


def load_module_arrays(net: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """The inverse of module_arrays, strict; returns the network in eval mode."""
    net.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    return net.eval()
