"""PANDA: its torch parts, state bytes, what fit may look at, EWC, and detection quality with the
pretrained backbone against a random-weights control, on square and non-square inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline.experts.panda.expert as panda_module
from pipeline.common.serialization import array_sizes, unpack
from pipeline.data.datasets import labeled_test_images, read_mask, train_images, write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts.base import config_from_dict
from pipeline.experts.panda import PANDA, PANDAConfig
from pipeline.experts.panda.torch_model import (
    ImageNetClassifier,
    PANDANet,
    auroc,
    build_networks,
    diagonal_fisher,
    ewc_penalty,
    knn_scores,
    log_separation,
    spade_maps,
    validation_loss,
)
from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.features.imaging import decode_image, resize_rgb
from helpers import load_pixels

IMAGE_SIZE = 128
WIDE = (96, 160)  # a non-square fit size (H x W)
CATEGORY = "brick"
# Small and quick: 24 images of 128 px, a Fisher of 8 images, the default optimiser settings.
CONFIG = PANDAConfig(max_epochs=2, patience=2, fisher_images=8, seed=0)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def backbone_digest(backbone: Backbone) -> str:
    digest = hashlib.sha256()
    for key, value in backbone.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- torch parts
def test_knn_scores_are_the_mean_of_the_k_nearest_distances() -> None:
    g = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g)
    distances = torch.linalg.vector_norm(query[:, None] - gallery[None], dim=-1)
    expected = distances.sort(dim=1).values[:, :2].mean(dim=1)
    assert torch.allclose(knn_scores(query, gallery, 2), expected, atol=1e-5)
    # k is capped by the gallery size
    assert torch.allclose(knn_scores(query, gallery[:1], 2), distances[:, 0], atol=1e-5)


def test_spade_maps_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    query_maps, query_globals = torch.randn(3, 4, 2, 5, generator=g), torch.randn(3, 6, generator=g)
    gallery_globals, gallery_maps = torch.randn(7, 6, generator=g), torch.randn(7, 9, 4, generator=g)
    out = spade_maps(query_maps, query_globals, gallery_globals, gallery_maps, k_images=3)
    assert out.shape == (3, 2, 5)
    for i in range(3):
        nearest = torch.linalg.vector_norm(gallery_globals - query_globals[i], dim=1).argsort()[:3]
        candidates = gallery_maps[nearest].reshape(-1, 4)
        for y in range(2):
            for x in range(5):
                best = torch.linalg.vector_norm(candidates - query_maps[i, :, y, x], dim=1).min()
                assert abs(float(out[i, y, x]) - float(best)) < 1e-5


def test_validation_loss_orders_by_auroc_then_by_separation() -> None:
    normal = torch.tensor([1.0, 1.1, 1.2, 0.9])
    assert auroc(normal, torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(normal, torch.tensor([1.0, 1.0])) == pytest.approx(0.375)
    perfect_near, perfect_far = torch.tensor([1.5, 1.6]), torch.tensor([3.0, 4.0])
    # both AUROC 1: the farther anomalies win; a lower AUROC loses whatever its separation
    assert validation_loss(normal, perfect_far) < validation_loss(normal, perfect_near) < 0.0
    one_swap = torch.tensor([1.15, 100.0])  # AUROC 7/8, far larger separation
    assert log_separation(normal, one_swap) > log_separation(normal, perfect_far)
    assert validation_loss(normal, perfect_near) < validation_loss(normal, one_swap)
    # the separation is scale-free: shrinking every distance alike changes nothing
    assert log_separation(0.1 * normal, 0.1 * perfect_far) == pytest.approx(log_separation(normal, perfect_far))


def _toy_classifier() -> ImageNetClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blocks = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 4, 1))
        return ImageNetClassifier(PANDANet(blocks, 0, nn.Conv2d(4, 5, 1), nn.Identity()), nn.Linear(5, 3)).eval()


def test_diagonal_fisher_is_the_expected_squared_score_under_the_models_own_labels() -> None:
    classifier = _toy_classifier()
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    params = list(classifier.net.parameters())
    exact = [torch.zeros_like(p) for p in params]
    for xi in x:  # E_y~p(y|x) (d log p(y|x))^2, summed exactly over the 3 classes
        log_probs = torch.log_softmax(classifier(xi[None]), dim=1)[0]
        for y in range(3):
            grads = torch.autograd.grad(log_probs[y], params, retain_graph=True)
            for e, gr in zip(exact, grads):
                e.add_(log_probs[y].exp().detach() * gr.pow(2) / len(x))
    sampled = diagonal_fisher(classifier, x, torch.Generator().manual_seed(3), samples_per_image=3000)
    assert list(sampled) == [n for n, _ in classifier.net.named_parameters()]
    for e, s in zip(exact, sampled.values()):
        assert torch.allclose(s, e, rtol=0.1, atol=1e-3 * float(e.abs().max()))
    # EWC's penalty is 1/2 sum F (theta - theta*)^2
    anchor = {n: p.detach().clone() for n, p in classifier.net.named_parameters()}
    moved = {n: p + 0.1 for n, p in anchor.items()}
    expected = 0.5 * sum(float((sampled[n] * 0.01).sum()) for n in anchor)
    assert float(ewc_penalty(moved.items(), anchor, sampled)) == pytest.approx(expected, rel=1e-5)


def test_networks_start_after_stage_two_and_give_stage_three_maps() -> None:
    net, classifier = build_networks("tf_efficientnet_lite0")
    assert [k for k, _ in net.blocks.named_children()] == ["3", "4", "5", "6"] and net.map_index == 1
    with torch.no_grad():
        maps, globals_ = net(torch.rand(2, 40, 6, 10))
    assert maps.shape == (2, 112, 3, 5) and globals_.shape == (2, 1280)
    assert classifier.out_features == 1000 and not net.training


def test_config_validation_and_unfitted_expert() -> None:
    with pytest.raises(ValueError):
        PANDAConfig(num_neighbors=0)
    with pytest.raises(ValueError):
        PANDAConfig(ewc_lambda=-1.0)
    config = PANDAConfig(max_epochs=1, ewc_lambda=0.0)
    assert config_from_dict(PANDAConfig, dataclasses.asdict(config)) == config
    assert PANDA.name == "panda" and PANDA.square_inputs is False
    with pytest.raises(RuntimeError):
        PANDA().to_bytes()
    with pytest.raises(RuntimeError):
        PANDA().predict(FeatureBatch(torch.rand(1, 3, 32, 32), {2: torch.rand(1, 40, 4, 4)}))
    with pytest.raises(ValueError):
        PANDA().fit([], None)


# ---------------------------------------------------------------------------------- fitted expert
@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("panda_data")
    write_synthetic_category(root, CATEGORY, CATEGORY, n_train=24, n_test_good=10, n_test_defect=10,
                             size=IMAGE_SIZE, seed=1)  # fmt: skip
    return root


def _embed(backbone: Backbone, root: Path, hw: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> dict:
    load = (lambda p: load_pixels(p, hw[0])) if hw[0] == hw[1] else (
        lambda p: resize_rgb(decode_image(p.read_bytes(), 40_000_000), hw[0], hw[1]))  # fmt: skip
    train = [load(p) for p in train_images(root, CATEGORY)]
    items = labeled_test_images(root, CATEGORY)
    test = [load(item.path) for item in items]
    return {
        "backbone": backbone,
        "train": [backbone.extract(train[i : i + 8], keys=False) for i in range(0, len(train), 8)],
        "test": [backbone.extract(test[i : i + 10], keys=False) for i in range(0, len(test), 10)],
        "labels": [item.is_anomalous for item in items],
        "masks": np.stack([read_mask(item.mask_path, hw) for item in items]),
    }


def _fit(data: dict, config: PANDAConfig = CONFIG) -> PANDA:
    expert = PANDA(config)
    expert.fit(data["train"], data["backbone"])
    return expert


def _outputs(expert: PANDA, data: dict) -> tuple[np.ndarray, np.ndarray]:
    outputs = [expert.predict(b) for b in data["test"]]
    return np.concatenate([o.scores for o in outputs]), np.concatenate([o.maps for o in outputs])


@pytest.fixture(scope="module")
def pretrained(brick: Path) -> dict:
    data = _embed(Backbone.pretrained(image_size=IMAGE_SIZE), brick)
    data["digest"] = backbone_digest(data["backbone"])
    data["expert"] = _fit(data)
    return data


def test_predict_shapes_and_report(pretrained: dict) -> None:
    expert, batch = pretrained["expert"], pretrained["test"][0]
    output = expert.predict(batch)
    assert output.scores.shape == (10,) and output.scores.dtype == np.float32
    assert output.maps.shape == (10, IMAGE_SIZE, IMAGE_SIZE) and output.maps.dtype == np.float32
    assert np.isfinite(output.maps).all() and (output.maps >= 0).all() and (output.scores >= 0).all()
    assert not expert.net.training
    # a batch's scores do not depend on the other images in it
    single = expert.predict(batch.select([0]))
    np.testing.assert_allclose(single.scores, output.scores[:1], rtol=1e-5)
    np.testing.assert_allclose(single.maps, output.maps[:1], rtol=1e-4, atol=1e-5)
    report = expert.fit_report
    assert report.num_images == 24 and len(report.validation_indices) == 4
    assert sorted(report.train_indices + report.validation_indices) == list(range(24))
    assert report.history[0]["epoch"] == 0 and report.history[0]["weight_shift"] == 0.0
    assert 2 <= len(report.history) <= CONFIG.max_epochs + 1
    summary = expert.fit_summary()
    assert summary["best_epoch"] == report.best_epoch and summary["num_validation_images"] == 4
    assert summary["map_images"] == 24  # 24 small images fit the state budget


def test_state_round_trip_gives_identical_predictions_and_bytes(pretrained: dict) -> None:
    expert = pretrained["expert"]
    state = expert.to_bytes()
    assert state == expert.to_bytes()
    loaded = PANDA.from_bytes(state)
    assert loaded.config == expert.config
    assert loaded.to_bytes() == state
    for batch in pretrained["test"]:
        a, b = expert.predict(batch), loaded.predict(batch)
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    _, arrays = unpack(state)
    assert arrays["gallery_maps"].dtype == np.float16 and arrays["gallery_globals"].dtype == np.float32
    net = {k: a for k, a in arrays.items() if k.startswith("net.")}
    assert net and all((a.dtype == np.float16) == (a.ndim >= 2) for k, a in net.items() if "num_batches" not in k)
    assert sum(array_sizes(state).values()) < 10e6  # lite0 blocks 3-6 + head in float16 are ~6.6 MB
    with pytest.raises(ValueError):
        PANDA.from_bytes(state.replace(b'"expert":"panda"', b'"expert":"nope"'))


def test_fit_sees_only_fit_images_and_is_reproducible(pretrained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Early stopping looks at held-out fit images and synthetic anomalies made of exactly those: every
    image fit gives the synthetic generator is a held-out fit image, and every image fit runs through the
    backbone is one of the generator's outputs."""
    made_from, made, embedded = [], [], []
    real_synthesize, real_forward = panda_module.synthesize, Backbone.forward

    def spy_synthesize(pixels, generator):
        made_from.append(pixels.clone())
        out = real_synthesize(pixels, generator)
        made.append(out[0].clone())
        return out

    def spy_forward(self, pixels, *args, **kwargs):
        embedded.append(pixels.detach().cpu().clone())
        return real_forward(self, pixels, *args, **kwargs)

    monkeypatch.setattr(panda_module, "synthesize", spy_synthesize)
    monkeypatch.setattr(Backbone, "forward", spy_forward)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = _fit(pretrained)
    assert torch.equal(torch.rand(3), expected), "fit must not consume the caller's global RNG"
    assert again.to_bytes() == pretrained["expert"].to_bytes()

    fit_pixels = torch.cat([b.pixels for b in pretrained["train"]])
    val = again.fit_report.validation_indices
    assert val and not set(val) & set(again.fit_report.train_indices)
    assert torch.equal(torch.cat(made_from), fit_pixels[val * CONFIG.anomalies_per_image])
    assert torch.equal(torch.cat(embedded), torch.cat(made))


