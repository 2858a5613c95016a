"""The automatic choice's validation set: several anomalies per normal, of different families, and each
candidate's validation AUROC per family in its result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.cost import MachineSpeed
from pipeline.core.expert_selection import Candidate, candidate_specs, choose, make_validation_set
from pipeline.core.training import load_task_images
from pipeline.data.datasets import write_synthetic_category
from pipeline.data.validation_anomalies import FAMILIES
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

SPEED = MachineSpeed({"efficientnet_lite0": 50.0, "efficientnet_lite2": 80.0, "dense": 100.0, "stream": 4.0})
MODEL = ModelConfig(coreset_ratio=0.1, max_coreset_size=400, num_keys=8)


def test_each_candidate_is_judged_per_family(tmp_path: Path) -> None:
    write_synthetic_category(tmp_path, "brick", "brick", n_train=40, n_test_good=1, n_test_defect=1, size=96, seed=3)
    images = load_task_images(tmp_path / "brick" / "train" / "good", TrainingConfig(), seed=0)
    normals = images.frames["validation"]
    validation = make_validation_set(normals, 0, anomalies_per_normal=2)
    assert len(validation.anomalous) == len(validation.masks) == len(validation.families) == 2 * len(normals)
    assert validation.labels == [False] * len(normals) + [True] * (2 * len(normals))
    # the first anomaly of each normal is the one a single-anomaly set draws
    single = make_validation_set(normals, 0)
    assert single.families == validation.families[::2]
    assert all(pair[0] != pair[1] for pair in zip(validation.families[::2], validation.families[1::2]))
    assert set(Counter(validation.families)) <= set(FAMILIES)

    frames = images.frames["fit"]
    candidate = Candidate("patchcore", candidate_specs("patchcore", frames)[0])
    chosen = choose([candidate], frames, validation, Backbones.pretrained(), MODEL, TrainingConfig(),
                    budget_s=1e6, speed=SPEED).chosen
    assert set(chosen.family_aurocs) == set(validation.families)
    assert all(0.0 <= auroc <= 1.0 for auroc in chosen.family_aurocs.values())
    # the image AUROC over every anomaly lies between the families' own
    assert min(chosen.family_aurocs.values()) <= chosen.image_auroc + 1e-9
    assert chosen.image_auroc <= max(chosen.family_aurocs.values()) + 1e-9
    assert chosen.as_dict()["family_aurocs"] == chosen.family_aurocs


def test_the_count_per_normal_is_bounded_by_the_families() -> None:
    with pytest.raises(ValueError):
        TrainingConfig(validation_anomalies_per_normal=len(FAMILIES) + 1)
    with pytest.raises(ValueError):
        TrainingConfig(validation_anomalies_per_normal=0)
