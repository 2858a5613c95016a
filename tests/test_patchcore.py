"""PatchCore: coreset selection, state bytes, and detection quality with the real pretrained backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.data.datasets import write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts import build_expert, load_expert
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.experts.patchcore.torch_model import gaussian_blur, greedy_coreset
from schemas.config import ModelConfig
from helpers import fit_and_predict

IMAGE_SIZE = 128
CATEGORY = "brick"  # the texture on which a pretrained backbone separates synthetic defects cleanly


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def random_batch(n: int, seed: int, size: int = 64) -> FeatureBatch:
    """A FeatureBatch with the backbone's stage shapes, filled with random features."""
    g = torch.Generator().manual_seed(seed)
    channels = {2: 40, 3: 112, 4: 320}
    strides = {2: 8, 3: 16, 4: 32}
    return FeatureBatch(
        pixels=torch.rand(n, 3, size, size, generator=g),
        stages={s: torch.rand(n, c, size // strides[s], size // strides[s], generator=g) for s, c in channels.items()},
    )


# ----------------------------------------------------------------------------------------- coreset
def naive_greedy_coreset(points: np.ndarray, size: int, first: int) -> list[int]:
    """O(N * k) k-center greedy with exact float64 distances."""
    chosen = [first]
    min_dist = np.linalg.norm(points - points[first], axis=1)
    for _ in range(1, size):
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, np.linalg.norm(points - points[nxt], axis=1))
    return chosen


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n, dim, size", [(200, 8, 20), (500, 16, 50), (64, 3, 63)])
def test_greedy_coreset_matches_naive_reference(seed: int, n: int, dim: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, dim)).astype(np.float32)
    chosen = greedy_coreset(torch.from_numpy(points), size, projection_dim=dim, seed=seed).tolist()
    assert len(chosen) == size and len(set(chosen)) == size and all(0 <= i < n for i in chosen)
    assert chosen == naive_greedy_coreset(points.astype(np.float64), size, chosen[0])
    # deterministic for a seed
    assert greedy_coreset(torch.from_numpy(points), size, dim, seed).tolist() == chosen


def test_greedy_coreset_with_projection_is_distinct_and_seeded() -> None:
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 96)).astype(np.float32))
    a = greedy_coreset(points, 40, projection_dim=16, seed=1)
    assert len(set(a.tolist())) == 40
    assert torch.equal(a, greedy_coreset(points, 40, projection_dim=16, seed=1))
    assert not torch.equal(a, greedy_coreset(points, 40, projection_dim=16, seed=2))


def test_greedy_coreset_with_projection_covers_every_cluster() -> None:
    # 12 tight clusters far apart in 96-d: k-center greedy (even in a 16-d random projection) must take
    # one point of every cluster before a second point of any; a random subset of 12 rarely does.
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=10.0, size=(12, 96))
    labels = np.repeat(np.arange(12), 25)
    points = torch.from_numpy((centers[labels] + rng.normal(scale=0.1, size=(300, 96))).astype(np.float32))
    for seed in range(3):
        chosen = greedy_coreset(points, 12, projection_dim=16, seed=seed)
        assert sorted(labels[chosen.numpy()].tolist()) == list(range(12))


def test_greedy_coreset_size_at_least_n_keeps_everything() -> None:
    points = torch.zeros(5, 4)
    assert greedy_coreset(points, 5, 4, 0).tolist() == [0, 1, 2, 3, 4]
    assert greedy_coreset(points, 9, 4, 0).tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------- state bytes
