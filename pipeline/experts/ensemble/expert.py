"""An ensemble of experts fitted at one input spec: their maps and image scores averaged, each member's
first divided by its spread on normal frames.

Why: experts of different kinds miss different defects. PatchCore remembers local features, PANDA
adapts the late CNN blocks to the product and compares global features and SPADE maps, SimpleNet learns
a discriminator on adapted features; where one scores a normal frame high, the others rarely agree, so
their average separates normal from defective better than any one of them (measured in docs/limits.md).

Members share the spec, so one backbone pass feeds them all: the ensemble costs the backbone once plus
every member's own stage. Raw scores of different experts live on different scales (cosine distances,
feature distances, discriminator logits), so each member's scores and map are divided by their standard
deviation over normal frames no member was fitted on (the automatic choice uses its validation normals).
Dividing by the spread, without subtracting the mean, keeps every output non-negative, as thresholds
expect, and ranks frames exactly as the mean of z-scores would: the means only shift every output by one
constant.

An ensemble is not fitted from scratch: the automatic choice composes it from candidates it already
fitted and judged (pipeline.core.expert_selection), and the ensemble is then judged like any candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.common.serialization import pack
from pipeline.experts.base import Expert, ExpertOutput
from pipeline.features.backbone import Backbone, FeatureBatch
from schemas.spec import CNN_BACKBONES, VIT_BACKBONE


@dataclass(frozen=True)
class EnsembleConfig:
    """Nothing to set: an ensemble is what its members are (kept for the Expert interface)."""


@dataclass(frozen=True)
class Member:
    expert: Expert
    score_spread: float  # standard deviation of its image scores over normal frames
    map_spread: float  # standard deviation of its map values over normal frames' pixels

    def __post_init__(self) -> None:
        for name in ("score_spread", "map_spread"):
            value = getattr(self, name)
            # a member whose normal outputs do not vary at all cannot be put in units of their spread
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"a member's {name} must be finite and positive, got {value}")


class Ensemble(Expert):
    name = "ensemble"
    config_type = EnsembleConfig
    backbones = (*CNN_BACKBONES, VIT_BACKBONE)

    def __init__(self, config: EnsembleConfig = EnsembleConfig(), members: Sequence[Member] = ()):
        self.config = config
        self.members = list(members)
        if len(self.members) == 1:
            raise ValueError("an ensemble needs at least two members")
        if any(isinstance(m.expert, Ensemble) for m in self.members):
            raise ValueError("an ensemble's members are single experts")

    @property
    def member_names(self) -> list[str]:
        return [m.expert.name for m in self.members]

    def fit(self, batches: Sequence[FeatureBatch], backbone: Backbone) -> None:
        raise NotImplementedError("an ensemble is composed from fitted experts (Ensemble(members=...)), "
                                  "the automatic choice does it; it is not fitted on its own")

    def vit_layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for m in self.members for layer in m.expert.vit_layers()}))

    def predict(self, batch: FeatureBatch, backbone: Backbone | None = None) -> ExpertOutput:
        if not self.members:
            raise RuntimeError("Ensemble.predict without members")
        scores, maps = 0.0, 0.0
        for member in self.members:
            output = member.expert.predict(batch, backbone)
            scores = scores + np.asarray(output.scores, np.float64) / member.score_spread
            maps = maps + np.asarray(output.maps, np.float64) / member.map_spread
        n = len(self.members)
        return ExpertOutput((scores / n).astype(np.float32), (maps / n).astype(np.float32))

    def fit_summary(self) -> dict:
        return {"members": [{"expert": m.expert.name, "score_spread": m.score_spread, "map_spread": m.map_spread,
                             "fit_summary": m.expert.fit_summary()} for m in self.members]}

    def to_bytes(self) -> bytes:
        if not self.members:
            raise RuntimeError("Ensemble.to_bytes without members")
        meta = {"expert": self.name, "members": [{"expert": m.expert.name, "score_spread": m.score_spread,
                                                   "map_spread": m.map_spread} for m in self.members]}
        arrays = {f"member_{i:02d}": np.frombuffer(m.expert.to_bytes(), np.uint8) for i, m in enumerate(self.members)}
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Ensemble":
        from pipeline.experts import load_expert  # the registry imports this module: import it late

        meta, arrays = cls.unpack_state(data)
        members = [Member(load_expert(entry["expert"], arrays[f"member_{i:02d}"].tobytes()),
                          float(entry["score_spread"]), float(entry["map_spread"]))
                   for i, entry in enumerate(meta["members"])]
        return cls(EnsembleConfig(), members)
