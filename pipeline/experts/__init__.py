"""Anomaly experts: one folder per model, the torch model apart from its fitting logic."""

from __future__ import annotations

from pipeline.experts.base import Expert, ExpertOutput
from pipeline.experts.dinov2 import DINOv2Patch, DINOv2PatchConfig
from pipeline.experts.fcdd import FCDD, FCDDConfig
from pipeline.experts.panda import PANDA, PANDAConfig
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.experts.reverse_distillation import ReverseDistillation, ReverseDistillationConfig
from pipeline.experts.simplenet import SimpleNet, SimpleNetConfig
from pipeline.experts.ucad import UCAD, UCADConfig
from schemas.config import ModelConfig

# Order = preference on ties in the automatic choice.
EXPERT_TYPES: dict[str, type[Expert]] = {
    PatchCore.name: PatchCore,
    ReverseDistillation.name: ReverseDistillation,
    FCDD.name: FCDD,
    UCAD.name: UCAD,
    DINOv2Patch.name: DINOv2Patch,
    PANDA.name: PANDA,
    SimpleNet.name: SimpleNet,
}


def build_expert(name: str, config: ModelConfig) -> Expert:
    """An unfitted expert of the given name, configured from the model config."""
    if name == PatchCore.name:
        return PatchCore(
            PatchCoreConfig(
                coreset_ratio=config.coreset_ratio,
                projection_dim=config.coreset_projection_dim,
                max_coreset_size=config.max_coreset_size,
                num_neighbors=config.num_neighbors,
                map_sigma=config.map_sigma,
                seed=config.seed,
            )
        )
    if name == ReverseDistillation.name:
        return ReverseDistillation(ReverseDistillationConfig(map_sigma=config.map_sigma, seed=config.seed))
    if name == FCDD.name:
        return FCDD(FCDDConfig(seed=config.seed))
    if name == UCAD.name:
        return UCAD(UCADConfig(num_neighbors=config.num_neighbors, map_sigma=config.map_sigma, seed=config.seed))
    if name == PANDA.name:  # DN2's k (2) is not PatchCore's re-weighting b: it keeps its own default
        return PANDA(PANDAConfig(map_sigma=config.map_sigma, seed=config.seed))
    if name == SimpleNet.name:
        return SimpleNet(SimpleNetConfig(map_sigma=config.map_sigma, seed=config.seed))
    if name == DINOv2Patch.name:
        return DINOv2Patch(DINOv2PatchConfig(map_sigma=config.map_sigma, seed=config.seed))
    raise ValueError(f"unknown expert {name!r}; known: {sorted(EXPERT_TYPES)}")


def load_expert(name: str, state: bytes) -> Expert:
    if name not in EXPERT_TYPES:
        raise ValueError(f"unknown expert {name!r}; known: {sorted(EXPERT_TYPES)}")
    return EXPERT_TYPES[name].from_bytes(state)


__all__ = ["EXPERT_TYPES", "Expert", "ExpertOutput", "build_expert", "load_expert"]
