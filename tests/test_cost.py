"""Candidates costed from their work, not from wall time: the choice does not move with the machine's load."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.sampling import farthest_point_sampling
from pipeline.core import cost
from pipeline.core.cost import MachineSpeed, Work, counted
from pipeline.core.expert_selection import Candidate, candidate_specs, choose, make_validation_set
from pipeline.core.training import load_task_images
from pipeline.data.datasets import write_synthetic_category
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# A fixed speed: what MachineSpeed.cached returns once it has measured this machine.
SPEED = MachineSpeed({"efficientnet_lite0": 50.0, "efficientnet_lite2": 80.0, "dense": 100.0, "stream": 4.0})
MODEL = ModelConfig(coreset_ratio=0.1, max_coreset_size=400, num_keys=8)


def test_work_is_counted_by_kind_and_costed_by_the_machines_speed() -> None:
    a, b = torch.ones(64, 32), torch.ones(32, 16)
    image, kernel = torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3)
    _, work = counted(lambda: (a @ b, torch.nn.functional.conv2d(image, kernel)))
    assert work.dense == 2 * 64 * 32 * 16 and work.conv == 2 * 4 * 3 * 3 * 3 * 6 * 6
    seconds = SPEED.seconds(Work(conv=50e9, dense=100e9), "efficientnet_lite0")
    assert seconds == pytest.approx(2.0)  # 1 s of convolutions at 50 GFLOP/s, 1 s of dense work at 100
    assert SPEED.seconds(Work(conv=100e9), "dinov2_vits14") == pytest.approx(1.0)  # a ViT's convs run dense


def test_a_coresets_greedy_steps_are_counted_as_memory_bound_work() -> None:
    """torch's counter does not see matrix-vector products: a coreset of a large fit set cost minutes
    that the estimate called nothing. Each greedy step reads the whole projected bank once."""
    points = torch.rand(1000, 16)
    _, work = counted(lambda: farthest_point_sampling(points, 10))
    assert work.stream == 10 * 2 * 1000 * 16 and work.dense == 0 and work.conv == 0
    assert SPEED.seconds(Work(stream=4e9), "efficientnet_lite0") == pytest.approx(1.0)
    for rows in (10, 30):  # below and above the size where cdist turns to a matrix product
        _, work = counted(lambda: torch.cdist(torch.rand(2, rows, 8), torch.rand(2, 50, 8)))
        assert work.dense == 2 * 2 * rows * 50 * 8  # PANDA's kNN


def test_the_speed_is_measured_once_per_machine_then_read_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INSPECTION_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(MachineSpeed, "measure", classmethod(lambda cls, backbones: calls.append(1) or SPEED))
    assert MachineSpeed.cached(None) == SPEED and MachineSpeed.cached(None) == SPEED
    assert calls == [1] and cost.machine_key() in (tmp_path / cost.SPEED_FILE).read_text()


def _hog(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _choice(frames, validation, backbones, training):
    candidates = [Candidate("patchcore", spec) for spec in candidate_specs("patchcore", frames)]
    selection = choose(candidates, frames, validation, backbones, MODEL, training, budget_s=1e6, speed=SPEED)
    return [(r.expert, r.spec, r.status, r.ms_per_frame, r.fit_seconds, r.score) for r in selection.results], selection.chosen.spec


def test_the_same_add_chooses_the_same_beside_a_cpu_hog(tmp_path: Path) -> None:
    write_synthetic_category(tmp_path, "brick", "brick", n_train=12, n_test_good=1, n_test_defect=1, size=128, seed=3)
    backbones = Backbones.pretrained()
    images = load_task_images(tmp_path / "brick" / "train" / "good", TrainingConfig(), seed=0)
    frames = images.frames["fit"]
    validation = make_validation_set(images.frames["validation"], 0)
    quiet, _ = _choice(frames, validation, backbones, TrainingConfig())
    # A per-frame budget between the two candidates' estimates: one is over it, deterministically.
    budget = float(np.mean([row[3] for row in quiet]))
    training = TrainingConfig(expert_budget_ms=budget)
    quiet, quiet_choice = _choice(frames, validation, backbones, training)
    assert sorted(row[2] for row in quiet) == ["ok", "over_budget"]
    hogs = [multiprocessing.get_context("spawn").Process(target=_hog, args=(120.0,)) for _ in range(2)]
    for hog in hogs:
        hog.start()
    try:
        loaded, loaded_choice = _choice(frames, validation, backbones, training)
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join()
    assert loaded == quiet and loaded_choice == quiet_choice  # statuses, costs and scores, to the last bit


def test_a_fit_longer_than_its_estimate_stops_where_the_add_budget_ends(tmp_path: Path) -> None:
    """A trained expert's fit is estimated from PatchCore's cost per view before it has run; its real
    work is several times that. The add budget must bound the real work, not the estimate."""
    write_synthetic_category(tmp_path, "brick", "brick", n_train=12, n_test_good=1, n_test_defect=1, size=128, seed=3)
    backbones = Backbones.pretrained()
    images = load_task_images(tmp_path / "brick" / "train" / "good", TrainingConfig(), seed=0)
    frames = images.frames["fit"]
    validation = make_validation_set(images.frames["validation"], 0)
    spec = candidate_specs("patchcore", frames)[0]
    candidates = [Candidate("patchcore", spec), Candidate("simplenet", spec)]
    alone = choose(candidates[:1], frames, validation, backbones, MODEL, TrainingConfig(), budget_s=1e6, speed=SPEED)
    first = alone.results[0]
    first_s = first.fit_seconds + first.ms_per_frame * len(validation.frames) / 1000
    # Room for SimpleNet's estimate (PatchCore's cost per view, as nothing else is known yet), not for its
    # training steps: it starts, and is stopped where the budget ends.
    budget_s = 2.5 * first_s
    bounded = choose(candidates, frames, validation, backbones, MODEL, TrainingConfig(), budget_s=budget_s, speed=SPEED)
    stopped = bounded.results[1]
    assert stopped.status == "skipped" and "during its fit" in stopped.detail
    assert bounded.chosen.expert == "patchcore" and bounded.results[0].score == first.score
