"""Ensembles of experts fitted at one spec: their arithmetic, state bytes, and how the automatic choice
composes and judges them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from helpers import serve_one_task
from pipeline.core.expert_selection import (ENSEMBLE_MIN_GAIN, CandidateResult, _select, default_candidates,
                                            ensemble_candidates)
from pipeline.data.datasets import train_images, write_synthetic_category
from pipeline.experts import build_expert, load_expert
from pipeline.experts.ensemble import Ensemble, Member
from pipeline.experts.frames import fit_batches, run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import ModelConfig
from schemas.spec import InputSpec

IMAGE_SIZE = 96
SPEC = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=IMAGE_SIZE, width=IMAGE_SIZE)
MODEL = ModelConfig(image_size=IMAGE_SIZE, coreset_ratio=0.2, max_coreset_size=300, seed=0)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def backbones() -> Backbones:
    return Backbones.pretrained()


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = tmp_path_factory.mktemp("ensemble")
    write_synthetic_category(root, "brick", "brick", n_train=8, n_test_good=2, n_test_defect=2, size=IMAGE_SIZE, seed=3)
    return [decode_image(Path(p).read_bytes(), 10**7) for p in train_images(root, "brick")]


@pytest.fixture(scope="module")
def members(backbones: Backbones, frames: list[np.ndarray]) -> list[Member]:
    batches = fit_batches(frames[:6], SPEC, backbones, 8)
    fitted = []
    for name, spreads in (("patchcore", (0.5, 0.25)), ("fcdd", (2.0, 4.0))):
        expert = build_expert(name, MODEL)
        expert.fit(batches, backbones.default)
        fitted.append(Member(expert, *spreads))
    return fitted


def test_outputs_are_the_mean_of_each_members_outputs_over_its_spreads(members, backbones, frames) -> None:
    ensemble = Ensemble(members=members)
    out = run_on_frames(ensemble, SPEC, backbones, frames[6:])
    alone = [run_on_frames(m.expert, SPEC, backbones, frames[6:]) for m in members]
    expected_scores = np.mean([a.scores / m.score_spread for a, m in zip(alone, members)], axis=0)
    np.testing.assert_allclose(out.scores, expected_scores, rtol=1e-5)
    for i, score_map in enumerate(out.maps):
        expected = np.mean([a.maps[i] / m.map_spread for a, m in zip(alone, members)], axis=0)
        np.testing.assert_allclose(score_map, expected, rtol=1e-4, atol=1e-6)
    assert (out.scores >= 0).all()  # divided by spreads, never shifted: thresholds expect non-negative scores


def test_state_round_trips_byte_for_byte_and_predicts_the_same(members, backbones, frames) -> None:
    ensemble = Ensemble(members=members)
    state = ensemble.to_bytes()
    loaded = load_expert("ensemble", state)
    assert isinstance(loaded, Ensemble) and loaded.member_names == ["patchcore", "fcdd"]
    assert loaded.to_bytes() == state
    np.testing.assert_array_equal(run_on_frames(loaded, SPEC, backbones, frames[6:]).scores,
                                  run_on_frames(ensemble, SPEC, backbones, frames[6:]).scores)


def test_an_ensemble_is_composed_never_fitted_or_named(members) -> None:
    with pytest.raises(ValueError, match="at least two"):
        Ensemble(members=members[:1])
    with pytest.raises(ValueError, match="single experts"):
        Ensemble(members=[members[0], Member(Ensemble(members=members), 1.0, 1.0)])
    for spread in (math.nan, 0.0):  # outputs that never vary on normals have no unit to put them in
        with pytest.raises(ValueError, match="finite and positive"):
            Member(members[0].expert, spread, 1.0)
    with pytest.raises(NotImplementedError, match="composed"):
        Ensemble().fit([], None)
    with pytest.raises(ValueError, match="composed by the automatic choice"):
        default_candidates([np.zeros((8, 8, 3), np.uint8)], "ensemble", None)


def test_ensembles_are_proposed_per_spec_from_fitted_candidates_within_budget() -> None:
    other = SPEC.model_copy(update={"backbone": "efficientnet_lite2"})

    def result(expert: str, spec: InputSpec, score: float, status: str = "ok") -> CandidateResult:
        return CandidateResult(expert, spec, status, image_auroc=score)

    results = [result("patchcore", SPEC, 0.9), result("simplenet", SPEC, 0.7), result("panda", SPEC, 0.8),
               result("fcdd", SPEC, 0.95, "over_budget"), result("dinov2", SPEC, 0.99),
               result("patchcore", other, 0.9)]
    fitted = [object(), object(), object(), object(), None, object()]  # dinov2 was not fitted
    proposed = [(c.members, c.spec, members) for c, members in ensemble_candidates(results, fitted)]
    # lite0: the three fitted within budget, and the best two; lite2 has one candidate: no ensemble
    assert proposed == [(("patchcore", "panda", "simplenet"), SPEC, [0, 2, 1]), (("patchcore", "panda"), SPEC, [0, 2])]
    twins = [result("patchcore", SPEC, 0.9), result("panda", SPEC, 0.8)]
    twins[1].orientations = 4  # fitted on rotated frames: another bank, no common ensemble
    assert ensemble_candidates(twins, [object(), object()]) == []


@pytest.mark.integration
def test_a_stored_ensemble_task_is_served_as_the_choice_judged_it(members, backbones, frames, redis_client) -> None:
    ensemble = Ensemble(members=members)
    inspector = serve_one_task(redis_client, "test-ensemble", "brick", ensemble, SPEC, backbones, MODEL)
    assert isinstance(inspector.tasks["brick"].expert, Ensemble)
    results, _ = inspector.inspect(frames[6:])
    np.testing.assert_allclose([r.score_raw for r in results], run_on_frames(ensemble, SPEC, backbones, frames[6:]).scores,
                               rtol=1e-5)


@pytest.mark.parametrize("gain, kept", [(ENSEMBLE_MIN_GAIN / 2, "patchcore"), (2 * ENSEMBLE_MIN_GAIN, "ensemble")])
def test_an_ensemble_is_kept_only_when_it_beats_the_best_single_candidate_by_a_margin(gain: float, kept: str) -> None:
    results = [CandidateResult("patchcore", SPEC, "ok", image_auroc=0.9), CandidateResult("panda", SPEC, "ok", image_auroc=0.8),
               CandidateResult("ensemble", SPEC, "ok", members=("patchcore", "panda"), image_auroc=0.9 + gain)]
    experts = [object(), object(), object()]
    selection = _select(results, experts, [None] * 3, [0, 1, 2])
    assert selection.chosen.expert == kept
