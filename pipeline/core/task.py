"""Everything one task (product category) is made of, as published to and loaded from the store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.calibration import Calibration
from pipeline.core.decision import ImageDecision
from pipeline.common.serialization import array_sizes, pack, unpack
from schemas.spec import InputSpec, legacy_spec


@dataclass(frozen=True)
class TaskArtifacts:
    category: str
    expert_name: str
    keys: np.ndarray  # K x D float32 task-identification keys
    expert_state: bytes  # Expert.to_bytes()
    calibration: Calibration
    meta: dict = field(default_factory=dict)  # provenance: train_dir, image counts, timings, config
    spec: InputSpec | None = None  # how frames reach the expert; None: a task stored before specs existed
    audit: bytes | None = None  # AuditSet.to_bytes() (pipeline/core/audit.py); None: stored before audit sets
    decision: ImageDecision | None = None  # None: stored before image decisions (the expert's own score)

    @property
    def image_decision(self) -> ImageDecision:
        """The stored decision, or for older tasks the expert's own score they were calibrated on."""
        return self.decision or ImageDecision()

    @property
    def input_spec(self) -> InputSpec:
        """The stored spec, or for older tasks the square squeeze they were trained with."""
        if self.spec is not None:
            return self.spec
        return legacy_spec(int(self.meta.get("model_config", {}).get("image_size", 224)))

    def parts(self) -> dict[str, int]:
        """Bytes per named part, the expert's state broken down by array (e.g. UCAD's prompt and knowledge)."""
        blobs = self.blobs()
        sizes = {kind: len(data) for kind, data in blobs.items() if kind != "expert"}
        return sizes | {f"expert.{name}": n for name, n in array_sizes(blobs["expert"]).items()}

    def blobs(self) -> dict[str, bytes]:
        """The task as named byte blobs (see schemas.store.BLOB_KINDS); deterministic. Tasks stored before
        per-task specs have no "spec" blob, and keep having none (their bytes never change)."""
        blobs = {
            "keys": pack({}, {"keys": self.keys}),
            "expert": self.expert_state,
            "calibration": self.calibration.to_bytes(),
            "meta": json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode(),
        }
        if self.spec is not None:
            blobs["spec"] = self.spec.model_dump_json().encode()
        if self.audit is not None:
            blobs["audit"] = self.audit
        if self.decision is not None:
            blobs["decision"] = self.decision.to_bytes()
        return blobs

    @classmethod
    def from_blobs(cls, category: str, expert_name: str, blobs: dict[str, bytes]) -> "TaskArtifacts":
        _, arrays = unpack(blobs["keys"])
        return cls(
            category=category,
            expert_name=expert_name,
            keys=arrays["keys"],
            expert_state=blobs["expert"],
            calibration=Calibration.from_bytes(blobs["calibration"]),
            meta=json.loads(blobs["meta"]),
            spec=InputSpec.model_validate_json(blobs["spec"]) if "spec" in blobs else None,
            audit=blobs.get("audit"),
            decision=ImageDecision.from_bytes(blobs["decision"]) if "decision" in blobs else None,
        )
