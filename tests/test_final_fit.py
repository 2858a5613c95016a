"""The final fit: once the choice is made, the chosen expert is fitted again on the fit normals and the
validation normals (and the statistics normals unless its decision reads them), within the add budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.core.cost import MachineSpeed
from pipeline.core.decision import ImageDecision
from pipeline.core.expert_selection import (Candidate, _final_fit_seconds, candidate_specs, choose, fit_final,
                                            make_validation_set)
from pipeline.core.training import load_task_images
from pipeline.data.datasets import write_synthetic_category
from pipeline.experts import build_expert
from pipeline.experts.frames import fit_batches
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEED = MachineSpeed({"efficientnet_lite0": 50.0, "efficientnet_lite2": 80.0, "dense": 100.0, "stream": 4.0})
MODEL = ModelConfig(coreset_ratio=0.1, max_coreset_size=400, num_keys=8)
TRAINING = TrainingConfig()


@pytest.fixture(scope="module")
def backbones() -> Backbones:
    return Backbones.pretrained()


@pytest.fixture(scope="module")
def split(tmp_path_factory, backbones):
    """An aligned product (every frame one size): fit, validation and statistics normals."""
    root = tmp_path_factory.mktemp("final")
    write_synthetic_category(root, "brick", "brick", n_train=80, n_test_good=1, n_test_defect=1, size=96, seed=3)
    images = load_task_images(root / "brick" / "train" / "good", TRAINING, seed=0)
    fit = images.frames["fit"]
    validation = make_validation_set(images.frames["validation"], 0, images.frames["statistics"])
    assert images.aligned and validation.statistics and validation.normal
    candidate = Candidate("patchcore", candidate_specs("patchcore", fit)[0])
    selection = choose([candidate], fit, validation, backbones, MODEL, TRAINING, budget_s=1e6, speed=SPEED)
    return fit, validation, selection


def _bank_bytes(frames, spec, backbones) -> bytes:
    expert = build_expert("patchcore", MODEL)
    expert.fit(fit_batches(frames, spec, backbones, TRAINING.batch_size), backbones.for_spec(spec.backbone))
    return expert.to_bytes()


def _with_decision(selection, decision: ImageDecision):
    return replace(selection, decisions=[decision if d is not None else None for d in selection.decisions])


def test_the_chosen_expert_is_fitted_again_on_the_validation_and_statistics_normals(split, backbones) -> None:
    fit, validation, selection = split
    plain = _with_decision(selection, ImageDecision("max"))
    final = fit_final(plain, fit, validation, backbones, MODEL, TRAINING, 1e6, SPEED)
    added = validation.normal + validation.statistics  # the decision reads no statistics: they are normals to fit
    assert final.status == "refit" and final.num_fit_frames == len(fit) + len(added)
    assert final.expert.to_bytes() == _bank_bytes(fit + added, selection.chosen.spec, backbones)
    assert final.expert.to_bytes() != selection.expert.to_bytes()
    assert final.decision == plain.decision
    assert final.as_dict() == {"status": "refit", "num_fit_frames": len(fit) + len(added), "detail": final.detail}


def test_a_position_aware_decision_keeps_its_statistics_normals_unseen(split, backbones) -> None:
    fit, validation, selection = split
    statistics = selection.decision.statistics
    assert statistics is not None  # an aligned product's choice: position-aware first
    final = fit_final(selection, fit, validation, backbones, MODEL, TRAINING, 1e6, SPEED)
    assert final.num_fit_frames == len(fit) + len(validation.normal)
    assert final.expert.to_bytes() == _bank_bytes(fit + validation.normal, selection.chosen.spec, backbones)
    # the statistics are the final expert's maps of the statistics normals, on the same grid
    assert final.decision.aggregation == selection.decision.aggregation
    assert final.decision.statistics.mean.shape == statistics.mean.shape
    assert final.decision.statistics.mean.tobytes() != statistics.mean.tobytes()


def test_the_choice_is_kept_when_the_final_fit_has_no_room_or_is_switched_off(split, backbones) -> None:
    fit, validation, selection = split
    tight = fit_final(selection, fit, validation, backbones, MODEL, TRAINING, selection.spent_s + 1e-3, SPEED)
    off = fit_final(selection, fit, validation, backbones, MODEL, TrainingConfig(final_fit=False), 1e6, SPEED)
    for final in (tight, off):
        assert final.status == "kept" and final.expert is selection.expert and final.decision == selection.decision
        assert final.num_fit_frames == len(fit)
    assert "no room in the add budget" in tight.detail and "switched off" in off.detail


def test_an_ensemble_keeps_its_members_fits(split, backbones) -> None:
    fit, validation, selection = split
    composed = replace(selection.chosen, members=("patchcore", "panda"))
    as_ensemble = replace(selection, chosen=composed, results=[composed])
    final = fit_final(as_ensemble, fit, validation, backbones, MODEL, TRAINING, 1e6, SPEED)
    assert final.status == "kept" and final.expert is selection.expert and "ensemble" in final.detail


def test_the_choice_keeps_room_in_the_add_budget_for_the_final_fit(split, backbones) -> None:
    """A budget with room for the first candidate and its final fit, not for a second candidate too: the
    second is skipped for the final fit's sake, and the final fit then fits in what is left."""
    fit, validation, _ = split
    spec = candidate_specs("patchcore", fit)[0]
    candidates = [Candidate("patchcore", spec), Candidate("simplenet", spec)]  # tried in this order
    alone = choose(candidates[:1], fit, validation, backbones, MODEL, TRAINING, budget_s=1e6, speed=SPEED)
    first = alone.chosen
    room_s = _final_fit_seconds(first.fit_seconds, first.ms_per_frame, len(fit), validation, TRAINING)
    assert room_s > first.fit_seconds > 0  # the fit again, on more frames
    budget_s = alone.spent_s + 1.01 * room_s
    kept = choose(candidates, fit, validation, backbones, MODEL, TRAINING, budget_s, SPEED)
    assert [r.status for r in kept.results] == ["ok", "skipped"]
    assert "kept for the final fit" in kept.results[1].detail and kept.spent_s == pytest.approx(alone.spent_s)
    assert fit_final(kept, fit, validation, backbones, MODEL, TRAINING, budget_s, SPEED).status == "refit"
    off = choose(candidates, fit, validation, backbones, MODEL, TrainingConfig(final_fit=False), budget_s, SPEED)
    assert "kept for the final fit" not in off.results[1].detail  # without a final fit no room is kept


