"""FCDD as an Expert: outlier exposure with synthetic anomalies, seeded training with early stopping on
held-out normal images plus synthetic anomalies made of them, state as bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.fitting import EarlyStopping, FitReport, load_module_arrays, module_arrays, seeded_generator, split_indices
from pipeline.experts.fcdd.torch_model import (
    OUTPUT_STRIDE,
    FCDDHead,
    fcdd_features,
    per_sample_loss,
    receptive_upsample,
)
from pipeline.common.serialization import pack
from pipeline.data.synthetic_anomalies import synthesize

IMAGE_SCORES = ("mean", "max")


@dataclass(frozen=True)
class FCDDConfig:
    stages: tuple[int, ...] = (2, 3)  # backbone stages, finest first: its grid (stride 8) is the output grid
    hidden_channels: tuple[int, ...] = (64, 64, 64)  # 1x1 conv, then one 3x3 conv per further width
    max_epochs: int = 30
    patience: int = 4  # epochs without a better validation loss before stopping
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    batch_size: int = 16  # normal images per step; as many synthetic anomalies join them
    anomalies_per_image: int = 1  # size of the outlier-exposure pool, per training image
    validation_fraction: float = 0.15  # of the fit images, held out (with synthetic anomalies) for early stopping
    min_validation_images: int = 2
    map_kernel_size: int = 68  # Gaussian upsampling kernel side ~ stage 2's receptive field (67 px)
    map_sigma: float = 12.0  # FCDD's default for 224 px inputs
    image_score: str = "mean"  # "mean" of A over the low-resolution map (the paper), or "max"
    seed: int = model_setting("seed")

    def __post_init__(self) -> None:
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if not self.stages or any(s not in OUTPUT_STRIDE for s in self.stages):
            raise ValueError(f"stages must be among {sorted(OUTPUT_STRIDE)}, got {self.stages}")
        if list(self.stages) != sorted(self.stages):
            raise ValueError(f"stages must be finest first (ascending), got {self.stages}")
        if not self.hidden_channels:
            raise ValueError("hidden_channels needs at least one width")
        if self.anomalies_per_image < 1 or self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("anomalies_per_image, batch_size and max_epochs must be at least 1")

    @property
    def output_stride(self) -> int:
        return OUTPUT_STRIDE[self.stages[0]]


class FCDD(Expert):
    name = "fcdd"
    config_type = FCDDConfig

    def __init__(self, config: FCDDConfig = FCDDConfig()):
        self.config = config
        self.net: FCDDHead | None = None
        self.in_channels: int | None = None
        self.summary: dict = {}  # stored with the state: best_epoch, epochs_run, ...
        self.fit_report: FitReport | None = None  # only after fit, not stored

    def _build(self, in_channels: int) -> FCDDHead:
        self.in_channels = int(in_channels)
        return FCDDHead(self.in_channels, self.config.hidden_channels)

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone) -> None:
        """Train on normal images, with synthetic anomalies made from them (embedded with `backbone`)
        as outlier exposure. Early stopping watches the FCDD loss on held-out normal images and
        synthetic anomalies of those same images."""
        if backbone is None:
            raise ValueError("FCDD.fit needs the backbone, to embed its synthetic anomalies")
        cfg = self.config
        device = backbone.device
        with torch.inference_mode(False), torch.enable_grad():
            pixels = torch.cat([b.pixels.detach().cpu() for b in batches]).float()
            # the batches were made under inference mode: clone so autograd may use them
            normal = self._embed_batches(batches, device)
            n = normal[0].shape[0]
            train_idx, val_idx = split_indices(n, cfg)
            train_t, val_t = torch.tensor(train_idx), torch.tensor(val_idx, dtype=torch.long)

            pool_idx = train_t.repeat(cfg.anomalies_per_image)
            pool = self._synthetic(backbone, pixels[pool_idx], seeded_generator(cfg.seed, 1))
            val_normal = [s[val_t] for s in normal]
            val_anomalous = self._synthetic(backbone, pixels[val_t], seeded_generator(cfg.seed, 2)) if len(val_idx) else None
            del pixels

            history: list[dict] = []
            with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
                torch.manual_seed(cfg.seed)
                net = self._build(sum(s.shape[1] for s in normal)).to(device)
            optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            order_gen = seeded_generator(cfg.seed, 3)
            pool_order = torch.randperm(len(pool_idx), generator=order_gen)
            pool_pos = 0
            stopping = EarlyStopping(cfg.patience)
            for epoch in range(cfg.max_epochs):
                net.train()
                order = train_t[torch.randperm(len(train_t), generator=order_gen)]
                total = 0.0
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    take = []
                    for _ in range(len(idx)):  # walk through the pool, reshuffled each time it is spent
                        if pool_pos == len(pool_order):
                            pool_order, pool_pos = torch.randperm(len(pool_idx), generator=order_gen), 0
                        take.append(int(pool_order[pool_pos]))
                        pool_pos += 1
                    take = torch.tensor(take)
                    features = fcdd_features(
                        {s: torch.cat([normal[i][idx], pool[i][take]]) for i, s in enumerate(cfg.stages)}, cfg.stages
                    )
                    labels = torch.cat([torch.zeros(len(idx)), torch.ones(len(take))]).bool().to(device)
                    loss = per_sample_loss(net(features), labels).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                train_loss = total / len(order)
                record = {"train_loss": train_loss, "validation_loss": None, "validation_auroc": None}
                if val_anomalous is not None:
                    record["validation_loss"], record["validation_auroc"] = self._validate(net, val_normal, val_anomalous)
                history.append(record)
                monitored = train_loss if record["validation_loss"] is None else record["validation_loss"]
                if stopping.should_stop(epoch, monitored, net):
                    break
            stopping.restore_best(net)
        self.net = net.cpu().eval()
        self.summary = stopping.summary(len(history), n, len(val_idx))
        self.fit_report = FitReport(n, train_idx, val_idx, stopping.best_epoch, history)

    def _embed_batches(self, batches: Sequence[FeatureBatch], device: torch.device) -> list[torch.Tensor]:
        return [torch.cat([b.stages[s] for b in batches]).float().to(device).clone() for s in self.config.stages]

    def _synthetic(self, backbone: Backbone, pixels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Synthetic anomalies of `pixels`, embedded: one tensor per chosen stage."""
        chunks: list[list[torch.Tensor]] = [[] for _ in self.config.stages]
        for start in range(0, len(pixels), self.config.batch_size):
            anomalous, _ = synthesize(pixels[start : start + self.config.batch_size], generator)
            stages = backbone(anomalous, keys=False).stages
            for chunk, s in zip(chunks, self.config.stages):
                chunk.append(stages[s].float().clone())
        return [torch.cat(chunk) for chunk in chunks]

    def _validate(self, net: FCDDHead, normal: list[torch.Tensor], anomalous: list[torch.Tensor]) -> tuple[float, float]:
        """FCDD loss over the held-out normal images and over their synthetic anomalies, the two weighted
        equally, and the image AUROC (mean A) of the one against the other (for the report)."""
        net.eval()
        cfg = self.config
        losses, scores = [], []
        with torch.no_grad():
            for stages, label in ((normal, False), (anomalous, True)):
                loss, score = [], []
                for start in range(0, len(stages[0]), 2 * cfg.batch_size):
                    chunk = {s: t[start : start + 2 * cfg.batch_size] for s, t in zip(cfg.stages, stages)}
                    heatmaps = net(fcdd_features(chunk, cfg.stages))
                    loss.append(per_sample_loss(heatmaps, torch.full((len(heatmaps),), label, device=heatmaps.device)))
                    score.append(heatmaps.flatten(1).mean(dim=1))
                losses.append(float(torch.cat(loss).mean()))
                scores.append(torch.cat(score).cpu())
        # AUROC as the probability that an anomaly outscores a normal image (ties count half)
        diff = scores[1][:, None] - scores[0][None, :]
        auroc = float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
        return sum(losses) / len(losses), auroc

    # --------------------------------------------------------------------------------- inference
    def heatmaps(self, batch: FeatureBatch) -> torch.Tensor:
        """A(X) on the low-resolution grid: B x 1 x h x w (CPU, float32)."""
        if self.net is None:
            raise RuntimeError("FCDD.predict before fit/from_bytes")
        self.net.eval()
        with torch.no_grad():
            stages = {s: batch.stages[s].float().cpu() for s in self.config.stages}
            return self.net(fcdd_features(stages, self.config.stages))

    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        cfg = self.config
        heatmaps = self.heatmaps(batch)
        with torch.no_grad():
            valid = batch.valid_grid(tuple(heatmaps.shape[-2:])).flatten(1)  # letterbox padding is not the product
            flat = heatmaps.flatten(1)
            if cfg.image_score == "mean":
                scores = (flat * valid).sum(dim=1) / valid.sum(dim=1)
            else:
                scores = flat.masked_fill(~valid, float("-inf")).amax(dim=1)
            maps = receptive_upsample(heatmaps, batch.image_hw, cfg.output_stride, cfg.map_kernel_size, cfg.map_sigma)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.net is None:
            raise RuntimeError("FCDD.to_bytes before fit")
        meta = {"expert": self.name, "config": asdict(self.config), "in_channels": self.in_channels,
                "summary": self.summary}  # fmt: skip
        return pack(meta, module_arrays(self.net))

    @classmethod
    def from_bytes(cls, data: bytes) -> "FCDD":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(FCDDConfig, meta["config"]))
        expert.net = load_module_arrays(expert._build(meta["in_channels"]), arrays)
        expert.summary = meta.get("summary", {})
        return expert
