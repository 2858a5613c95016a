"""Routing at other key-pass sizes (pipeline.evaluation.routing_sizes) on small synthetic categories."""

from __future__ import annotations

import math

import pytest

from pipeline.data.datasets import SYNTHETIC_TEXTURES, write_synthetic_category
from pipeline.evaluation.continual import TaskSource
from pipeline.evaluation.routing_sizes import markdown_table, measure_routing_sizes
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, TrainingConfig

pytestmark = pytest.mark.slow  # loads the pretrained ViT and runs it at two sizes
SIZES = (112, 140)
TEST_FRAMES = 6  # 3 good + 3 defective a category


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[TaskSource]:
    root = tmp_path_factory.mktemp("synthetic")
    for texture in SYNTHETIC_TEXTURES:
        write_synthetic_category(root, f"synthetic_{texture}", texture, n_train=12, n_test_good=3, n_test_defect=3,
                                 size=64, seed=0)
    return [TaskSource(f"synthetic_{t}", root) for t in SYNTHETIC_TEXTURES]


@pytest.fixture(scope="module")
def rows(sources, one_torch_thread):
    return measure_routing_sizes(sources, Backbones.pretrained(), ModelConfig(), TrainingConfig(), SIZES)


def test_one_row_per_size_and_product_in_order(rows, sources):
    assert [(r.size, r.product) for r in rows] == [(s, p.category) for s in SIZES for p in sources]
    assert {r.size: r.tokens for r in rows} == {112: 64, 140: 100}  # (side / 14) ** 2 patch tokens
    assert all(r.frames == TEST_FRAMES for r in rows)


def test_rates_are_fractions_and_margins_are_positive(rows):
    for r in rows:
        assert 0.0 <= r.task_id_accuracy <= 1.0 and 0.0 <= r.unknown_rejection <= 1.0
        for ratio in (r.other_over_own_median, r.other_over_own_p5, r.own_over_bound_median, r.own_over_bound_p95,
                      r.left_out_over_bound_p5):
            assert math.isfinite(ratio) and ratio > 0
        assert r.gflop_per_frame > 0 and r.ms_per_frame > 0


def test_smaller_pass_counts_less_work(rows):
    gflop = {r.size: r.gflop_per_frame for r in rows}
    assert gflop[112] < gflop[140]


def test_the_table_has_a_line_per_row(rows):
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| 112x112 | 64 |" in table[2]


def test_capped_test_frames_are_a_sample_of_that_many(sources, one_torch_thread):
    capped = measure_routing_sizes(sources, Backbones.pretrained(), ModelConfig(), TrainingConfig(), (112,), max_test_frames=4)
    assert [r.frames for r in capped] == [4] * len(sources)


def test_one_product_cannot_measure_unknown_rejection(sources):
    with pytest.raises(ValueError, match="two products"):
        measure_routing_sizes(sources[:1], None, ModelConfig(), TrainingConfig(), SIZES)
