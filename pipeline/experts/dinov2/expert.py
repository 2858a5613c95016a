"""AnomalyDINO (Damm et al., 2024) as an Expert: a memory bank of normalised DINOv2 patch tokens,
cosine nearest neighbours with faiss, the mean of the top 1% patch distances as the image score, and an
optional PCA foreground mask for objects on plain backgrounds. State as bytes: the bank (and the mask's
PCA direction and threshold when masking is used).

Deviation from the paper, on purpose: AnomalyDINO fits the masking PCA on each image alone, test images
included. Here the direction and threshold are fitted once on the normal fit images and stored, so a
defect in a test frame cannot move its own mask, and the decision comes from normal images only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common.neighbours import NearestNeighbours
from pipeline.common.serialization import pack
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.dinov2.torch_model import (
    CENTRE_MIN_FOREGROUND,
    centre_foreground,
    first_principal_component,
    foreground_masks,
    mask_agreement,
    otsu_threshold,
    patch_features,
    projections,
    top_fraction_scores,
)
from pipeline.experts.patchcore.torch_model import greedy_coreset, upsample_maps
from pipeline.features.backbone import VIT_PATCH, Backbone, FeatureBatch
from schemas.spec import VIT_BACKBONE

MASKING_MODES = ("auto", "on", "off")
# masking="auto": mask only when the normal fit images look like one object on a plain background.
# Rule: the fit images' foreground masks (first principal component, Otsu threshold, AnomalyDINO's sign
# rule and morphology) (a) cover between 10% and 90% of the patches on average, and (b) agree with their
# majority mask well beyond chance, mean Cohen's kappa >= 0.5. A texture has no stable object: its first
# component splits each image into patches of one kind or another at random places (kappa near 0), or
# marks almost everything. Objects that move or turn from image to image also fail (b): masking then
# stays off, the safe side (the mask could otherwise cut away part of a displaced object).
AUTO_COVERAGE = (0.10, 0.90)
AUTO_MIN_AGREEMENT = 0.5
AUTO_RULE = (f"mask if the fit images' PCA foreground masks cover {AUTO_COVERAGE[0]:.0%}-{AUTO_COVERAGE[1]:.0%} "
             f"of the patches on average and agree with their majority mask at mean Cohen's kappa >= {AUTO_MIN_AGREEMENT}")
PCA_SAMPLE = 50_000  # fit patches the principal component is computed on (a seeded subset beyond that)


@dataclass(frozen=True)
class DINOv2PatchConfig:
    layers: tuple[int, ...] = (11,)  # ViT blocks (0-based) whose patch tokens are concatenated; 11 = last, the paper's
    final_norm: bool = True  # the ViT's final LayerNorm on each block's tokens, as AnomalyDINO (norm=True)
    max_bank_size: int = 10_000  # greedy coreset above this (10k x 384 float32 = 15 MiB of state)
    coreset_projection_dim: int = 64  # its own (not the line's PatchCore one): only speeds up coreset selection
    top_fraction: float = 0.01  # image score = mean of the largest 1% patch distances (at least one patch)
    map_sigma: float = model_setting("map_sigma")
    masking: str = "auto"  # "auto" | "on" | "off": PCA foreground masking (see AUTO_RULE)
    seed: int = model_setting("seed")

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
            raise ValueError(f"layers must be non-negative, ascending and distinct, got {self.layers}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.max_bank_size < 1 or self.coreset_projection_dim < 1:
            raise ValueError("max_bank_size and coreset_projection_dim must be >= 1")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")


@dataclass(frozen=True)
class Foreground:
    """The stored mask model: patches whose projection on `direction` (about `mean`) exceeds `threshold`."""

    mean: torch.Tensor  # D, float64
    direction: torch.Tensor  # D, float64, object side positive
    threshold: float

    def masks(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """B x P x D -> B x P patches that count; a frame whose mask is empty is scored whole (it looks
        like none of the fit images, so its mask means nothing and must not hide it behind zeros)."""
        masks = foreground_masks(features, grid, self.mean, self.direction, self.threshold).flatten(1)
        return masks | ~masks.any(dim=1, keepdim=True)


class DINOv2Patch(Expert):
    name = "dinov2"
    config_type = DINOv2PatchConfig
    backbones = (VIT_BACKBONE,)
    square_inputs = False

    def __init__(self, config: DINOv2PatchConfig = DINOv2PatchConfig()):
        self.config = config
        self.bank: np.ndarray | None = None  # M x D float32, unit rows
        self.foreground: Foreground | None = None
        self.summary: dict = {}
        self._index: NearestNeighbours | None = None

    # ----------------------------------------------------------------------------------- features
    def _features(self, batch: FeatureBatch, backbone: Backbone | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """B x P x D unit features on the CPU and the token grid of a batch. The caller's tokens are used
        when every configured block is there on this batch's grid; otherwise the ViT runs here."""
        h, w = batch.image_hw
        grid = (max(1, h // VIT_PATCH), max(1, w // VIT_PATCH))  # Backbone.vit_pixels' rounding
        layers = self.config.layers
        tokens = batch.tokens
        shared = all(layer in tokens and tokens[layer].shape[1] == grid[0] * grid[1] for layer in layers)
        vit = None if shared and not self.config.final_norm else _vit_of(backbone)
        with torch.no_grad():
            if not shared:
                tokens = vit.multi_layer_tokens(backbone.vit_pixels(batch.pixels), layers)
            features = patch_features(tokens, layers, vit.net.norm if self.config.final_norm else None)
        return features.float().cpu(), grid

    # ------------------------------------------------------------------------------------ fitting
    def vit_layers(self) -> tuple[int, ...]:
        return tuple(self.config.layers)

    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone | None = None) -> None:
        if backbone is not None and backbone.vit is not None and max(self.config.layers) >= backbone.vit.num_layers:
            raise ValueError(f"layers {self.config.layers} beyond the ViT's {backbone.vit.num_layers} blocks")
        embedded = [self._features(b, backbone) for b in batches]
        if not embedded:
            raise ValueError("DINOv2Patch.fit needs at least one batch")
        self.foreground, masking = self._fit_masking(embedded)
        if self.foreground is None:
            patches = torch.cat([f.flatten(0, 1) for f, _ in embedded])
        else:
            patches = torch.cat([f[self.foreground.masks(f, grid)] for f, grid in embedded])
        n_fit = sum(f.shape[0] * f.shape[1] for f, _ in embedded)
        c = self.config
        if len(patches) > c.max_bank_size:
            patches = patches[greedy_coreset(patches, c.max_bank_size, c.coreset_projection_dim, c.seed)]
        self._set_bank(patches.numpy())
        self.summary = {"fit_images": sum(f.shape[0] for f, _ in embedded), "fit_patches": n_fit,
                        "bank_size": len(self.bank), "layers": list(c.layers), "final_norm": c.final_norm,
                        "masking": masking}

    def _fit_masking(self, embedded: list[tuple[torch.Tensor, tuple[int, int]]]) -> tuple[Foreground | None, dict]:
        """AnomalyDINO's PCA mask from the fit images, and whether to use it (config.masking)."""
        mode = self.config.masking
        if mode == "off":
            return None, {"mode": mode, "used": False}
        flat = torch.cat([f.flatten(0, 1) for f, _ in embedded])
        sample = flat
        if len(flat) > PCA_SAMPLE:
            generator = torch.Generator().manual_seed(self.config.seed)
            sample = flat[torch.randperm(len(flat), generator=generator)[:PCA_SAMPLE].sort().values]
        mean, direction = first_principal_component(sample)
        threshold, separability = otsu_threshold(projections(flat, mean, direction))
        # the sign: the object side is the one covering the centre crop (the paper's rule, on raw masks)
        raw = [(projections(f, mean, direction) > threshold).view(f.shape[0], *grid) for f, grid in embedded]
        n_images = sum(m.shape[0] for m in raw)
        centre = sum(centre_foreground(m) * m.shape[0] for m in raw) / n_images
        flipped = centre <= CENTRE_MIN_FOREGROUND
        if flipped:
            direction, threshold = -direction, -threshold
        foreground = Foreground(mean, direction, threshold)
        masks = [foreground_masks(f, grid, mean, direction, threshold) for f, grid in embedded]
        coverage = torch.cat([m.flatten(1).float().mean(dim=1) for m in masks])
        first_grid = masks[0].shape[-2:]
        common = torch.cat([m if m.shape[-2:] == first_grid else
                            F.interpolate(m[:, None].float(), size=tuple(first_grid), mode="nearest")[:, 0] > 0.5
                            for m in masks])
        agreement = float(mask_agreement(common).mean())
        coverage_mean = float(coverage.mean())
        passes = AUTO_COVERAGE[0] <= coverage_mean <= AUTO_COVERAGE[1] and agreement >= AUTO_MIN_AGREEMENT
        used = mode == "on" or passes
        report = {"mode": mode, "used": used, "rule": AUTO_RULE, "rule_passed": passes,
                  "coverage_mean": round(coverage_mean, 4), "coverage_min": round(float(coverage.min()), 4),
                  "coverage_max": round(float(coverage.max()), 4), "agreement_kappa": round(agreement, 4),
                  "otsu_separability": round(separability, 4), "sign_flipped": flipped}
        return (foreground if used else None), report

    def fit_summary(self) -> dict:
        return dict(self.summary)

    # --------------------------------------------------------------------------------- inference
    def _set_bank(self, bank: np.ndarray) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self._index = NearestNeighbours(self.bank, "ip")

    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self._index is None:
            raise RuntimeError("DINOv2Patch.predict before fit/from_bytes")
        features, grid = self._features(batch, backbone)
        b, p, d = features.shape
        similarity, _ = self._index.search(features.reshape(b * p, d), 1)
        distances = (1.0 - similarity[:, 0].cpu().view(b, p)).clamp_min(0.0)  # cosine distance
        valid = batch.valid_grid(grid).reshape(b, p)  # letterbox padding is not the product
        if self.foreground is not None:
            valid = valid & self.foreground.masks(features, grid)
            distances = distances.masked_fill(~valid, 0.0)
        scores = top_fraction_scores(distances, valid, self.config.top_fraction)
        maps = upsample_maps(distances.view(b, *grid), batch.image_hw, self.config.map_sigma)
        return ExpertOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.bank is None:
            raise RuntimeError("DINOv2Patch.to_bytes before fit")
        arrays = {"bank": self.bank}
        if self.foreground is not None:
            arrays["mask_mean"] = self.foreground.mean.numpy().astype(np.float64)
            arrays["mask_direction"] = self.foreground.direction.numpy().astype(np.float64)
            arrays["mask_threshold"] = np.array(self.foreground.threshold, dtype=np.float64)
        meta = {"expert": self.name, "config": asdict(self.config), "masking_used": self.foreground is not None,
                "fit": self.summary}
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DINOv2Patch":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(DINOv2PatchConfig, meta["config"]))
        expert._set_bank(arrays["bank"])
        if meta.get("masking_used"):
            expert.foreground = Foreground(torch.from_numpy(arrays["mask_mean"]), torch.from_numpy(arrays["mask_direction"]),
                                           float(arrays["mask_threshold"]))
        expert.summary = meta.get("fit", {})
        return expert


def _vit_of(backbone: Backbone | None):
    if backbone is None or backbone.vit is None:
        raise ValueError("DINOv2Patch needs the shared backbone with its ViT (Backbone.pretrained())")
    return backbone.vit
