"""Automatic expert choice for a new category, from normal images and synthetic anomalies only.

Every candidate is fitted on the fit split; each is then scored on the held-out normal images and on
synthetic anomalies made from those same images (pipeline.data.synthetic_anomalies), by the mean of image
AUROC and pixel AUROC. Real anomalies are never seen. The table of results travels with the task's
metadata and the training events, so an operator can see why an expert was chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.data.metrics import pixel_metrics, roc_auc
from pipeline.experts import Expert, build_expert
from pipeline.data.synthetic_anomalies import synthesize
from schemas.config import ModelConfig


@dataclass(frozen=True)
class CandidateResult:
    expert: str
    image_auroc: float
    pixel_auroc: float
    fit_seconds: float

    @property
    def score(self) -> float:
        return (self.image_auroc + self.pixel_auroc) / 2

    def as_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


@dataclass
class ValidationSet:
    normal: list[FeatureBatch]
    anomalous: list[FeatureBatch]
    masks: list[np.ndarray]  # one S x S bool mask per anomalous image


def make_validation_set(backbone: Backbone, normal: list[FeatureBatch], seed: int) -> ValidationSet:
    generator = torch.Generator().manual_seed(seed)
    anomalous, masks = [], []
    for batch in normal:
        pixels, batch_masks = synthesize(batch.pixels.cpu(), generator)
        anomalous.append(backbone(pixels, keys=False))
        masks.extend(m.numpy() for m in batch_masks)
    return ValidationSet(normal, anomalous, masks)


def evaluate(expert: Expert, validation: ValidationSet, backbone: Backbone, fit_seconds: float) -> CandidateResult:
    normal = [expert.predict(b, backbone) for b in validation.normal]
    anomalous = [expert.predict(b, backbone) for b in validation.anomalous]
    scores = np.concatenate([o.scores for o in normal + anomalous])
    labels = [False] * sum(len(o.scores) for o in normal) + [True] * sum(len(o.scores) for o in anomalous)
    maps = [m for o in normal + anomalous for m in o.maps]
    masks = [np.zeros(m.shape, dtype=bool) for o in normal for m in o.maps] + validation.masks
    pixel_auroc = pixel_metrics(masks, maps)["pixel_auroc"]
    return CandidateResult(expert.name, roc_auc(labels, scores), pixel_auroc, fit_seconds)


def choose_expert(
    candidates: Sequence[str],
    fit_batches: list[FeatureBatch],
    validation: ValidationSet,
    backbone: Backbone,
    model: ModelConfig,
    on_result: Callable[[CandidateResult], None] = lambda result: None,
) -> tuple[Expert, list[CandidateResult]]:
    """Fit every candidate; return the best fitted expert and every candidate's result (in order).
    Ties go to the earlier candidate."""
    best, results = None, []
    for name in candidates:
        expert = build_expert(name, model)
        started = time.perf_counter()
        expert.fit(fit_batches, backbone)
        result = evaluate(expert, validation, backbone, time.perf_counter() - started)
        on_result(result)
        results.append(result)
        if best is None or result.score > best[1].score:
            best = (expert, result)
    return best[0], results
