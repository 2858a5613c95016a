"""The chosen expert is fitted again on the fit and validation normals once validation has judged it,
within what is left of the add budget; the choice itself stays as judged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.core.cost import MachineSpeed
from pipeline.core.decision import ImageDecision, MapStatistics
from pipeline.core.expert_selection import (Candidate, CandidateResult, Selection, candidate_specs, choose,
                                            make_validation_set, refit_chosen)
from pipeline.core.training import load_task_images
from pipeline.data.datasets import write_synthetic_category
from pipeline.experts import build_expert
from pipeline.experts.frames import fit_batches, run_on_frames
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SPEED = MachineSpeed({"efficientnet_lite0": 50.0, "efficientnet_lite2": 80.0, "dense": 100.0, "stream": 4.0})
MODEL = ModelConfig(coreset_ratio=0.1, max_coreset_size=400, num_keys=8)
TRAINING = TrainingConfig()


@pytest.fixture(scope="module")
def backbones() -> Backbones:
    return Backbones.pretrained()


@pytest.fixture(scope="module")
def chosen(tmp_path_factory: pytest.TempPathFactory, backbones: Backbones):
    """PatchCore chosen on 24 aligned synthetic frames (a statistics role, several validation normals)."""
    root = tmp_path_factory.mktemp("refit")
    write_synthetic_category(root, "brick", "brick", n_train=60, n_test_good=1, n_test_defect=1, size=96, seed=4)
    images = load_task_images(root / "brick" / "train" / "good", TRAINING, seed=0)
    fit = images.frames["fit"]
    validation = make_validation_set(images.frames["validation"], 0, images.frames["statistics"])
    assert len(validation.normal) >= 2 and len(validation.statistics) >= 5
    spec = candidate_specs("patchcore", fit)[0]
    selection = choose([Candidate("patchcore", spec)], fit, validation, backbones, MODEL, TRAINING, budget_s=1e6,
                       speed=SPEED)
    return selection, fit, validation


def test_the_chosen_expert_is_fitted_again_on_the_fit_and_validation_normals(chosen, backbones: Backbones) -> None:
    selection, fit, validation = chosen
    refit = refit_chosen(selection, fit, validation, backbones, MODEL, TRAINING, SPEED, left_s=1e6)
    assert refit.refitted and refit.images == len(fit) + len(validation.normal) and "refitted on" in refit.detail
    assert 0 < refit.seconds <= selection.chosen.refit_seconds  # the estimate does not understate the work
    spec = selection.chosen.spec
    alone = build_expert("patchcore", MODEL)
    alone.fit(fit_batches(fit + validation.normal, spec, backbones, TRAINING.batch_size), backbones.for_spec(spec.backbone))
    assert refit.expert.to_bytes() == alone.to_bytes() != selection.expert.to_bytes()
    # the validation normals' patches were in the refit's pool: on the whole they score lower than under the
    # expert that was judged
    before = run_on_frames(selection.expert, spec, backbones, validation.normal).scores
    after = run_on_frames(refit.expert, spec, backbones, validation.normal).scores
    assert after.mean() < before.mean()
    assert refit.decision.aggregation == selection.decision.aggregation  # the judged decision


def test_per_position_statistics_are_taken_again_from_the_refitted_maps(chosen, backbones: Backbones) -> None:
    selection, fit, validation = chosen
    spec = selection.chosen.spec
    judged = MapStatistics.from_maps(run_on_frames(selection.expert, spec, backbones, validation.statistics).maps)
    index = selection.results.index(selection.chosen)
    position_aware = replace(selection, decisions=[*selection.decisions[:index], ImageDecision("max", judged),
                                                   *selection.decisions[index + 1:]])
    refit = refit_chosen(position_aware, fit, validation, backbones, MODEL, TRAINING, SPEED, left_s=1e6)
    expected = MapStatistics.from_maps(run_on_frames(refit.expert, spec, backbones, validation.statistics).maps)
    assert refit.decision.aggregation == "max"
    np.testing.assert_array_equal(refit.decision.statistics.mean, expected.mean)
    np.testing.assert_array_equal(refit.decision.statistics.spread, expected.spread)
    assert not np.array_equal(expected.mean, judged.mean)


def test_without_room_in_the_add_budget_the_judged_expert_is_kept(chosen, backbones: Backbones) -> None:
    selection, fit, validation = chosen
    short = refit_chosen(selection, fit, validation, backbones, MODEL, TRAINING, SPEED,
                         left_s=0.5 * selection.chosen.refit_seconds)
    assert not short.refitted and short.expert is selection.expert and short.images == len(fit)
    assert "left of the add budget" in short.detail
    # an estimate that understates: the counted work stops the refit where the budget ends
    result = replace(selection.chosen, refit_seconds=0.0)
    understated = replace(selection, chosen=result, results=[result])
    stopped = refit_chosen(understated, fit, validation, backbones, MODEL, TRAINING, SPEED, left_s=1e-3)
    assert not stopped.refitted and stopped.expert is selection.expert and "during the refit" in stopped.detail


def test_an_ensemble_keeps_its_members_as_judged(chosen, backbones: Backbones) -> None:
    selection, fit, validation = chosen
    result = CandidateResult("ensemble", selection.chosen.spec, "ok", members=("patchcore", "panda"))
    ensemble = Selection(selection.expert, result, [result], [selection.expert], [ImageDecision()])
    kept = refit_chosen(ensemble, fit, validation, backbones, MODEL, TRAINING, SPEED, left_s=1e6)
    assert not kept.refitted and kept.expert is selection.expert and "ensemble" in kept.detail
