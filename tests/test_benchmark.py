"""The offline benchmark: every candidate judged on test labels, the automatic choice among them, the
operating point on more normals than test/good."""

from __future__ import annotations

import math

import pytest

from pipeline.data.datasets import write_synthetic_category
from pipeline.evaluation.benchmark import benchmark_category, markdown_table
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_category(root, "brick", "brick", n_train=24, n_test_good=6, n_test_defect=6, size=128, seed=2)
    training = TrainingConfig(max_train_images=16, expert_budget_ms=1e6)  # the budget is not what is tested here
    model = ModelConfig(coreset_ratio=0.1, num_keys=8)
    return benchmark_category(root, "brick", ["patchcore", "fcdd"], Backbones.pretrained(), model, training)


def test_every_candidate_has_a_row_and_the_choice_is_repeated_as_auto(rows) -> None:
    candidates = [r for r in rows if r.expert != "auto"]
    assert {r.expert for r in candidates} == {"patchcore", "fcdd"}
    assert len({(r.expert, r.spec) for r in candidates}) == len(candidates)  # one row per (expert, spec)
    [auto] = [r for r in rows if r.expert == "auto"]
    best = max((r for r in candidates if r.status == "ok"), key=lambda r: r.validation_score)
    assert (auto.chosen_expert, auto.spec) == (best.expert, best.spec)  # chosen on validation, not on test
    assert auto.image_auroc == best.image_auroc


def test_operating_point_uses_test_good_plus_unused_training_normals(rows) -> None:
    for row in rows:
        assert row.num_test_images == 12 and row.num_far_normals == 6 + 8  # 24 - 16 training images unused
        assert 0.0 <= row.recall_at_threshold <= 1.0 and 0.0 <= row.far_at_threshold <= 1.0
        # the calibrated threshold is itself a point of the ROC: within 1% false alarms, it bounds recall@1%
        assert row.far_at_threshold > 0.01 or row.recall_at_1pct_far >= row.recall_at_threshold
        assert row.ms_per_frame > 0 and row.state_bytes > 0 and not math.isnan(row.pixel_auroc)
    table = markdown_table(rows)
    assert "recall @1% FAR" in table and "**auto → " in table
