"""The continual benchmark: tasks learnt in sequence, task identity inferred per frame, forgetting, oracle."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.features.backbone import Backbones
from pipeline.core.calibration import Calibration
from pipeline.evaluation.continual import (
    METRICS,
    StepResult,
    TaskSource,
    forgetting,
    markdown_report,
    run_continual_benchmark,
    synthetic_task_keys,
)
from pipeline.data.datasets import SYNTHETIC_TEXTURES, write_synthetic_category
from pipeline.core.task import TaskArtifacts
from schemas.config import ModelConfig, TrainingConfig

IMAGE_SIZE = 112
MODEL = ModelConfig(image_size=IMAGE_SIZE, coreset_ratio=0.1, num_keys=16, seed=0)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _row(value: float) -> dict[str, float]:
    return {m: value for m in METRICS}


def test_forgetting_is_best_earlier_minus_final() -> None:
    steps = [
        StepResult(0, "a", 1.0, 1, {"a": _row(0.90)}),
        StepResult(1, "b", 1.0, 1, {"a": _row(0.95), "b": _row(0.80)}),
        StepResult(2, "c", 1.0, 1, {"a": _row(0.91), "b": _row(0.70), "c": _row(0.99)}),
    ]
    fm = forgetting(steps, ["a", "b", "c"])
    assert fm["image_auroc"] == pytest.approx(((0.95 - 0.91) + (0.80 - 0.70)) / 2)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("continual")
    sources = []
    for texture in SYNTHETIC_TEXTURES:
        write_synthetic_category(root, texture, texture, n_train=10, n_test_good=4, n_test_defect=4, size=128, seed=1)
        sources.append(TaskSource(texture, root))
    return run_continual_benchmark(sources, Backbones.pretrained(), MODEL, TrainingConfig(batch_size=8), expert="patchcore",
                                   timing_tasks=(1, 3, 10))


def test_every_seen_task_is_evaluated_after_each_step(report) -> None:
    assert report.tasks == list(SYNTHETIC_TEXTURES)
    assert [sorted(s.rows) for s in report.steps] == [sorted(SYNTHETIC_TEXTURES[: i + 1]) for i in range(3)]
    for step in report.steps:
        assert step.train_seconds > 0 and step.task_bytes > 0
        assert step.expert == "patchcore" and "letterbox" in step.spec
        for row in step.rows.values():
            assert set(METRICS) <= set(row) and all(0.0 <= row[m] <= 1.0 for m in METRICS)


def test_textures_are_identified_and_nothing_is_forgotten(report) -> None:
    # Three very different textures: identification is perfect, so the continual numbers equal the oracle.
    assert report.final_average["task_id_accuracy"] == 1.0
    for metric in ("image_auroc", "pixel_auroc", "pixel_ap"):
        assert report.final_average[metric] == pytest.approx(report.oracle_average[metric])
        assert report.forgetting[metric] == pytest.approx(0.0, abs=1e-12)
    assert report.oracle_average["image_auroc"] > 0.6  # 8 test frames a task: better than chance, no more


def test_task_identification_is_timed_for_each_task_count(report) -> None:
    assert [r["tasks"] for r in report.task_id_timing] == [1, 3, 10]
    for row in report.task_id_timing:
        assert row["search_ms_per_frame"] > 0 and row["total_ms_per_frame"] > row["search_ms_per_frame"]
    assert report.task_id_timing[0]["total_ratio"] == 1.0
    table = markdown_report(report)
    assert "forgetting FM" in table and "oracle (task given)" in table


def test_synthetic_keys_top_up_real_tasks() -> None:
    rng = np.random.default_rng(0)
    real = {"a": TaskArtifacts("a", "patchcore", rng.normal(size=(4, 3)).astype(np.float32), b"",
                               Calibration((0.0,), (0.0,), 0.01, 0.0, 0.0, 2.0))}
    keys, bounds = synthetic_task_keys(real, 5, seed=0)
    assert len(keys) == 5 and np.array_equal(keys["a"], real["a"].keys)
    assert all(k.shape == (4, 3) for k in keys.values()) and set(bounds.values()) == {2.0}
    assert len({k.tobytes() for k in keys.values()}) == 5  # distinct tasks