def test_the_shared_backbone_is_untouched(pretrained: dict) -> None:
    backbone = pretrained["backbone"]
    _fit(pretrained, dataclasses.replace(CONFIG, learning_rate=2e-5, max_epochs=1))  # large steps too
    assert backbone_digest(backbone) == pretrained["digest"]
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
    expert = pretrained["expert"]
    shared = {t.data_ptr() for t in backbone.state_dict().values()}
    assert not any(t.data_ptr() in shared for t in expert.net.state_dict().values()), "a private copy, no aliasing"


def test_ewc_keeps_the_weights_closer_to_the_pretrained_ones(pretrained: dict) -> None:
    # steps ten times the default, every epoch run: without EWC the weights drift further
    config = dataclasses.replace(CONFIG, learning_rate=2e-6, max_epochs=3, patience=3)
    free = _fit(pretrained, dataclasses.replace(config, ewc_lambda=0.0)).fit_report.history
    held = _fit(pretrained, dataclasses.replace(config, ewc_lambda=1e5)).fit_report.history
    assert len(free) == len(held) == 4 and free[0]["ewc_kl"] is None
    for a, b in zip(free[1:], held[1:]):
        assert 0.0 < b["weight_shift"] < a["weight_shift"], (a, b)
        assert b["compactness"] > a["compactness"], (a, b)  # the price: less compaction
        assert 0.0 <= b["ewc_kl"] < 1e-3


