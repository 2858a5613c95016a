"""PANDA as an Expert: the late CNN blocks adapted to the category (compactness loss + EWC) on a private
copy, early stopping on held-out normal images and synthetic anomalies made of them, DN2 image scores,
SPADE pixel maps, state as bytes.

What fit does, in order (all seeded; the caller's global RNG is left alone):
1. Split the fit images (pipeline.experts.fitting.split_indices): a training split, and a held-out split
   used only by early stopping. Synthetic anomalies (pipeline.data.synthetic_anomalies) of the held-out
   images are embedded with the shared backbone. Nothing else is ever looked at: no test image, no
   real anomaly.
2. Private copy of the network: the blocks after stage 2 come from the shared backbone (whose weights stay
   bit-identical: it is never trained, only copied), the conv head and ImageNet classifier from the
   registry checkpoint of the same CNN (the features_only backbone has no head).
3. EWC Fisher: the diagonal Fisher of the pretrained ImageNet classifier's predictive distribution on up
   to `fisher_images` training-split images, labels sampled from the model's own predictions
   (torch_model.diagonal_fisher). Why this one: the fit images are all the data there is, they carry no
   ImageNet labels (so the empirical Fisher is not available, and the true Fisher is the principled one),
   and it measures what catastrophic collapse destroys: the pretrained network's ability to tell images
   apart. With it, 1/2 sum F (theta - theta*)^2 approximates, in nats, the mean KL divergence between
   the pretrained and the adapted classifier's predictions on the category's own images.
4. Train the objective  compactness / compactness at the pretrained weights + ewc_lambda * EWC penalty:
   the compactness term starts at 1, so ewc_lambda weighs "fraction of the spread removed" against "nats
   of ImageNet predictions lost", whatever the CNN, image size or category. Proximal SGD on base x that
   objective (= raw compactness + ewc_lambda * base * EWC): an SGD-with-momentum step on the raw
   compactness, then EWC's proximal step, theta <- theta* + (theta - theta*) / (1 + lr ewc_lambda base F),
   the exact minimiser of the quadratic penalty plus the distance to the stepped weights. Two measured
   reasons: the learning rate is in the units of the raw features, where the curvature that limits the
   step is the network's and not the category's (steps on the relative objective blew up on uniform
   textures, whose small spread divides the loss); and an explicit gradient step on the penalty diverges
   once lr * ewc_lambda * base * max F > 2 (it did at ewc_lambda = 1000), its proximal step never does.
   Both have the same fixed points. BatchNorm stays in inference mode (pretrained statistics; the
   batches are small).
5. Early stopping: after every epoch (and once before the first: epoch 0 = the pretrained network), the
   image AUROC of the held-out normal images against `anomalies_per_image` synthetic anomalies of each,
   all scored by DN2 kNN against the training split's current adapted global features; equal AUROCs
   (it saturates at 1) are told apart by how many times farther the anomalies lie
   (torch_model.validation_loss). The best epoch's weights are kept (exact ties keep the earlier, less
   adapted one), so adaptation that does not help on held-out data is undone; with no held-out images,
   the training objective is watched.
6. Gallery: the kept network's global features of all fit images (DN2, k = num_neighbors) and its stage-3
   maps of a farthest-point subset of them (SPADE), as many as fit in `max_state_mb`.

Stored state (~20 MB for 120 images of 224 x 544 on Lite0, `max_state_mb`): the adapted network's
convolution kernels as float16 (its 1-d parameters, BatchNorm scales and shifts, and buffers as float32,
integer buffers as int64: torch_model.half_stored), the gallery's global features as float32, its maps as
float16. The fitted network's kernels and the maps are rounded to float16 in memory before the gallery
is computed / kept, so a loaded expert predicts bit for bit what the fitted one did, and to_bytes stays
deterministic. (The rounding moves the global features by ~2% of their spread, gallery and queries
alike.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import timm
import torch

from pipeline.common.sampling import farthest_point_sampling
from pipeline.common.serialization import pack
from pipeline.data.synthetic_anomalies import synthesize
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.fitting import EarlyStopping, FitReport, load_module_arrays, module_arrays, seeded_generator, split_indices
from pipeline.experts.panda.torch_model import (
    START_STAGE,
    ImageNetClassifier,
    PANDANet,
    auroc,
    build_networks,
    compactness_loss,
    diagonal_fisher,
    ewc_penalty,
    half_stored,
    knn_scores,
    log_separation,
    round_to_half,
    spade_maps,
    validation_loss,
)
from pipeline.experts.patchcore.torch_model import upsample_maps
from pipeline.experts.reverse_distillation.expert import flush_denormals
from pipeline.features.backbone import CNNS, Backbone, FeatureBatch, _timm_state_dict

_NET = "net."  # prefix of the network's arrays in the packed state
_HEADER_ALLOWANCE = 256 * 1024  # bytes kept free in max_state_mb for the JSON header and small arrays


@dataclass(frozen=True)
class PANDAConfig:
    # Adaptation. Cost: ~12 s an epoch for 100 images of 224 x 544 on one core, so few epochs; the features
    # only need to move a little (EWC and early stopping watch that they do not move too far).
    max_epochs: int = 3
    patience: int = 1  # epochs without a better held-out loss before stopping
    # SGD on the raw compactness (squared distances of 1280-d features). Measured on EfficientNet-Lite0 at
    # 128 x 128 and 224 x 544 alike: one plain step (no EWC, no momentum) helps up to lr ~2e-6 and hurts
    # from ~5e-6 on (the loss doubles at 5e-5). With momentum 0.9 and EWC's proximal step, 3 epochs on 102
    # images of 224 x 544 were stable at 1e-6 and 2e-6 (compactness 0.87 and 0.79, held-out separation
    # rising); 1e-6 keeps a factor of two from the largest one seen stable.
    learning_rate: float = 1e-6
    momentum: float = 0.9
    batch_size: int = 16
    # Weight of EWC's penalty (nats of mean KL, see the module doc) against the relative compactness: at
    # 1000, losing 1e-3 nats costs as much as the whole pretrained spread. Measured at 10x the default lr
    # (128 px, 3 epochs): on brick, without EWC the held-out AUROC dropped from epoch 2 on (KL ~5e-4) and
    # at 1e5 it did not (KL < 1e-4); on grass, 1e5 left the least adaptation and the lowest test AUROC.
    # 1000 sits between; early stopping undoes what still goes too far.
    ewc_lambda: float = 1000.0
    fisher_images: int = 32  # training-split images the Fisher is estimated on (one backward pass each)
    # Scoring.
    num_neighbors: int = 2  # DN2's k: image score = mean distance to the k nearest fit images' global features
    map_neighbors: int = 10  # SPADE's K: nearest fit images (by global feature) whose maps a test map is matched to
    map_sigma: float = model_setting("map_sigma")  # Gaussian smoothing of the upsampled map (pixels)
    max_state_mb: float = 20.0  # cap on the stored state: the SPADE map gallery keeps what the weights leave
    # Held-out split for early stopping (pipeline.experts.fitting.split_indices).
    validation_fraction: float = 0.15
    min_validation_images: int = 2
    anomalies_per_image: int = 2  # synthetic anomalies made of each held-out image (more pairs for the AUROC)
    seed: int = model_setting("seed")

    def __post_init__(self) -> None:
        if self.max_epochs < 0 or self.batch_size < 1 or self.patience < 0:
            raise ValueError(f"max_epochs and patience must be >= 0, batch_size >= 1: {self}")
        if min(self.num_neighbors, self.map_neighbors, self.fisher_images, self.anomalies_per_image) < 1:
            raise ValueError(f"num_neighbors, map_neighbors, fisher_images, anomalies_per_image must be >= 1: {self}")
        if self.ewc_lambda < 0 or self.learning_rate <= 0 or self.max_state_mb <= 0:
            raise ValueError(f"ewc_lambda must be >= 0, learning_rate and max_state_mb > 0: {self}")


class PANDA(Expert):
    name = "panda"
    config_type = PANDAConfig
    square_inputs = False

    def __init__(self, config: PANDAConfig = PANDAConfig()):
        self.config = config
        self.net: PANDANet | None = None
        self.timm_name: str | None = None
        self.gallery_globals: torch.Tensor | None = None  # N x D, every fit image
        self.map_images: torch.Tensor | None = None  # M indices into the gallery: the images with stored maps
        self.gallery_maps: torch.Tensor | None = None  # M x L x C (float16 values, held as float32)
        self.summary: dict = {}  # stored with the state
        self.fit_report: FitReport | None = None  # only after fit, not stored

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone) -> None:
        if backbone is None:
            raise ValueError("PANDA.fit needs the backbone: it copies its blocks and embeds synthetic anomalies")
        if not batches:
            raise ValueError("PANDA.fit needs at least one batch of normal images")
        cfg = self.config
        device = backbone.device
        with torch.inference_mode(False), torch.enable_grad(), flush_denormals(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            # the batches were made under inference mode: clone so autograd may use them
            stage2 = torch.cat([b.stages[START_STAGE] for b in batches]).float().to(device).clone()
            n = stage2.shape[0]
            train_idx, val_idx = split_indices(n, cfg)
            train_t = torch.tensor(train_idx, dtype=torch.long, device=device)
            net, classifier = self._private_copy(backbone)
            net.to(device).requires_grad_(True)
            anchor = {k: p.detach().clone() for k, p in net.named_parameters()}

            fisher = None
            if cfg.ewc_lambda > 0 and cfg.max_epochs > 0:
                g = seeded_generator(cfg.seed, 1)
                pick = torch.randperm(len(train_idx), generator=g)[: cfg.fisher_images].sort().values
                images = stage2[train_t[pick.to(device)]]
                fisher = diagonal_fisher(ImageNetClassifier(net, classifier.to(device)), images, g)
            del classifier

            val_normal = stage2[torch.tensor(val_idx, dtype=torch.long, device=device)]
            val_anomalous = self._synthetic_stage2(backbone, batches, val_idx * cfg.anomalies_per_image,
                                                   seeded_generator(cfg.seed, 2))  # fmt: skip

            history: list[dict] = []
            stopping = EarlyStopping(cfg.patience)
            train_globals = self._globals(net, stage2[train_t])
            centre = train_globals.mean(dim=0)
            base = float(compactness_loss(train_globals, centre)) or 1.0
            record = self._evaluate(net, train_globals, val_normal, val_anomalous, centre, base, anchor, fisher)
            history.append({"epoch": 0, "train_loss": None, **record})
            stopping.should_stop(0, self._monitored(record), net)

            optimizer = torch.optim.SGD(net.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
            # EWC's proximal step: the exact minimiser of lr * ewc_lambda * base * EWC + 1/2 ||theta - theta'||^2
            # after each gradient step theta' on the compactness (see the module doc)
            shrink = None if fisher is None else {
                k: 1.0 / (1.0 + cfg.learning_rate * cfg.ewc_lambda * base * f) for k, f in fisher.items()}  # fmt: skip
            order_gen = seeded_generator(cfg.seed, 3)
            for epoch in range(1, cfg.max_epochs + 1):
                order = train_t[torch.randperm(len(train_idx), generator=order_gen).to(device)]
                total = 0.0
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    loss = compactness_loss(net(stage2[idx])[1], centre)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    objective = float(loss.detach()) / base
                    with torch.no_grad():
                        if fisher is not None:
                            objective += cfg.ewc_lambda * float(ewc_penalty(net.named_parameters(), anchor, fisher))
                        optimizer.step()
                        if shrink is not None:
                            for name, p in net.named_parameters():
                                p.sub_(anchor[name]).mul_(shrink[name]).add_(anchor[name])
                    total += objective * len(idx)
                train_loss = total / len(order)
                record = self._evaluate(net, self._globals(net, stage2[train_t]), val_normal, val_anomalous, centre,
                                        base, anchor, fisher)  # fmt: skip
                history.append({"epoch": epoch, "train_loss": train_loss, **record})
                if stopping.should_stop(epoch, self._monitored(record), net):
                    break
            stopping.restore_best(net)
            del optimizer, anchor, fisher, val_normal, val_anomalous
            net = net.cpu().eval().requires_grad_(False)
            round_to_half(net)
            self._build_gallery(net, stage2)
        self.net = net
        self.timm_name = CNNS[backbone.cnn_name][0]
        best = history[stopping.best_epoch] if 0 <= stopping.best_epoch < len(history) else {}
        self.summary = {
            **stopping.summary(len(history) - 1, n, len(val_idx)),
            "best_validation_auroc": best.get("validation_auroc"),
            "pretrained_validation_auroc": history[0]["validation_auroc"],
            "weight_shift": best.get("weight_shift"),
            "ewc_kl": best.get("ewc_kl"),
            "map_images": int(self.map_images.numel()),
        }
        self.fit_report = FitReport(n, train_idx, val_idx, stopping.best_epoch, history)

    def _private_copy(self, backbone: Backbone) -> tuple[PANDANet, torch.nn.Linear]:
        """PANDANet + classifier on weights of their own: the registry checkpoint's (ImageNet, classifier
        included), with every tensor the shared backbone has replaced by the backbone's own (identical
        for the pretrained backbone; a random-weights control adapts its random blocks). The backbone's
        tensors are copied (load_state_dict), never referenced."""
        timm_name = CNNS[backbone.cnn_name][0]
        full_state = _timm_state_dict(timm.create_model(timm_name, pretrained=False), backbone.cnn_name)
        shared = backbone.net.state_dict()
        full_state = {k: shared[k].detach().cpu() if k in shared else v for k, v in full_state.items()}
        return build_networks(timm_name, full_state)

    def _synthetic_stage2(self, backbone: Backbone, batches: Sequence[FeatureBatch], rows: list[int],
                          generator: torch.Generator) -> torch.Tensor:
        """Stage-2 features of synthetic anomalies of the fit images `rows` (their pixels only)."""
        if not rows:
            return torch.empty(0)
        pixels = torch.cat([b.pixels.detach().cpu() for b in batches]).float()[torch.tensor(rows)]
        chunks = []
        for start in range(0, len(pixels), self.config.batch_size):
            anomalous, _ = synthesize(pixels[start : start + self.config.batch_size], generator)
            chunks.append(backbone(anomalous, keys=False).stages[START_STAGE].float().clone())
        return torch.cat(chunks)

    def _forward(self, net: PANDANet, stage2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps, globals) of many images, in chunks, without gradients."""
        maps, globals_ = [], []
        with torch.no_grad():
            for start in range(0, len(stage2), 2 * self.config.batch_size):
                m, g = net(stage2[start : start + 2 * self.config.batch_size])
                maps.append(m)
                globals_.append(g)
        return torch.cat(maps), torch.cat(globals_)

    def _globals(self, net: PANDANet, stage2: torch.Tensor) -> torch.Tensor:
        return self._forward(net, stage2)[1]

    def _evaluate(self, net: PANDANet, train_globals: torch.Tensor, val_normal: torch.Tensor,
                  val_anomalous: torch.Tensor, centre: torch.Tensor, base: float,
                  anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor] | None) -> dict:
        """Held-out AUROC (normal vs synthetic, DN2 against the training split), compactness of the training
        split relative to the pretrained one, EWC's KL estimate and the relative weight change."""
        record = {"compactness": float(compactness_loss(train_globals, centre)) / base,
                  "validation_auroc": None, "validation_separation": None, "validation_loss": None}  # fmt: skip
        if len(val_normal):
            k = self.config.num_neighbors
            normal = knn_scores(self._globals(net, val_normal), train_globals, k)
            anomalous = knn_scores(self._globals(net, val_anomalous), train_globals, k)
            record["validation_auroc"] = auroc(normal, anomalous)
            record["validation_separation"] = log_separation(normal, anomalous)
            record["validation_loss"] = validation_loss(normal, anomalous)
        with torch.no_grad():
            params = list(net.named_parameters())
            shift = sum(float((p - anchor[name]).pow(2).sum()) for name, p in params)
            scale = sum(float(anchor[name].pow(2).sum()) for name, _ in params)
            record["weight_shift"] = math.sqrt(shift / scale) if scale > 0 else 0.0
            record["ewc_kl"] = float(ewc_penalty(params, anchor, fisher)) if fisher is not None else None
        return record

    def _monitored(self, record: dict) -> float:
        """The held-out loss (torch_model.validation_loss); with nothing held out, the training objective
        (relative compactness + ewc_lambda * EWC) after the epoch."""
        loss = record["validation_loss"]
        if loss is None:
            loss = record["compactness"] + self.config.ewc_lambda * (record["ewc_kl"] or 0.0)
        return math.inf if math.isnan(loss) else loss

    def _build_gallery(self, net: PANDANet, stage2: torch.Tensor) -> None:
        """Global features of every fit image; stage-3 maps of as many as `max_state_mb` leaves room for,
        chosen by farthest-point sampling of the global features (the most varied ones)."""
        maps, globals_ = self._forward(net, stage2.cpu())
        maps = maps.flatten(2).transpose(1, 2).half().float().contiguous()  # N x L x C, float16 values
        n, locations, channels = maps.shape
        weight_bytes = sum(a.nbytes for a in self._net_arrays(net).values())
        budget = self.config.max_state_mb * 1e6 - weight_bytes - globals_.numel() * 4 - _HEADER_ALLOWANCE
        fits = int(budget // (locations * channels * 2 + 8))
        m = min(n, max(fits, self.config.map_neighbors))
        chosen = torch.arange(n) if m >= n else farthest_point_sampling(globals_, m, self.config.seed).sort().values
        self.gallery_globals = globals_.contiguous()
        self.map_images = chosen.long()
        self.gallery_maps = maps[chosen].contiguous()

    # --------------------------------------------------------------------------------- inference
    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self.net is None:
            raise RuntimeError("PANDA.predict before fit/from_bytes")
        cfg = self.config
        self.net.eval()
        with torch.no_grad():
            maps, globals_ = self.net(batch.stages[START_STAGE].float().cpu())
            scores = knn_scores(globals_, self.gallery_globals, cfg.num_neighbors)
            patch = spade_maps(maps, globals_, self.gallery_globals[self.map_images], self.gallery_maps,
                               cfg.map_neighbors)  # fmt: skip
            pixel_maps = upsample_maps(patch, batch.image_hw, cfg.map_sigma)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=pixel_maps.numpy().astype(np.float32))

    def fit_summary(self) -> dict:
        return dict(self.summary)

    # ----------------------------------------------------------------------------------- storage
    @staticmethod
    def _net_arrays(net: PANDANet) -> dict[str, np.ndarray]:
        """Kernels as float16 (they hold float16 values after fit), the rest as module_arrays gives it."""
        half = {name for name, p in net.named_parameters() if half_stored(name, p)}
        return {_NET + k: (v.astype(np.float16) if k in half else v) for k, v in module_arrays(net).items()}

    def to_bytes(self) -> bytes:
        if self.net is None:
            raise RuntimeError("PANDA.to_bytes before fit")
        meta = {"expert": self.name, "config": asdict(self.config), "timm_name": self.timm_name,
                "summary": self.summary}  # fmt: skip
        arrays = {
            **self._net_arrays(self.net),
            "gallery_globals": self.gallery_globals.numpy().astype(np.float32),
            "map_images": self.map_images.numpy().astype(np.int64),
            "gallery_maps": self.gallery_maps.numpy().astype(np.float16),
        }
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PANDA":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(PANDAConfig, meta["config"]))
        expert.timm_name = meta["timm_name"]
        net, _ = build_networks(expert.timm_name)
        net_arrays = {k[len(_NET) :]: v.astype(np.float32) if v.dtype == np.float16 else v
                      for k, v in arrays.items() if k.startswith(_NET)}  # fmt: skip
        expert.net = load_module_arrays(net, net_arrays).requires_grad_(False)
        expert.gallery_globals = torch.from_numpy(arrays["gallery_globals"].astype(np.float32))
        expert.map_images = torch.from_numpy(arrays["map_images"].astype(np.int64))
        expert.gallery_maps = torch.from_numpy(arrays["gallery_maps"].astype(np.float32))
        expert.summary = meta.get("summary", {})
        return expert
