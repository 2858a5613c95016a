"""Reverse Distillation as an Expert: seeded training with early stopping on held-out normal images,
state as bytes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.fitting import EarlyStopping, FitReport, load_module_arrays, module_arrays, split_indices
from pipeline.experts.reverse_distillation.torch_model import (
    TEACHER_STAGES,
    ReverseDistillationNet,
    anomaly_maps,
    distillation_loss,
    per_image_loss,
)
from pipeline.common.serialization import pack


@dataclass(frozen=True)
class ReverseDistillationConfig:
    embedding_channels: int = 256  # OCBE output (stride 32)
    decoder_channels: tuple[int, int, int] = (32, 64, 128)  # decoder hidden widths at strides 4, 8, 16
    max_epochs: int = 60  # ~1.5 s an epoch for 160 images of 224 px on 2 idle cores
    patience: int = 10  # epochs without a better validation loss before stopping
    learning_rate: float = 5e-3
    betas: tuple[float, float] = (0.5, 0.999)  # the paper's Adam betas
    batch_size: int = 16
    validation_fraction: float = 0.15  # of the fit images, held out (normal only) for early stopping
    min_validation_images: int = 2
    map_sigma: float = model_setting("map_sigma")
    seed: int = model_setting("seed")

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError(f"max_epochs and batch_size must be >= 1, patience >= 0: {self}")


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Training produces denormal floats in the backward pass after a few steps, which makes CPU convolutions
    5-10x slower; flush them to zero while fitting. (Resets the process-wide flag to its default, off.)"""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


class ReverseDistillation(Expert):
    name = "reverse_distillation"
    config_type = ReverseDistillationConfig

    def __init__(self, config: ReverseDistillationConfig = ReverseDistillationConfig()):
        self.config = config
        self.net: ReverseDistillationNet | None = None
        self.channels: tuple[int, int, int] | None = None
        self.summary: dict = {}  # stored with the state: best_epoch, epochs_run, best_validation_loss
        self.fit_report: FitReport | None = None  # only after fit, not stored

    def _build(self, channels: Sequence[int]) -> ReverseDistillationNet:
        self.channels = tuple(int(c) for c in channels)
        return ReverseDistillationNet(self.channels, self.config.embedding_channels, self.config.decoder_channels)

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone | None = None) -> None:
        """Train on normal images only. `backbone` is unused: the teacher features are in the batches."""
        cfg = self.config
        with torch.inference_mode(False), torch.enable_grad(), flush_denormals():
            # the batches were made under inference mode: clone so autograd may use them
            teacher = [torch.cat([b.stages[s] for b in batches]).float().clone() for s in TEACHER_STAGES]
            n = teacher[0].shape[0]
            train_idx, val_idx = split_indices(n, cfg)
            train_t, val_t = torch.tensor(train_idx), torch.tensor(val_idx, dtype=torch.long)
            history: list[dict] = []
            with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
                torch.manual_seed(cfg.seed)
                net = self._build([t.shape[1] for t in teacher]).to(teacher[0].device)
                optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
                order_gen = torch.Generator().manual_seed(cfg.seed)
                stopping = EarlyStopping(cfg.patience)
                for epoch in range(cfg.max_epochs):
                    net.train()
                    order = train_t[torch.randperm(len(train_t), generator=order_gen)]
                    total = 0.0
                    for start in range(0, len(order), cfg.batch_size):
                        idx = order[start : start + cfg.batch_size]
                        target = [t[idx] for t in teacher]
                        loss = distillation_loss(target, net(target))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach()) * len(idx)
                    train_loss = total / len(order)
                    val_loss = self._validation_loss(net, teacher, val_t) if len(val_idx) else None
                    history.append({"train_loss": train_loss, "validation_loss": val_loss})
                    if stopping.should_stop(epoch, train_loss if val_loss is None else val_loss, net):
                        break
            stopping.restore_best(net)
        self.net = net.cpu().eval()
        self.summary = stopping.summary(len(history), n, len(val_idx))
        self.fit_report = FitReport(n, train_idx, val_idx, stopping.best_epoch, history)

    def _validation_loss(self, net: ReverseDistillationNet, teacher: list[torch.Tensor], idx: torch.Tensor) -> float:
        net.eval()
        losses = []
        with torch.no_grad():
            for start in range(0, len(idx), self.config.batch_size):
                target = [t[idx[start : start + self.config.batch_size]] for t in teacher]
                losses.append(per_image_loss(target, net(target)))
        return float(torch.cat(losses).mean())

    # --------------------------------------------------------------------------------- inference
    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self.net is None:
            raise RuntimeError("ReverseDistillation.predict before fit/from_bytes")
        with torch.no_grad():
            teacher = [batch.stages[s].float().cpu() for s in TEACHER_STAGES]
            maps = anomaly_maps(teacher, self.net(teacher), batch.image_hw, self.config.map_sigma)
            scores = (maps if batch.valid is None else maps.masked_fill(~batch.valid.cpu(), float("-inf"))).flatten(1).amax(dim=1)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.net is None:
            raise RuntimeError("ReverseDistillation.to_bytes before fit")
        meta = {"expert": self.name, "config": asdict(self.config), "channels": list(self.channels),
                "summary": self.summary}  # fmt: skip
        return pack(meta, module_arrays(self.net))

    @classmethod
    def from_bytes(cls, data: bytes) -> "ReverseDistillation":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(ReverseDistillationConfig, meta["config"]))
        expert.net = load_module_arrays(expert._build(meta["channels"]), arrays)
        expert.summary = meta.get("summary", {})
        return expert
