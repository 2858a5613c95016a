"""SimpleNet as an Expert: PatchCore's locally aware CNN patch features, adapted by one linear layer and
judged by a small discriminator trained against Gaussian-noised copies of the normal features. No memory
bank to search: a frame costs its backbone plus two small matrix products per patch.

Training is seeded and sampled (a fixed number of steps of patch batches, whatever the number of fit
images); the weights kept are those of the step with the best image AUROC on held-out fit images against
synthetic anomalies made of them (pipeline.data.synthetic_anomalies, a family the automatic choice's
validation does not use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.common.serialization import pack
from pipeline.data.synthetic_anomalies import synthesize
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.fitting import EarlyStopping, load_module_arrays, module_arrays, seeded_generator, split_indices
from pipeline.experts.patchcore.torch_model import embed_patches, upsample_maps
from pipeline.experts.simplenet.torch_model import SimpleNetModel, truncated_l1
from pipeline.features.backbone import PATCH_STAGES, Backbone, FeatureBatch


@dataclass(frozen=True)
class SimpleNetConfig:
    hidden: int = 1024  # the discriminator's width (the paper's)
    noise_std: float = 0.25  # of the anomalous feature generator, in units of each standardised feature
    margin: float = 0.5  # the truncated L1 loss's threshold (the paper's)
    steps_per_round: int = 100  # steps between judgements on the held-out images
    max_rounds: int = 10
    patience: int = 3  # rounds without a better held-out AUROC before stopping
    patch_batch: int = 2048  # normal patches per step; as many noised ones join them
    learning_rate: float = 2e-4
    adaptor_learning_rate: float = 1e-4
    validation_fraction: float = 0.1  # of the fit images, held out (with synthetic anomalies) for early stopping
    min_validation_images: int = 2
    map_sigma: float = model_setting("map_sigma")
    seed: int = model_setting("seed")


TIE_SCALE = 100.0  # held-out AUROC outweighs any training loss (which is at most 2 * (1 + margin))


class SimpleNet(Expert):
    name = "simplenet"
    config_type = SimpleNetConfig

    def __init__(self, config: SimpleNetConfig = SimpleNetConfig()):
        self.config = config
        self.net: SimpleNetModel | None = None
        self.dim: int | None = None
        self.summary: dict = {}

    def _build(self, dim: int) -> SimpleNetModel:
        self.dim = int(dim)
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(self.config.seed)
            return SimpleNetModel(self.dim, self.config.hidden)

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone) -> None:
        if backbone is None:
            raise ValueError("SimpleNet.fit needs the backbone, to embed its held-out synthetic anomalies")
        cfg = self.config
        with torch.inference_mode(False), torch.enable_grad():
            grids = torch.cat([embed_patches(b, PATCH_STAGES).float().cpu() for b in batches]).clone()  # N x h x w x D
            train_idx, val_idx = split_indices(len(grids), cfg)
            train = grids[train_idx].flatten(0, 2)
            held = self._held_out(batches, val_idx, backbone, grids)
            net = self._build(train.shape[1])
            net.adaptor.mean.copy_(train.mean(dim=0))
            net.adaptor.std.copy_(train.std(dim=0).clamp_min(1e-6))
            optimizer = torch.optim.Adam([
                {"params": net.adaptor.parameters(), "lr": cfg.adaptor_learning_rate},
                {"params": net.discriminator.parameters(), "lr": cfg.learning_rate},
            ])
            sampler = seeded_generator(cfg.seed, 1)
            stopping = EarlyStopping(cfg.patience)
            history = []
            for round_ in range(cfg.max_rounds):
                net.train()
                loss = sum(self._step(net, optimizer, train, sampler) for _ in range(cfg.steps_per_round))
                auroc = self._held_out_auroc(net, held) if held is not None else float("nan")
                history.append({"train_loss": loss / cfg.steps_per_round, "validation_auroc": auroc})
                # held-out AUROC saturates on easy products: ties go to the round with the lower training loss
                monitored = history[-1]["train_loss"] + (TIE_SCALE * (1.0 - auroc) if held is not None else 0.0)
                if stopping.should_stop(round_, monitored, net):
                    break
            stopping.restore_best(net)
        self.net = net.eval()
        self.summary = {**stopping.summary(len(history), len(grids), len(val_idx)),
                        "steps_per_round": cfg.steps_per_round, "history": history}

    def _step(self, net: SimpleNetModel, optimizer: torch.optim.Optimizer, train: torch.Tensor,
              sampler: torch.Generator) -> float:
        cfg = self.config
        rows = torch.randint(len(train), (cfg.patch_batch,), generator=sampler)
        adapted = net.adaptor(train[rows])
        noised = adapted + cfg.noise_std * torch.randn(adapted.shape, generator=sampler)
        normality = net.discriminator(torch.cat([adapted, noised]))
        loss = truncated_l1(normality[: cfg.patch_batch], normality[cfg.patch_batch :], cfg.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _held_out(self, batches: Sequence[FeatureBatch], val_idx: list[int], backbone: Backbone,
                  grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Held-out normal patch grids and those of synthetic anomalies made of the same images."""
        if not val_idx:
            return None
        pixels = torch.cat([b.pixels.detach().cpu() for b in batches])[val_idx].float()
        anomalous, _ = synthesize(pixels, seeded_generator(self.config.seed, 2))
        synthetic = embed_patches(backbone(anomalous, keys=False), PATCH_STAGES).float().cpu().clone()
        return grids[val_idx], synthetic

    def _held_out_auroc(self, net: SimpleNetModel, held: tuple[torch.Tensor, torch.Tensor]) -> float:
        net.eval()
        with torch.no_grad():
            normal, anomalous = (net(g.flatten(0, 2)).view(len(g), -1).amax(dim=1) for g in held)
        diff = anomalous[:, None] - normal[None, :]
        return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())

    # --------------------------------------------------------------------------------- inference
    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self.net is None:
            raise RuntimeError("SimpleNet.predict before fit/from_bytes")
        with torch.no_grad():
            grid = embed_patches(batch, PATCH_STAGES).float().cpu()
            b, h, w, d = grid.shape
            patch_scores = self.net(grid.reshape(-1, d)).view(b, h, w)
            valid = batch.valid_grid((h, w))  # letterbox padding is not the product
            scores = patch_scores.masked_fill(~valid, float("-inf")).flatten(1).amax(dim=1)
            maps = upsample_maps(patch_scores, batch.image_hw, self.config.map_sigma)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    def fit_summary(self) -> dict:
        return dict(self.summary)

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.net is None:
            raise RuntimeError("SimpleNet.to_bytes before fit")
        meta = {"expert": self.name, "config": asdict(self.config), "dim": self.dim, "summary": self.summary}
        return pack(meta, module_arrays(self.net))

    @classmethod
    def from_bytes(cls, data: bytes) -> "SimpleNet":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(SimpleNetConfig, meta["config"]))
        expert.net = load_module_arrays(expert._build(meta["dim"]), arrays)
        expert.summary = meta.get("summary", {})
        return expert