def test_no_room_is_kept_for_a_final_fit_that_cannot_happen(split, backbones) -> None:
    """The first candidate is always fitted; when its final fit no longer fits in the budget, keeping room
    for it would only cost later candidates their turn: the choice is then the one without a final fit."""
    fit, validation, _ = split
    spec = candidate_specs("patchcore", fit)[0]
    candidates = [Candidate("patchcore", spec), Candidate("patchcore", spec, 4)]
    alone = choose(candidates[:1], fit, validation, backbones, MODEL, TRAINING, budget_s=1e6, speed=SPEED)
    first = alone.chosen
    budget_s = alone.spent_s + 0.5 * _final_fit_seconds(first.fit_seconds, first.ms_per_frame, len(fit), validation,
                                                         TRAINING)
    with_final = choose(candidates, fit, validation, backbones, MODEL, TRAINING, budget_s, SPEED)
    without = choose(candidates, fit, validation, backbones, MODEL, TrainingConfig(final_fit=False), budget_s, SPEED)
    assert [(r.status, r.detail, r.score) for r in with_final.results] == [(r.status, r.detail, r.score)
                                                                          for r in without.results]
    assert "kept for the final fit" not in with_final.results[1].detail
    assert fit_final(with_final, fit, validation, backbones, MODEL, TRAINING, budget_s, SPEED).status == "kept"

