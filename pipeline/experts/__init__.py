"""Anomaly experts: one folder per model, the torch model apart from its fitting logic.

Adding an expert: its folder (the expert class, with `name` and `config_type`; its config's fields that the
line's ModelConfig sets declared with `model_setting`) and one line in `EXPERT_TYPES`.
"""

from __future__ import annotations

from pipeline.experts.base import Expert, ExpertOutput, model_settings
from pipeline.experts.dinov2 import DINOv2Patch
from pipeline.experts.ensemble import Ensemble
from pipeline.experts.fcdd import FCDD
from pipeline.experts.panda import PANDA
from pipeline.experts.patchcore import PatchCore
from pipeline.experts.reverse_distillation import ReverseDistillation
from pipeline.experts.simplenet import SimpleNet
from pipeline.experts.ucad import UCAD
from schemas.config import ModelConfig

# Order = preference on ties in the automatic choice. An Ensemble is composed of fitted experts by the
# automatic choice, never fitted on its own: it is here so that stored tasks load.
EXPERT_TYPES: dict[str, type[Expert]] = {
    expert.name: expert for expert in (PatchCore, ReverseDistillation, FCDD, UCAD, DINOv2Patch, PANDA, SimpleNet, Ensemble)
}


def expert_type(name: str) -> type[Expert]:
    if name not in EXPERT_TYPES:
        raise ValueError(f"unknown expert {name!r}; known: {sorted(EXPERT_TYPES)}")
    return EXPERT_TYPES[name]


def build_expert(name: str, config: ModelConfig) -> Expert:
    """An unfitted expert of the given name: its config's defaults, with the line's settings it takes
    from the model config (its `model_setting` fields)."""
    kind = expert_type(name)
    return kind(kind.config_type(**model_settings(kind.config_type, config)))


def load_expert(name: str, state: bytes) -> Expert:
    return expert_type(name).from_bytes(state)


__all__ = ["EXPERT_TYPES", "Expert", "ExpertOutput", "build_expert", "expert_type", "load_expert"]