def test_state_round_trip_gives_identical_predictions() -> None:
    config = PatchCoreConfig(coreset_ratio=0.25, projection_dim=32, num_neighbors=3, map_sigma=2.0, seed=3)
    expert = PatchCore(config)
    expert.fit([random_batch(3, seed=0), random_batch(2, seed=1)])
    assert expert.bank is not None and expert.bank.shape == (int(5 * 8 * 8 * 0.25), 40 + 112)

    data = expert.to_bytes()
    assert expert.to_bytes() == data  # deterministic for one object
    twin = PatchCore(config)
    twin.fit([random_batch(3, seed=0), random_batch(2, seed=1)])
    assert twin.to_bytes() == data  # and for an identical fit

    loaded = PatchCore.from_bytes(data)
    assert loaded.config == config
    assert loaded.to_bytes() == data
    np.testing.assert_array_equal(loaded.bank, expert.bank)
    query = random_batch(4, seed=9)
    before, after = expert.predict(query), loaded.predict(query)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.maps, before.maps)
    assert before.scores.shape == (4,) and before.maps.shape == (4, 64, 64)
    assert np.all(before.scores > 0)

    via_registry = load_expert("patchcore", data)
    np.testing.assert_array_equal(via_registry.predict(query).scores, before.scores)

    other = PatchCore(PatchCoreConfig(coreset_ratio=0.25, projection_dim=32, seed=4))
    other.fit([random_batch(3, seed=0), random_batch(2, seed=1)])
    assert other.to_bytes() != data


def test_state_errors() -> None:
    with pytest.raises(RuntimeError):
        PatchCore().to_bytes()
    with pytest.raises(RuntimeError):
        PatchCore().predict(random_batch(1, seed=0))
    from pipeline.common.serialization import pack

    with pytest.raises(ValueError, match="expert"):
        PatchCore.from_bytes(pack({"expert": "padim", "config": {}}, {"bank": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError):
        load_expert("padim", b"")
    with pytest.raises(ValueError):
        build_expert("padim", ModelConfig())


def test_normal_patches_score_lower_than_shifted_ones() -> None:
    expert = PatchCore(PatchCoreConfig(coreset_ratio=0.5, projection_dim=32, map_sigma=1.0))
    expert.fit([random_batch(4, seed=0)])
    normal = random_batch(2, seed=5)
    defect = random_batch(2, seed=5)
    defect.stages[2][:, :, 2:4, 2:4] += 3.0  # a 2x2 patch region far from everything in the bank
    out_normal, out_defect = expert.predict(normal), expert.predict(defect)
    assert np.all(out_defect.scores > out_normal.scores)
    # the map peaks where the defect is: stage-2 cells 2..3 cover pixels 16..31
    peak = np.unravel_index(np.argmax(out_defect.maps[0]), out_defect.maps[0].shape)
    assert 12 <= peak[0] < 36 and 12 <= peak[1] < 36


# ---------------------------------------------------------------------------- real backbone quality
@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patchcore_data")
    write_synthetic_category(root, CATEGORY, CATEGORY, n_train=10, n_test_good=10, n_test_defect=10,
                             size=IMAGE_SIZE, seed=1)
    return root


def _evaluate(backbone: Backbone, root: Path) -> dict:
    expert = build_expert("patchcore", ModelConfig(image_size=IMAGE_SIZE, coreset_ratio=0.1, seed=0))
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
    assert pretrained_auc >= 0.9, (pretrained_auc, random_auc)
    # The control: the same pipeline on an untrained network of the same architecture is worse,
    # so the result comes from the pretrained weights and not from trivial image statistics.
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
    assert len(contrasts) == 10
    assert np.mean(contrasts) > 0, contrasts
    assert sum(c > 0 for c in contrasts) >= 8, contrasts
    # Normal images: no mask at all.
    assert not any(m.any() for m, label in zip(pretrained_run["masks"], pretrained_run["labels"]) if not label)


# ---------------------------------------------------------------------------------------- smoothing
@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_gaussian_blur_preserves_constant_map(sigma: float) -> None:
    maps = torch.full((2, 40, 40), 3.25)
    maps[1] = -1.5
    out = gaussian_blur(maps, sigma)
    assert out.shape == maps.shape
    torch.testing.assert_close(out, maps)


def test_gaussian_blur_smooths_and_keeps_mass() -> None:
    maps = torch.zeros(1, 65, 65)
    maps[0, 32, 32] = 1.0
    assert gaussian_blur(maps, 0.0) is maps  # sigma 0: untouched
    out = gaussian_blur(maps, 2.0)[0]
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)  # far from the border, nothing leaks out
    assert float(out.max()) < 0.1 and int(out.argmax()) == 32 * 65 + 32
    torch.testing.assert_close(out, out.T)  # isotropic
    torch.testing.assert_close(out, out.flip(0))
