"""inspection perf: decoy tasks, the routing agreement check, the model-path timing and the tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.inspector import Inspector
from pipeline.core.task_id import KeyTaskIdentifier
from pipeline.data.datasets import labeled_test_images, list_images, write_synthetic_category
from pipeline.evaluation.perf import (
    decoy_keys,
    fit_perf_task,
    routing_table,
    stage_table,
    time_model_path,
    time_routing,
    with_decoys,
)
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import ModelConfig, TrainingConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _real_keys(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.normal(scale=3.0, size=16) + rng.normal(scale=0.5, size=(8, 16))).astype(np.float32)
            for name in ("alpha", "beta")}


def test_decoys_are_distinct_products_not_copies() -> None:
    real = _real_keys()
    decoys = decoy_keys(real, 30, seed=1)
    assert len(decoys) == 30 and all(k.shape == (8, 16) and k.dtype == np.float32 for k in decoys.values())
    assert decoy_keys(real, 30, seed=1).keys() == decoys.keys()
    for keys in decoys.values():  # farther from every real task's keys than those keys are from each other
        for source in real.values():
            assert np.linalg.norm(keys.mean(0) - source.mean(0)) > 0.5


def test_time_routing_reports_full_agreement_on_distinct_tasks() -> None:
    real = _real_keys()
    rng = np.random.default_rng(2)
    frames = [real[name][rng.integers(0, 8, size=12)] + rng.normal(scale=0.2, size=(12, 16))
              for name in ("alpha", "beta") * 6]
    tokens = torch.from_numpy(np.stack(frames).astype(np.float32))
    bounds = {name: float(KeyTaskIdentifier(real, {n: 1e9 for n in real}).distances(tokens).max()) * 1.5 for name in real}
    rows = time_routing(tokens, real, bounds, (1, 2, 40), candidates=2, repeats=1)
    assert [r.tasks for r in rows] == [1, 2, 40]
    assert rows[0].shortlist_ratio_to_one_task == pytest.approx(1.0)
    for row in rows:
        assert row.same_task == row.known and row.same_decision == row.frames == 12
        assert row.max_distance_error <= 1e-5
    assert rows[2].known == 12
    assert "| 40 | 12 |" in routing_table(rows, 2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("perf")
    write_synthetic_category(root, "brick", "brick", n_train=8, n_test_good=3, n_test_defect=3, size=160, seed=3)
    return root


def test_model_path_row_times_every_stage(synthetic: Path, one_torch_thread) -> None:
    backbones, model, training = Backbones.pretrained(), ModelConfig(), TrainingConfig(batch_size=4)
    fit = [decode_image(p.read_bytes(), 10**8) for p in list_images(synthetic / "brick" / "train" / "good")]
    task = fit_perf_task("brick", fit, "patchcore", backbones, model, training)
    inspector = Inspector(backbones, model)
    inspector.set_tasks(with_decoys({"brick": task}, 12), version=1)
    assert len(inspector.tasks) == 12 and inspector.tasks["decoy-0000"].expert is task.expert
    jpegs = [item.path.read_bytes() for item in labeled_test_images(synthetic, "brick")]
    row = time_model_path(inspector, jpegs, batch_size=2, min_frames=4, expert="patchcore")
    assert row.frames == 4 and row.tasks == 12 and row.frames_per_second > 0
    assert set(row.p50_ms) == {"decode", "features", "task_id", "expert", "encode", "total"}
    assert all(row.p99_ms[s] >= row.p50_ms[s] > 0 for s in row.p50_ms)
    assert row.p50_ms["total"] >= row.p50_ms["features"] + row.p50_ms["expert"]
    assert "| 2 | 12 | patchcore | 4 |" in stage_table([row])


def test_perf_command_prints_its_tables_without_the_shared_datasets(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "perf", "--part", "compute", "--part", "routing", "--part", "model",
         "--dataset-root", str(tmp_path / "absent"), "--batch-sizes", "2", "--tasks", "1,10",
         "--frames", "2", "--routing-frames", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Compute bound on cpu" in done.stdout and "norms folded (used)" in done.stdout
    assert "### Routing: the key search alone (brick, grass; 8 frames" in done.stdout
    assert "### Model path on cpu" in done.stdout and "brick (expert at efficientnet_lite0" in done.stdout
    assert done.stdout.count("| patchcore |") == 4  # per category: batch 2 at 10 tasks, then 1 task at batch 2
