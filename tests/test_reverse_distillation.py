"""Reverse Distillation: state bytes, seeded fitting, early stopping on normal images only, and detection
quality with the real pretrained backbone against a random-weights control."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.data.datasets import write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts.reverse_distillation import ReverseDistillation, ReverseDistillationConfig
from pipeline.experts.reverse_distillation.expert import split_indices
from pipeline.experts.reverse_distillation.torch_model import ReverseDistillationNet, anomaly_maps
from pipeline.common.serialization import pack
from helpers import fit_and_predict

pytestmark = pytest.mark.slow

IMAGE_SIZE = 128
CATEGORY = "brick"
TINY = dict(embedding_channels=16, decoder_channels=(8, 8, 16), batch_size=4)  # fast unit-test model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions on a shared 2-core machine: a second intra-op thread mostly waits (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batch(n: int, seed: int, size: int = 64) -> FeatureBatch:
    """A FeatureBatch with the backbone's stage shapes (TF 'same' padding rounds grids up), random values."""
    g = torch.Generator().manual_seed(seed)
    channels = {1: 24, 2: 40, 3: 112, 4: 320}
    return FeatureBatch(
        pixels=torch.rand(n, 3, size, size, generator=g),
        stages={s: torch.randn(n, c, -(-size // 2 ** (s + 1)), -(-size // 2 ** (s + 1)), generator=g)
                for s, c in channels.items()},
    )  # fmt: skip


def fitted(config: ReverseDistillationConfig, batches: list[FeatureBatch]) -> ReverseDistillation:
    expert = ReverseDistillation(config)
    expert.fit(batches, backbone=None)
    return expert


# ------------------------------------------------------------------------------------- state bytes
def test_state_round_trip_gives_identical_predictions() -> None:
    config = ReverseDistillationConfig(**TINY, max_epochs=2, map_sigma=2.0, seed=3)
    batches = [random_batch(5, seed=0), random_batch(3, seed=1)]
    expert = fitted(config, batches)
    data = expert.to_bytes()
    assert expert.to_bytes() == data  # deterministic for one object

    loaded = ReverseDistillation.from_bytes(data)
    assert loaded.config == config and loaded.summary == expert.summary
    assert loaded.to_bytes() == data  # identical bytes on re-serialisation
    query = random_batch(4, seed=9)
    before, after = expert.predict(query), loaded.predict(query)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.maps, before.maps)
    assert before.scores.shape == (4,) and before.scores.dtype == np.float32
    assert before.maps.shape == (4, 64, 64) and before.maps.dtype == np.float32
    assert np.isfinite(before.maps).all() and (before.maps >= 0).all()
    # the image score is the max of the smoothed map
    np.testing.assert_array_equal(before.scores, before.maps.reshape(4, -1).max(axis=1))
    assert not loaded.net.training  # BN uses its running statistics


def test_state_errors() -> None:
    with pytest.raises(RuntimeError):
        ReverseDistillation().to_bytes()
    with pytest.raises(RuntimeError):
        ReverseDistillation().predict(random_batch(1, seed=0))
    with pytest.raises(ValueError, match="expert"):
        ReverseDistillation.from_bytes(pack({"expert": "patchcore", "config": {}}, {"bank": np.zeros(2, np.float32)}))


def test_fit_is_reproducible_for_a_seed() -> None:
    batches = [random_batch(4, seed=0), random_batch(4, seed=1)]
    base = dict(TINY, max_epochs=3)
    data = fitted(ReverseDistillationConfig(**base, seed=5), batches).to_bytes()
    assert fitted(ReverseDistillationConfig(**base, seed=5), batches).to_bytes() == data
    assert fitted(ReverseDistillationConfig(**base, seed=6), batches).to_bytes() != data


def test_input_size_not_a_multiple_of_32() -> None:
    expert = fitted(ReverseDistillationConfig(**TINY, max_epochs=1), [random_batch(4, seed=0, size=100)])
    out = expert.predict(random_batch(2, seed=1, size=100))
    assert out.maps.shape == (2, 100, 100) and np.isfinite(out.maps).all()


# --------------------------------------------------------------------------- early stopping, data
def test_split_is_deterministic_disjoint_and_at_least_two() -> None:
    config = ReverseDistillationConfig(validation_fraction=0.15, seed=1)
    train, val = split_indices(160, config)
    assert len(val) == 24 and sorted(train + val) == list(range(160))
    assert split_indices(160, config) == (train, val)
    assert len(split_indices(6, config)[1]) == 2  # at least two held out
    assert split_indices(3, config) == ([0, 1, 2], [])  # too few: nothing held out


def test_training_and_validation_see_only_the_given_normal_images(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [random_batch(7, seed=0), random_batch(6, seed=1)]
    given = torch.cat([b.stages[3] for b in batches])  # 13 images
    seen: list[tuple[bool, torch.Tensor]] = []
    forward = ReverseDistillationNet.forward

    def recording_forward(self, teacher):
        seen.append((self.training, teacher[2].detach().clone()))
        return forward(self, teacher)

    monkeypatch.setattr(ReverseDistillationNet, "forward", recording_forward)
    expert = fitted(ReverseDistillationConfig(**TINY, max_epochs=3, validation_fraction=0.2), batches)
    report = expert.fit_report
    assert report.num_images == 13 and len(report.validation_indices) == 3
    assert set(report.train_indices).isdisjoint(report.validation_indices)
    assert sorted(report.train_indices + report.validation_indices) == list(range(13))

    def rows(x: torch.Tensor) -> set[int]:
        matches = [[i for i in range(len(given)) if torch.equal(row, given[i])] for row in x]
        assert all(len(m) == 1 for m in matches), "the model saw features that are not one of the given images"
        return {m[0] for m in matches}

    trained = set().union(*(rows(x) for training, x in seen if training))
    validated = set().union(*(rows(x) for training, x in seen if not training))
    assert trained == set(report.train_indices)  # every training image, nothing else
    assert validated == set(report.validation_indices)  # validation only on the held-out normal images
    assert len(report.history) == 3 and all(h["validation_loss"] is not None for h in report.history)


def test_early_stopping_keeps_the_best_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 0.5])  # best after epoch 1, then no gain for 2 epochs
    snapshots = []

    def fake_validation_loss(self, net, teacher, idx):
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(ReverseDistillation, "_validation_loss", fake_validation_loss)
    expert = fitted(ReverseDistillationConfig(**TINY, max_epochs=7, patience=2), [random_batch(8, seed=0)])
    assert expert.fit_report.best_epoch == 1 and expert.summary["epochs_run"] == 4
    assert [h["validation_loss"] for h in expert.fit_report.history] == [3.0, 2.0, 2.5, 2.6]
    kept = expert.net.state_dict()
    assert all(torch.equal(kept[k], snapshots[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots[3][k]) for k in kept)


def test_anomaly_map_is_zero_for_a_perfect_student() -> None:
    teacher = [torch.randn(2, c, s, s) for c, s in ((24, 16), (40, 8), (112, 4))]
    maps = anomaly_maps(teacher, [2.0 * t for t in teacher], (64, 64), 4.0)  # cosine ignores scale
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(maps, torch.zeros_like(maps), atol=1e-5, rtol=0)
    opposite = anomaly_maps(teacher, [-t for t in teacher], (64, 64), 4.0)
    torch.testing.assert_close(opposite, torch.full_like(opposite, 6.0))  # 3 scales x (1 - (-1))


# ---------------------------------------------------------------------------- real backbone quality
@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reverse_distillation_data")
    write_synthetic_category(root, CATEGORY, CATEGORY, n_train=24, n_test_good=10, n_test_defect=10,
                             size=IMAGE_SIZE, seed=1)  # fmt: skip
    return root


def _evaluate(backbone: Backbone, root: Path) -> dict:
    expert = ReverseDistillation(ReverseDistillationConfig(max_epochs=12, seed=0))
    return fit_and_predict(expert, backbone, root, CATEGORY, IMAGE_SIZE)


@pytest.fixture(scope="module")
def pretrained_run(brick: Path) -> dict:
    return _evaluate(Backbone.pretrained(image_size=IMAGE_SIZE), brick)


@pytest.fixture(scope="module")
def random_run(brick: Path) -> dict:
    torch.manual_seed(0)
    return _evaluate(Backbone(), brick)


def test_pretrained_backbone_detects_synthetic_defects(pretrained_run: dict, random_run: dict) -> None:
    labels = pretrained_run["labels"]
    assert sum(labels) == 10 and len(labels) == 20
    pretrained_auc = roc_auc(labels, pretrained_run["scores"])
    random_auc = roc_auc(labels, random_run["scores"])
    print(f"image AUROC pretrained {pretrained_auc:.3f}, random backbone {random_auc:.3f}")
    assert pretrained_auc >= 0.85, (pretrained_auc, random_auc)
    # The control: the same expert on an untrained network of the same architecture is worse.
    assert pretrained_auc > random_auc, (pretrained_auc, random_auc)


def test_maps_have_input_shape_and_light_up_on_defects(pretrained_run: dict) -> None:
    maps = pretrained_run["maps"]
    assert maps.shape == (20, IMAGE_SIZE, IMAGE_SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (maps >= 0).all()
    contrasts = [
        float(score_map[mask].mean() - score_map[~mask].mean())
        for score_map, mask, label in zip(maps, pretrained_run["masks"], pretrained_run["labels"])
        if label
    ]
    assert np.mean(contrasts) > 0, contrasts
    assert sum(c > 0 for c in contrasts) >= 7, contrasts
