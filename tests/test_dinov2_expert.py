"""The AnomalyDINO expert (DINOv2 patch tokens, cosine nearest neighbours, top-1% score, PCA masking):
its torch parts, state bytes, non-square inputs, shared tokens, detection quality against a random-weights
ViT, and the automatic masking decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from pipeline.common.serialization import pack
from pipeline.data.datasets import labeled_test_images, train_images, write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts.dinov2 import DINOv2Patch, DINOv2PatchConfig
from pipeline.experts.dinov2.expert import AUTO_RULE
from pipeline.experts.dinov2.torch_model import mask_agreement, otsu_threshold, refine_masks, top_fraction_scores
from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.features.imaging import decode_image, resize_rgb
from pipeline.features.vit import ViTBackbone

IMAGE_SIZE = 112  # an 8 x 8 token grid: small and quick
OBJECT_SIZE = 224  # masking needs a finer grid than 8 x 8 (a 3 x 3 dilation + closing there covers everything)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def load(path: Path, height: int, width: int | None = None) -> np.ndarray:
    return resize_rgb(decode_image(path.read_bytes(), 10**8), height, width)


def vit_batch(backbone: Backbone, images: list[np.ndarray]) -> FeatureBatch:
    """Pixels only, as a ViT InputSpec gives them to the expert (no CNN, no keys)."""
    return backbone.extract(images, keys=False, cnn=False)


# ------------------------------------------------------------------------------------ torch parts
def test_top_fraction_score_is_the_mean_of_the_largest_patches() -> None:
    distances = torch.arange(200, dtype=torch.float32)[None].repeat(2, 1) / 100
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, 150:] = False  # 150 valid patches: 1% of them floors to 1
    scores = top_fraction_scores(distances.masked_fill(~valid, 0.0), valid, 0.01)
    torch.testing.assert_close(scores, torch.tensor([(1.99 + 1.98) / 2, 1.49]))
    assert float(top_fraction_scores(distances[:1, :10], valid[:1, :10], 0.01)) == pytest.approx(0.09)  # at least one
    assert float(top_fraction_scores(distances[:1], torch.zeros(1, 200, dtype=torch.bool), 0.01)) == 0.0


def test_otsu_separates_two_clusters() -> None:
    noise = 0.01 * torch.randn(400, generator=torch.Generator().manual_seed(0))
    values = torch.cat([torch.full((300,), -1.0), torch.full((100,), 2.0)]) + noise
    threshold, separability = otsu_threshold(values)
    assert 0.0 < threshold < 1.0 and separability > 0.95  # the middle of the gap
    assert otsu_threshold(torch.randn(20000, generator=torch.Generator().manual_seed(1)))[1] == pytest.approx(2 / np.pi, abs=0.02)


def test_mask_refinement_dilates_and_closes_without_eroding_the_border() -> None:
    masks = torch.zeros(2, 11, 11, dtype=torch.bool)
    masks[0, 6, 4] = True
    masks[0, 0, :] = True
    masks[1, 3:8, 3:8] = True
    masks[1, 5, 5] = False  # a one-patch hole
    out = refine_masks(masks)
    expected = torch.zeros(11, 11, dtype=torch.bool)
    expected[:2] = True  # the top row dilated; the border itself never erodes
    expected[5:8, 3:6] = True  # one 3 x 3 dilation (the closing adds nothing here)
    assert torch.equal(out[0], expected)
    filled = torch.zeros(11, 11, dtype=torch.bool)
    filled[2:9, 2:9] = True  # dilated by one patch, the hole gone
    assert torch.equal(out[1], filled)


def test_mask_agreement_is_chance_corrected() -> None:
    same = torch.zeros(4, 8, 8, dtype=torch.bool)
    same[:, 2:6, 2:6] = True
    torch.testing.assert_close(mask_agreement(same), torch.ones(4))
    random = torch.rand(40, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    assert abs(float(mask_agreement(random).mean())) < 0.15


@pytest.mark.parametrize("bad", [dict(layers=()), dict(layers=(11, 5)), dict(layers=(-1,)), dict(top_fraction=0.0),
                                 dict(top_fraction=1.5), dict(max_bank_size=0), dict(map_sigma=-1.0), dict(masking="yes")])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        DINOv2PatchConfig(**bad)


# --------------------------------------------------------------------------------- fitted expert
@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.pretrained(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dinov2")
    write_synthetic_category(root, "brick", "brick", n_train=10, n_test_good=10, n_test_defect=10, size=160, seed=3)
    return root


@pytest.fixture(scope="module")
def brick_test(brick: Path) -> tuple[list[bool], list[np.ndarray]]:
    items = labeled_test_images(brick, "brick")
    return [i.is_anomalous for i in items], [load(i.path, IMAGE_SIZE) for i in items]


def _fit(expert: DINOv2Patch, backbone: Backbone, root: Path) -> DINOv2Patch:
    expert.fit([vit_batch(backbone, [load(p, IMAGE_SIZE) for p in train_images(root, "brick")])], backbone)
    return expert


@pytest.fixture(scope="module")
def fitted(backbone: Backbone, brick: Path) -> DINOv2Patch:
    return _fit(DINOv2Patch(), backbone, brick)


@pytest.fixture(scope="module")
def test_batch(backbone: Backbone, brick_test) -> FeatureBatch:
    return vit_batch(backbone, brick_test[1][:6])


def test_bank_holds_every_normal_patch_or_a_coreset(fitted: DINOv2Patch, backbone: Backbone, brick: Path) -> None:
    assert fitted.bank.shape == (10 * 8 * 8, backbone.vit.embed_dim) and fitted.bank.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fitted.bank, axis=1), 1.0, atol=1e-5)
    small = _fit(DINOv2Patch(DINOv2PatchConfig(max_bank_size=100, layers=(9, 11))), backbone, brick)
    assert small.bank.shape == (100, 2 * backbone.vit.embed_dim)
    assert small.fit_summary()["fit_patches"] == 640 and small.fit_summary()["bank_size"] == 100


def test_state_round_trip_gives_bit_identical_outputs(fitted: DINOv2Patch, backbone: Backbone, test_batch) -> None:
    data = fitted.to_bytes()
    assert data == fitted.to_bytes()  # deterministic
    loaded = DINOv2Patch.from_bytes(data)
    assert loaded.config == fitted.config and loaded.to_bytes() == data
    assert loaded.fit_summary() == fitted.fit_summary()
    before, after = fitted.predict(test_batch, backbone), loaded.predict(test_batch, backbone)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert before.scores.shape == (6,) and before.maps.shape == (6, IMAGE_SIZE, IMAGE_SIZE)
    assert before.maps.dtype == np.float32 and (before.maps >= 0).all() and np.isfinite(before.maps).all()


def test_state_errors(backbone: Backbone, test_batch) -> None:
    with pytest.raises(RuntimeError):
        DINOv2Patch().to_bytes()
    with pytest.raises(RuntimeError):
        DINOv2Patch().predict(test_batch, backbone)
    with pytest.raises(ValueError, match="expert"):
        DINOv2Patch.from_bytes(pack({"expert": "ucad", "config": {}}, {"bank": np.zeros((2, 2), np.float32)}))


def test_predict_needs_the_vit_unless_the_tokens_are_given(fitted: DINOv2Patch, test_batch) -> None:
    with pytest.raises(ValueError, match="ViT"):
        fitted.predict(test_batch, Backbone())
    with pytest.raises(ValueError, match="ViT"):
        fitted.predict(test_batch)


def test_maps_have_the_batch_resolution_for_non_square_batches(fitted: DINOv2Patch, backbone: Backbone,
                                                              brick_test) -> None:
    wide = vit_batch(backbone, [resize_rgb((img.transpose(1, 2, 0) * 255).round().astype(np.uint8), 112, 168)
                                for img in brick_test[1][:4]])
    out = fitted.predict(wide, backbone)
    assert wide.image_hw == (112, 168)
    assert out.maps.shape == (4, 112, 168) and out.scores.shape == (4,)
    assert np.isfinite(out.maps).all() and (out.maps >= 0).all()


def test_shared_tokens_are_used_and_give_the_same_outputs(fitted: DINOv2Patch, backbone: Backbone, test_batch,
                                                          monkeypatch) -> None:
    expected = fitted.predict(test_batch, backbone)
    # the routing pass's tokens of the configured block, on this batch's grid
    shared = backbone(test_batch.pixels, keys=True, cnn=False, vit_layers=fitted.config.layers)
    assert set(shared.tokens) == {7, 11}
    wrong_grid = FeatureBatch(test_batch.pixels, {}, {11: torch.zeros(6, 4, backbone.vit.embed_dim)})
    np.testing.assert_array_equal(fitted.predict(wrong_grid, backbone).scores, expected.scores)  # recomputed

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the ViT ran again although the batch had its tokens")

    monkeypatch.setattr(backbone.vit, "multi_layer_tokens", no_second_pass)
    got = fitted.predict(shared, backbone)
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_array_equal(got.maps, expected.maps)


def test_beats_a_random_weights_vit_on_synthetic_defects(fitted: DINOv2Patch, backbone: Backbone, brick: Path,
                                                          brick_test) -> None:
    labels, images = brick_test
    pretrained = roc_auc(labels, fitted.predict(vit_batch(backbone, images), backbone).scores)
    random_vit = Backbone(vit=ViTBackbone.random_init(IMAGE_SIZE))  # same architecture, random weights
    control_expert = _fit(DINOv2Patch(), random_vit, brick)
    control = roc_auc(labels, control_expert.predict(vit_batch(random_vit, images), random_vit).scores)
    assert pretrained >= 0.9 and pretrained > control + 0.1, (pretrained, control)


# ---------------------------------------------------------------------------------------- masking
def test_auto_masking_is_off_on_a_texture_and_reports_its_rule(fitted: DINOv2Patch) -> None:
    masking = fitted.fit_summary()["masking"]
    assert masking["mode"] == "auto" and masking["used"] is False and masking["rule_passed"] is False
    assert masking["rule"] == AUTO_RULE and "kappa" in masking["rule"]
    assert fitted.foreground is None


def object_image(rng: np.random.Generator, texture: np.ndarray, defect: bool = False) -> np.ndarray:
    """A brick-textured disc near the centre of a plain dark background (an 'object'), optionally with a
    bright spot on the disc."""
    s = OBJECT_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    cy, cx = s / 2 + rng.uniform(-0.05, 0.05) * s, s / 2 + rng.uniform(-0.05, 0.05) * s
    radius = s * rng.uniform(0.28, 0.33)
    y0, x0 = rng.integers(0, texture.shape[0] - s), rng.integers(0, texture.shape[1] - s)
    image = 40.0 + rng.normal(0, 2, (s, s))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[disc] = texture[y0 : y0 + s, x0 : x0 + s][disc]
    if defect:
        angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6 * radius)
        image[(yy - cy - offset * np.sin(angle)) ** 2 + (xx - cx - offset * np.cos(angle)) ** 2 < (0.06 * s) ** 2] = 230
    return np.repeat(np.clip(image, 0, 255)[None] / 255.0, 3, axis=0).astype(np.float32)


@pytest.fixture(scope="module")
def objects(backbone: Backbone) -> dict:
    rng = np.random.default_rng(0)
    texture = skimage.data.brick().astype(np.float32)
    fit = vit_batch(backbone, [object_image(rng, texture) for _ in range(8)])
    test = vit_batch(backbone, [object_image(rng, texture, defect=d) for d in (False, False, True, True)])
    expert = DINOv2Patch()
    expert.fit([fit], backbone)
    return {"expert": expert, "test": test}


def test_auto_masking_is_on_for_an_object_on_a_plain_background(objects: dict, backbone: Backbone) -> None:
    expert = objects["expert"]
    masking = expert.fit_summary()["masking"]
    assert masking["used"] is True and masking["rule_passed"] is True, masking
    assert 0.2 < masking["coverage_mean"] < 0.8 and masking["agreement_kappa"] > 0.7
    grid = OBJECT_SIZE // 14
    assert len(expert.bank) < 8 * grid * grid  # background patches are left out of the bank
    out = expert.predict(objects["test"], backbone)
    assert (out.maps[:, :14, :14] == 0).all()  # the corners are background: distance 0
    assert out.scores[2:].min() > out.scores[:2].max()  # the spotted discs score higher

    data = expert.to_bytes()
    loaded = DINOv2Patch.from_bytes(data)
    assert loaded.foreground is not None and loaded.to_bytes() == data
    again = loaded.predict(objects["test"], backbone)
    np.testing.assert_array_equal(again.scores, out.scores)
    np.testing.assert_array_equal(again.maps, out.maps)


def test_masking_off_keeps_every_patch(backbone: Backbone) -> None:
    fit = vit_batch(backbone, [object_image(np.random.default_rng(5), skimage.data.brick().astype(np.float32))])
    expert = DINOv2Patch(DINOv2PatchConfig(masking="off"))
    expert.fit([fit], backbone)
    assert expert.fit_summary()["masking"] == {"mode": "off", "used": False}
    assert len(expert.bank) == (OBJECT_SIZE // 14) ** 2
