"""SimpleNet: its loss, state bytes, reproducibility, and detection of synthetic defects with the
pretrained backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fit_and_predict, load_pixels
from pipeline.data.datasets import train_images, write_synthetic_category
from pipeline.data.metrics import pixel_metrics, roc_auc
from pipeline.experts import build_expert
from pipeline.experts.simplenet import SimpleNet, SimpleNetConfig
from pipeline.experts.simplenet.torch_model import truncated_l1
from pipeline.features.backbone import Backbone
from schemas.config import ModelConfig

IMAGE_SIZE = 128
CONFIG = SimpleNetConfig(steps_per_round=50, max_rounds=4, patience=2, patch_batch=512, seed=0)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_truncated_l1_is_zero_only_past_the_margins() -> None:
    assert float(truncated_l1(torch.tensor([0.6, 1.0]), torch.tensor([-0.7]), 0.5)) == 0.0
    assert float(truncated_l1(torch.tensor([0.0]), torch.tensor([0.0]), 0.5)) == pytest.approx(1.0)


def test_unfitted_expert_refuses() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        SimpleNet().to_bytes()
    assert isinstance(build_expert("simplenet", ModelConfig()), SimpleNet)


@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("simplenet")
    write_synthetic_category(root, "brick", "brick", n_train=16, n_test_good=8, n_test_defect=8, size=IMAGE_SIZE, seed=4)
    return root


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.pretrained()


@pytest.fixture(scope="module")
def fitted(backbone: Backbone, brick: Path) -> tuple[SimpleNet, dict]:
    expert = SimpleNet(CONFIG)
    return expert, fit_and_predict(expert, backbone, brick, "brick", IMAGE_SIZE)


def test_detects_synthetic_defects_with_positive_scores_and_frame_sized_maps(fitted) -> None:
    expert, out = fitted
    assert out["maps"].shape == (16, IMAGE_SIZE, IMAGE_SIZE) and (out["scores"] > 0).all()
    assert roc_auc(out["labels"], out["scores"]) > 0.8
    assert pixel_metrics(out["masks"], list(out["maps"]))["pixel_auroc"] > 0.8
    summary = expert.fit_summary()
    assert summary["epochs_run"] <= CONFIG.max_rounds and 0 <= summary["best_epoch"] < summary["epochs_run"]


def test_state_round_trip_and_reproducible_fit(fitted, backbone: Backbone, brick: Path) -> None:
    expert, out = fitted
    data = expert.to_bytes()
    again = SimpleNet.from_bytes(data)
    assert again.to_bytes() == data
    test = [load_pixels(p, IMAGE_SIZE) for p in train_images(brick, "brick")[:4]]
    batch = backbone.extract(test)
    np.testing.assert_array_equal(again.predict(batch).scores, expert.predict(batch).scores)
    state = torch.random.get_rng_state()
    refit = SimpleNet(CONFIG)
    fit_and_predict(refit, backbone, brick, "brick", IMAGE_SIZE)
    assert refit.to_bytes() == data and torch.equal(torch.random.get_rng_state(), state)
