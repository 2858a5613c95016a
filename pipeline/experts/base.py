"""The one interface every anomaly expert implements.

An expert is fitted on normal images of one category, predicts an image score and a pixel map per image,
and round-trips its whole state through bytes (what the Redis store keeps). Thresholds are not part of
an expert: they live in the category's calibration (pipeline.core.calibration).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.common.serialization import unpack
from schemas.config import ModelConfig
from schemas.spec import CNN_BACKBONES

# Dataclass-field metadata key: the ModelConfig field a line sets this expert-config field from.
MODEL_SETTING = "model_setting"


@dataclass
class ExpertOutput:
    scores: np.ndarray  # B, raw image scores (higher = more anomalous)
    maps: np.ndarray  # B x H x W raw pixel scores at the batch's input resolution


class Expert(ABC):
    name: ClassVar[str]
    config_type: ClassVar[type]  # its frozen config dataclass; build_expert fills its `model_setting` fields
    # InputSpec backbones the expert works on (schemas.spec); CNN experts read the batch's stages, ViT
    # experts run the shared ViT on the batch's pixels themselves (the CNN is then not run at all).
    backbones: ClassVar[tuple[str, ...]] = CNN_BACKBONES
    # True: square inputs only (its training-time generators or region masks assume a square canvas).
    square_inputs: ClassVar[bool] = False

    @abstractmethod
    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone) -> None:
        """Learn from batches of normal images only. `backbone` is the frozen extractor that made the
        batches, for experts that must embed images of their own (e.g. synthetic anomalies)."""

    @abstractmethod
    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        """Scores and maps of a batch. `backbone` made the batch; experts that run part of it again
        (UCAD's prompted ViT) need it, those working on the shared features alone ignore it."""

    def vit_layers(self) -> tuple[int, ...]:
        """Unprompted ViT blocks this expert reads from `batch.tokens` when the caller computed them (it
        runs the ViT itself otherwise); () for experts that never read them."""
        return ()

    def fit_summary(self) -> dict:
        """What the last fit did (JSON-able), for training events and provenance; {} if nothing to say."""
        return {}

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Deterministic: the same fitted state always gives the same bytes."""

    @classmethod
    @abstractmethod
    def from_bytes(cls, data: bytes) -> "Expert": ...

    @classmethod
    def unpack_state(cls, data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
        """Meta and arrays of a packed state (pipeline.common.serialization), refusing another expert's state."""
        meta, arrays = unpack(data)
        if meta.get("expert") != cls.name:
            raise ValueError(f"state is for expert {meta.get('expert')!r}, not {cls.name!r}")
        return meta, arrays


def config_from_dict(config_type: type, values: dict):
    """A frozen config dataclass from its JSON form (JSON turned its tuples into lists)."""
    return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def model_setting(name: str) -> Any:
    """An expert-config field the line's ModelConfig sets (field `name` there), defaulting to ModelConfig's
    default: a setting every expert of a line shares is written once, in schemas.config. Fields declared
    plainly are the expert's own, whatever their name (PANDA's num_neighbors is DN2's k, not PatchCore's b)."""
    return field(default=ModelConfig.model_fields[name].default, metadata={MODEL_SETTING: name})


def model_settings(config_type: type, model: ModelConfig) -> dict[str, Any]:
    """The values of `config_type`'s `model_setting` fields in `model`, by the config's field names."""
    return {f.name: getattr(model, f.metadata[MODEL_SETTING])
            for f in fields(config_type) if MODEL_SETTING in f.metadata}