def test_pretrained_panda_detects_synthetic_defects_and_beats_random_weights(pretrained: dict, brick: Path) -> None:
    labels = pretrained["labels"]
    assert sum(labels) == 10 and len(labels) == 20
    scores, maps = _outputs(pretrained["expert"], pretrained)
    auroc_image = roc_auc(labels, scores)
    auroc_pixel = roc_auc(pretrained["masks"].ravel(), maps.ravel())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_backbone = Backbone()
    control = _embed(random_backbone, brick)
    control_scores, control_maps = _outputs(_fit(control), control)
    control_image = roc_auc(labels, control_scores)
    control_pixel = roc_auc(control["masks"].ravel(), control_maps.ravel())
    assert auroc_image >= 0.9 and auroc_pixel >= 0.9, (auroc_image, auroc_pixel)
    assert auroc_image > control_image + 0.05, (auroc_image, control_image)
    assert auroc_pixel > control_pixel + 0.05, (auroc_pixel, control_pixel)


def test_non_square_batches(pretrained: dict, brick: Path) -> None:
    data = _embed(pretrained["backbone"], brick, WIDE)
    assert data["train"][0].pixels.shape[-2:] == WIDE
    expert = _fit(data, dataclasses.replace(CONFIG, max_epochs=1))
    assert expert.fit_report.num_images == 24
    scores, maps = _outputs(expert, data)
    assert maps.shape == (20, *WIDE) and np.isfinite(maps).all()
    assert roc_auc(data["labels"], scores) >= 0.8
    assert roc_auc(data["masks"].ravel(), maps.ravel()) >= 0.8
    # any other shape at predict time, taller than wide: SPADE matches locations, not grid positions
    tall = F.interpolate(data["test"][0].pixels, size=(160, 96), mode="bilinear", align_corners=False)
    output = expert.predict(pretrained["backbone"](tall, keys=False))
    assert output.maps.shape == (10, 160, 96) and output.scores.shape == (10,)
    loaded = PANDA.from_bytes(expert.to_bytes())
    assert np.array_equal(loaded.predict(data["test"][1]).maps, expert.predict(data["test"][1]).maps)


def test_map_gallery_keeps_to_the_state_budget(pretrained: dict) -> None:
    expert = pretrained["expert"]
    full = expert.to_bytes()
    per_image = expert.gallery_maps[0].numel() * 2
    budget_mb = (len(full) - 14 * per_image) / 1e6 + 0.2  # room for the weights and ~10 of the 24 maps
    capped = PANDA(dataclasses.replace(expert.config, max_state_mb=budget_mb))
    capped._build_gallery(expert.net, torch.cat([b.stages[2] for b in pretrained["train"]]).float())
    capped.net, capped.timm_name, capped.summary = expert.net, expert.timm_name, expert.summary
    kept = capped.map_images.tolist()
    assert CONFIG.map_neighbors <= len(kept) < 24 and kept == sorted(set(kept))
    assert len(capped.to_bytes()) <= budget_mb * 1e6
    assert torch.equal(capped.gallery_maps, expert.gallery_maps[capped.map_images])
    assert math.isfinite(float(capped.predict(pretrained["test"][0]).maps.max()))
