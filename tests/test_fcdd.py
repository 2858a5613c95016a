"""FCDD: its torch parts, state bytes, reproducibility, and detection quality with the pretrained backbone."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features.backbone import Backbone
from pipeline.data.datasets import labeled_test_images, train_images, write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts.base import config_from_dict
from pipeline.experts.fcdd import FCDD, FCDDConfig
from pipeline.experts.fcdd.torch_model import (
    FCDDHead,
    fcdd_features,
    gaussian_kernel,
    per_sample_loss,
    pseudo_huber,
    receptive_upsample,
)
from helpers import load_pixels

IMAGE_SIZE = 128
CATEGORY = "brick"
# Small and quick: a few epochs on ~24 images of 128 px.
CONFIG = FCDDConfig(max_epochs=8, patience=3, batch_size=8, seed=0)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------- torch parts
def test_pseudo_huber_and_loss_values() -> None:
    phi = torch.tensor([0.0, 1.0, -2.0])
    assert torch.allclose(pseudo_huber(phi), torch.sqrt(phi**2 + 1) - 1)
    heatmaps = torch.full((2, 1, 3, 3), 0.5)
    loss = per_sample_loss(heatmaps, torch.tensor([False, True]))
    assert torch.allclose(loss, torch.tensor([0.5, -math.log(1 - math.exp(-0.5))]))
    # an anomaly with A == 0 everywhere gets a large but finite loss
    assert torch.isfinite(per_sample_loss(torch.zeros(1, 1, 2, 2), torch.tensor([True]))).all()


@pytest.mark.parametrize("kernel_size", [68, 24, 8])
def test_receptive_upsample_is_the_normalised_transposed_convolution(kernel_size: int) -> None:
    heatmaps = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    stride, size, sigma = 8, 128, 12.0
    kernel = gaussian_kernel(kernel_size, sigma)[None, None]
    summed = F.conv_transpose2d(heatmaps, kernel, stride=stride)
    weight = F.conv_transpose2d(torch.ones(1, 1, 16, 16), kernel, stride=stride)
    start = (kernel_size - stride) // 2  # each cell's kernel centred on the centre of its 8 x 8 patch
    reference = (summed / weight)[:, 0, start : start + size, start : start + size]
    ours = receptive_upsample(heatmaps, (size, size), stride, kernel_size, sigma)
    assert ours.shape == (3, size, size)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_receptive_upsample_keeps_constants_and_fits_any_size() -> None:
    # 100 px input: a ceil(100 / 8) = 13 cell grid ("same" padding); the map is exactly 100 x 100
    out = receptive_upsample(torch.full((2, 1, 13, 13), 0.7), (100, 100), 8, 68, 12.0)
    assert out.shape == (2, 100, 100)
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)
    # a single hot cell peaks over its own patch
    hot = torch.zeros(1, 1, 16, 16)
    hot[0, 0, 4, 10] = 1.0
    peak = receptive_upsample(hot, (128, 128), 8, 68, 12.0)[0]
    y, x = divmod(int(peak.argmax()), 128)
    assert 4 * 8 <= y < 5 * 8 and 10 * 8 <= x < 11 * 8


def test_head_and_features_shapes() -> None:
    stages = {2: torch.rand(2, 40, 16, 16), 3: torch.rand(2, 112, 8, 8)}
    features = fcdd_features(stages, (2, 3))
    assert features.shape == (2, 152, 16, 16)
    with torch.no_grad():
        out = FCDDHead(152, (32, 16)).eval()(features)
    assert out.shape == (2, 1, 16, 16) and float(out.min()) >= 0.0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        FCDDConfig(image_score="median")
    with pytest.raises(ValueError):
        FCDDConfig(stages=(3, 2))
    config = FCDDConfig(hidden_channels=(8, 4), stages=(2,))
    assert config_from_dict(FCDDConfig, dataclasses.asdict(config)) == config


def test_unfitted_expert_refuses() -> None:
    with pytest.raises(RuntimeError):
        FCDD().to_bytes()
    with pytest.raises(ValueError):
        FCDD().fit([], None)


# ---------------------------------------------------------------------------------- fitted expert
@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fcdd_data")
    write_synthetic_category(root, CATEGORY, CATEGORY, n_train=24, n_test_good=10, n_test_defect=10,
                             size=IMAGE_SIZE, seed=1)  # fmt: skip
    return root


def _embed(backbone: Backbone, root: Path) -> dict:
    train = [load_pixels(p, IMAGE_SIZE) for p in train_images(root, CATEGORY)]
    items = labeled_test_images(root, CATEGORY)
    test = [load_pixels(item.path, IMAGE_SIZE) for item in items]
    return {
        "backbone": backbone,
        "train": [backbone.extract(train[i : i + 8]) for i in range(0, len(train), 8)],
        "test": [backbone.extract(test[i : i + 10]) for i in range(0, len(test), 10)],
        "labels": [item.is_anomalous for item in items],
    }


def _fit(data: dict, config: FCDDConfig = CONFIG) -> FCDD:
    expert = FCDD(config)
    expert.fit(data["train"], data["backbone"])
    return expert


def _scores(expert: FCDD, data: dict) -> np.ndarray:
    return np.concatenate([expert.predict(b).scores for b in data["test"]])


@pytest.fixture(scope="module")
def pretrained(brick: Path) -> dict:
    data = _embed(Backbone.pretrained(image_size=IMAGE_SIZE), brick)
    data["expert"] = _fit(data)
    return data


def test_predict_shapes_and_eval_mode(pretrained: dict) -> None:
    expert, batch = pretrained["expert"], pretrained["test"][0]
    output = expert.predict(batch)
    assert output.scores.shape == (10,) and output.scores.dtype == np.float32
    assert output.maps.shape == (10, IMAGE_SIZE, IMAGE_SIZE) and output.maps.dtype == np.float32
    assert np.isfinite(output.maps).all() and (output.maps >= 0).all()
    assert not expert.net.training
    # eval mode: a batch's scores do not depend on the other images in it
    single = expert.predict(type(batch)(batch.pixels[:1], {s: t[:1] for s, t in batch.stages.items()}))
    np.testing.assert_allclose(single.scores, output.scores[:1], rtol=1e-5)
    report = expert.fit_report
    assert report.num_images == 24 and len(report.validation_indices) == 4
    assert not set(report.train_indices) & set(report.validation_indices)
    assert 1 <= len(report.history) <= CONFIG.max_epochs


def test_state_round_trip_gives_identical_predictions_and_bytes(pretrained: dict) -> None:
    expert = pretrained["expert"]
    state = expert.to_bytes()
    assert state == expert.to_bytes()
    loaded = FCDD.from_bytes(state)
    assert loaded.config == expert.config
    assert loaded.to_bytes() == state
    for batch in pretrained["test"]:
        a, b = expert.predict(batch), loaded.predict(batch)
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    with pytest.raises(ValueError):
        FCDD.from_bytes(state.replace(b'"expert":"fcdd"', b'"expert":"nope"'))


def test_fit_is_reproducible_and_leaves_the_global_rng_alone(pretrained: dict) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = _fit(pretrained)
    assert torch.equal(torch.rand(3), expected), "fit must not consume the caller's global RNG"
    assert again.to_bytes() == pretrained["expert"].to_bytes()


def test_pretrained_fcdd_detects_synthetic_defects_and_beats_random_weights(pretrained: dict, brick: Path) -> None:
    labels = pretrained["labels"]
    assert sum(labels) == 10 and len(labels) == 20
    auroc = roc_auc(labels, _scores(pretrained["expert"], pretrained))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_backbone = Backbone()
    control = _embed(random_backbone, brick)
    control_auroc = roc_auc(labels, _scores(_fit(control), control))
    assert auroc >= 0.85, (auroc, control_auroc)
    assert auroc > control_auroc + 0.05, (auroc, control_auroc)
