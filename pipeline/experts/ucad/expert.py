"""UCAD as an Expert: a per-task prompt for the frozen ViT, trained alone with the structure-based
contrastive loss on Segment-Anything regions, then knowledge = a coreset of prompted patch features,
scored by nearest neighbours (PatchCore's memory bank). State as bytes: prompt + knowledge.

Only the new task's prompt is trainable: the ViT is frozen and shared, other tasks' prompts live in
their own stored state and are never loaded while fitting.

The prompt is kept only where it helps: a seeded hold-out of the fit images and synthetic anomalies made
of them (pipeline.data.synthetic_anomalies; UCAD trains on no anomaly) give a validation signal, the
image AUROC of a nearest-neighbour score against the other fit images' features. It is measured without
any prompt and after every prompt epoch; the best wins (the unprompted ViT on ties), so prompt training
stops early in effect, and a task whose prompt does not beat the plain ViT keeps unprompted knowledge
(its stored prompt has zero tokens). The ablation is in the fit summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.experts.base import Expert, ExpertOutput, config_from_dict, model_setting
from pipeline.experts.patchcore.memory_bank import MemoryBank
from pipeline.experts.ucad.torch_model import init_prompts, knowledge_features, structure_contrastive_loss
from pipeline.features.segmentation import MaskCache, MaskerConfig, StructureMasker, patch_labels
from pipeline.common.serialization import pack
from pipeline.data.metrics import roc_auc
from pipeline.data.synthetic_anomalies import synthesize
from pipeline.experts.fitting import split_indices
from schemas.spec import VIT_BACKBONE

# Image (H x W x 3 uint8) -> H x W int region labels, 0 = no region. Default: cached MobileSAM masks.
RegionLabeler = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class UCADConfig:
    knowledge_layers: tuple[int, ...] = (5, 7)  # ViT blocks (0-based) whose prompted tokens form the knowledge
    prompt_tokens: int = 4  # prompt tokens per block (deep prompts on blocks 0..max(knowledge_layers))
    prompt_images: int = 8  # training images that get Segment-Anything masks (several seconds each on CPU)
    prompt_epochs: int = 6
    prompt_batch_size: int = 4
    learning_rate: float = 1e-3  # gentle: prompts start from small noise, and larger steps drifted features away
    temperature: float = 0.1
    sam_points_per_side: int = 8  # SAM's default is 32: 16x fewer mask decodes
    # UCAD's own coreset: the line's PatchCore coreset settings (ModelConfig) do not reach it.
    coreset_ratio: float = 0.1
    coreset_projection_dim: int = 64
    max_coreset_size: int = 8000
    num_neighbors: int = model_setting("num_neighbors")
    map_sigma: float = model_setting("map_sigma")
    validation_fraction: float = 0.2  # of the fit images, held out (with synthetic anomalies) to judge the prompt
    min_validation_images: int = 4
    validation_references: int = 16  # fit images whose features the validation score searches
    seed: int = model_setting("seed")

    def __post_init__(self) -> None:
        if not self.knowledge_layers or list(self.knowledge_layers) != sorted(set(self.knowledge_layers)):
            raise ValueError(f"knowledge_layers must be ascending and distinct, got {self.knowledge_layers}")
        if min(self.prompt_tokens, self.prompt_images, self.prompt_batch_size) < 1 or self.prompt_epochs < 0:
            raise ValueError("prompt_tokens, prompt_images and prompt_batch_size must be >= 1, prompt_epochs >= 0")

    @property
    def prompt_layers(self) -> int:
        return max(self.knowledge_layers) + 1


@dataclass
class PromptReport:
    """What prompt training did, for the training events and the benchmark."""

    image_indices: list[int]
    mask_seconds: float
    train_seconds: float
    regions_per_image: list[int]
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    validation_auroc: list[float] = field(default_factory=list)  # [no prompt, after epoch 1, 2, ...]
    kept_epoch: int = 0  # 0: no prompt (the plain ViT was at least as good)


class UCAD(Expert):
    name = "ucad"
    config_type = UCADConfig
    backbones = (VIT_BACKBONE,)
    square_inputs = True  # Segment-Anything's region labels are pooled onto a square token grid

    def __init__(self, config: UCADConfig = UCADConfig(), labeler: RegionLabeler | None = None):
        self.config = config
        self.labeler = labeler  # None: MobileSAM's automatic masks, cached on disk (built on first fit)
        self.prompts: torch.Tensor | None = None  # L x N x D
        self.memory: MemoryBank | None = None
        self.report: PromptReport | None = None

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone | None = None) -> None:
        vit = _vit_of(backbone)
        pixels = torch.cat([backbone.vit_pixels(b.pixels) for b in batches])
        self.prompts, self.report = self._train_prompts(vit, pixels, _PromptJudge(vit, pixels, self.config))
        c = self.config
        with torch.no_grad():
            patches = torch.cat([self._features(backbone, pixels[i : i + 16]).flatten(0, 2) for i in range(0, len(pixels), 16)])
        self.memory = MemoryBank.from_patches(patches, c.coreset_ratio, c.max_coreset_size, c.coreset_projection_dim, c.num_neighbors, c.seed)

    def _train_prompts(self, vit, pixels: torch.Tensor, judge: "_PromptJudge") -> tuple[torch.Tensor, PromptReport]:
        c = self.config
        rng = np.random.default_rng(c.seed)
        # a prefix of one seeded permutation (of the images the judge does not hold out): fewer prompt
        # images reuse the cached masks of more
        chosen = sorted(judge.train_indices[i] for i in rng.permutation(len(judge.train_indices))[: c.prompt_images])
        started = time.perf_counter()
        regions = torch.stack([self._patch_regions(pixels[i], vit.grid) for i in chosen])  # n x P
        mask_seconds = time.perf_counter() - started
        report = PromptReport(chosen, mask_seconds, 0.0, [int(r.unique().gt(0).sum()) for r in regions])

        prompts = init_prompts(vit, pixels[chosen], c.prompt_layers, c.prompt_tokens, c.seed).to(vit.device).requires_grad_(True)
        optimiser = torch.optim.Adam([prompts], lr=c.learning_rate)
        generator = torch.Generator().manual_seed(c.seed)
        contrast_layer = max(c.knowledge_layers)
        train_pixels = pixels[chosen]
        no_prompt = prompts.detach()[:, :0].cpu()
        best, best_auroc = no_prompt, judge.auroc(None)
        report.validation_auroc.append(best_auroc)
        for epoch in range(c.prompt_epochs):
            order = torch.randperm(len(chosen), generator=generator)
            losses = []
            for start in range(0, len(order), c.prompt_batch_size):
                rows = order[start : start + c.prompt_batch_size]
                tokens = vit.patch_tokens(train_pixels[rows], contrast_layer, prompts)
                loss = structure_contrastive_loss(tokens, regions[rows].to(tokens.device), c.temperature)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
            report.losses.append(float(np.mean(losses)))
            auroc = judge.auroc(prompts.detach())
            report.validation_auroc.append(auroc)
            if auroc > best_auroc:
                best, best_auroc, report.kept_epoch = prompts.detach().cpu().clone(), auroc, epoch + 1
        report.train_seconds = time.perf_counter() - started - mask_seconds
        return best, report

    def _patch_regions(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        image = (pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if self.labeler is None:
            self.labeler = default_labeler(self.config.sam_points_per_side)
        return torch.from_numpy(patch_labels(self.labeler(image), grid).reshape(-1).astype(np.int64))

    def fit_summary(self) -> dict:
        if self.report is None:
            return {}
        r = self.report
        return {"prompt_images": len(r.image_indices), "mask_seconds": round(r.mask_seconds, 2),
                "prompt_train_seconds": round(r.train_seconds, 2), "regions_per_image": r.regions_per_image,
                "contrastive_loss_per_epoch": [round(x, 4) for x in r.losses],
                "validation_auroc_no_prompt": round(r.validation_auroc[0], 4),
                "validation_auroc_per_epoch": [round(x, 4) for x in r.validation_auroc[1:]],
                "prompt_kept": r.kept_epoch > 0, "prompt_epoch_kept": r.kept_epoch,
                "knowledge_size": 0 if self.memory is None else len(self.memory)}

    # --------------------------------------------------------------------------------- inference
    def _features(self, backbone: Backbone, vit_pixels: torch.Tensor) -> torch.Tensor:
        vit = backbone.vit
        return knowledge_features(vit, vit_pixels.to(vit.device), self.config.knowledge_layers, self.prompts.to(vit.device))

    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if self.memory is None or self.prompts is None:
            raise RuntimeError("UCAD.predict before fit/from_bytes")
        _vit_of(backbone)
        with torch.no_grad():
            query = self._features(backbone, backbone.vit_pixels(batch.pixels))
        valid = batch.valid_grid(tuple(query.shape[1:3])) if batch.valid is not None else None
        scores, maps = self.memory.score(query, batch.image_hw, self.config.map_sigma, valid)
        return ExpertOutput(scores=scores, maps=maps)

    # ----------------------------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        if self.memory is None or self.prompts is None:
            raise RuntimeError("UCAD.to_bytes before fit")
        meta = {"expert": self.name, "config": asdict(self.config)}
        return pack(meta, {"prompt": self.prompts.numpy().astype(np.float32), "knowledge": self.memory.bank})

    @classmethod
    def from_bytes(cls, data: bytes) -> "UCAD":
        meta, arrays = cls.unpack_state(data)
        expert = cls(config_from_dict(UCADConfig, meta["config"]))
        expert.prompts = torch.from_numpy(arrays["prompt"])
        expert.memory = MemoryBank(arrays["knowledge"], expert.config.num_neighbors)
        return expert


class _PromptJudge:
    """The prompt's validation signal: held-out fit images (normal) and synthetic anomalies of them,
    scored by the largest patch distance to the features of some other fit images, as image AUROC."""

    def __init__(self, vit, pixels: torch.Tensor, config: UCADConfig):
        self.vit, self.config = vit, config
        self.train_indices, held_out = split_indices(len(pixels), config)
        if not held_out:  # too few images to hold any out: judge on the fit images themselves
            held_out = self.train_indices
        normal = pixels[held_out]
        anomalous, _ = synthesize(normal.cpu(), torch.Generator().manual_seed(config.seed))
        self.queries = torch.cat([normal, anomalous.to(normal)])
        self.labels = [False] * len(normal) + [True] * len(anomalous)
        self.references = pixels[self.train_indices[: config.validation_references]]

    def auroc(self, prompts: torch.Tensor | None) -> float:
        prompts = prompts if prompts is not None and prompts.shape[1] else None
        with torch.no_grad():
            bank = self._features(self.references, prompts).flatten(0, 2)
            scores = [torch.cdist(q.flatten(0, 1), bank).amin(dim=1).max().item()
                      for q in self._features(self.queries, prompts)]
        return roc_auc(self.labels, scores)

    def _features(self, pixels: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        vit, layers = self.vit, self.config.knowledge_layers
        prompts = None if prompts is None else prompts.to(vit.device)
        return torch.cat([knowledge_features(vit, pixels[i : i + 16].to(vit.device), layers, prompts).float().cpu()
                          for i in range(0, len(pixels), 16)])


def default_labeler(points_per_side: int) -> RegionLabeler:
    """MobileSAM's automatic masks with few points, cached per image (computed once per training image)."""
    masker = StructureMasker(MaskerConfig(points_per_side=points_per_side))
    cache = MaskCache()
    return lambda image: cache.get_or_compute(image, masker)


def _vit_of(backbone: Backbone | None):
    if backbone is None or backbone.vit is None:
        raise ValueError("UCAD needs the shared backbone with its ViT (Backbone.pretrained())")
    return backbone.vit
