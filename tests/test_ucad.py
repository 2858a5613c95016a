"""UCAD's expert: the structure-based contrastive loss, prompt training on the frozen ViT, knowledge,
state bytes, and detection quality against a random-weights control."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features.backbone import Backbone, Backbones
from pipeline.core.calibration import Calibration
from pipeline.data.datasets import labeled_test_images, train_images, write_synthetic_category
from pipeline.data.metrics import roc_auc
from pipeline.experts import build_expert, load_expert
from pipeline.experts.ucad import UCAD, UCADConfig
from pipeline.experts.ucad.torch_model import structure_contrastive_loss
from pipeline.features.imaging import decode_image
from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import select_keys, task_features
from helpers import load_pixels
from pipeline.features.vit import ViTBackbone
from schemas.config import ModelConfig

IMAGE_SIZE = 112  # an 8 x 8 ViT token grid: small and quick
FAST = UCADConfig(knowledge_layers=(5, 7), prompt_images=4, prompt_epochs=3, prompt_batch_size=2, sam_points_per_side=4)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------------- loss
def reference_supcon(features: torch.Tensor, regions: torch.Tensor, temperature: float) -> float:
    """Loop-by-loop supervised contrastive loss (Khosla et al.), per image, float64."""
    losses = []
    for f, r in zip(features.double(), regions):
        z = f / f.norm(dim=1, keepdim=True)
        for i in range(len(r)):
            if r[i] == 0:
                continue
            others = [a for a in range(len(r)) if a != i and r[a] > 0]
            positives = [p for p in others if r[p] == r[i]]
            if not positives or len(positives) == len(others):  # needs a positive and a negative
                continue
            denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), 0)
            losses.append(float(-np.mean([float(z[i] @ z[p] / temperature - denominator) for p in positives])))
    return float(np.mean(losses))


def test_contrastive_loss_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 12, 5, generator=g)
    regions = torch.tensor([[1, 1, 2, 2, 2, 0, 3, 1, 0, 2, 4, 3], [0, 0, 1, 1, 1, 1, 2, 2, 0, 5, 2, 1]])
    loss = structure_contrastive_loss(features, regions, temperature=0.2)
    assert float(loss) == pytest.approx(reference_supcon(features, regions, 0.2), rel=1e-5)


def test_contrastive_loss_is_lower_when_regions_cluster() -> None:
    regions = torch.tensor([[1] * 8 + [2] * 8])
    centres = torch.eye(4)[:2]
    clustered = centres[regions[0] - 1][None] + 0.01 * torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(1))
    mixed = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(2))
    assert structure_contrastive_loss(clustered, regions, 0.1) < structure_contrastive_loss(mixed, regions, 0.1)


@pytest.mark.parametrize("regions", [[0, 1, 2, 0], [1, 1, 1, 0]], ids=["no positive", "single region"])
def test_contrastive_loss_without_structure_is_zero_with_finite_gradients(regions: list[int]) -> None:
    features = torch.randn(1, 4, 3, requires_grad=True)
    loss = structure_contrastive_loss(features, torch.tensor([regions]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(features.grad).all()


# -------------------------------------------------------------------------------- fitted expert
def stripes_labeler(image: np.ndarray) -> np.ndarray:
    """A stand-in for Segment-Anything in unit tests: four horizontal bands as regions."""
    rows = np.arange(image.shape[0]) * 4 // image.shape[0]
    return np.repeat(rows[:, None] + 1, image.shape[1], axis=1).astype(np.int32)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.pretrained(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ucad")
    write_synthetic_category(root, "brick", "brick", n_train=16, n_test_good=10, n_test_defect=10, size=160, seed=3)
    return root


@pytest.fixture(scope="module")
def fitted(backbone: Backbone, brick: Path) -> tuple[UCAD, dict]:
    pixels = [load_pixels(p, IMAGE_SIZE) for p in train_images(brick, "brick")]
    batches = [backbone.extract(pixels[i : i + 8]) for i in range(0, len(pixels), 8)]
    vit_before = _state_digest(backbone)
    expert = UCAD(FAST, labeler=stripes_labeler)
    expert.fit(batches, backbone)
    return expert, {"vit_before": vit_before, "batches": batches}


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_only_the_prompt_is_trained(fitted, backbone: Backbone) -> None:
    expert, context = fitted
    assert _state_digest(backbone) == context["vit_before"]  # the shared ViT (and CNN) never change
    c = expert.config
    report = expert.report
    tokens = c.prompt_tokens if report.kept_epoch else 0  # no prompt kept: zero tokens
    assert expert.prompts.shape == (max(c.knowledge_layers) + 1, tokens, backbone.vit.embed_dim)
    assert not expert.prompts.requires_grad
    losses = report.losses
    assert len(losses) == c.prompt_epochs and losses[-1] < losses[0]  # the contrastive objective improves


def test_the_prompt_is_kept_only_where_it_helps_on_validation(fitted) -> None:
    """Validation AUROC without a prompt and after each epoch (held-out normals + synthetic anomalies); the
    best is kept, the plain ViT on ties, and the fit summary carries the ablation."""
    expert, _ = fitted
    report, summary = expert.report, expert.fit_summary()
    assert len(report.validation_auroc) == expert.config.prompt_epochs + 1
    best = max(range(len(report.validation_auroc)), key=lambda i: (report.validation_auroc[i], -i))
    assert report.kept_epoch == best
    assert summary["prompt_kept"] == (best > 0) and summary["validation_auroc_no_prompt"] == round(report.validation_auroc[0], 4)


def test_an_unhelpful_prompt_leaves_unprompted_knowledge(backbone: Backbone, brick: Path) -> None:
    """When no epoch beats the plain ViT, the stored knowledge is exactly the unprompted features'."""
    pixels = [load_pixels(p, IMAGE_SIZE) for p in train_images(brick, "brick")]
    batches = [backbone.extract(pixels)]
    zero_epochs = UCAD(UCADConfig(**{**FAST.__dict__, "prompt_epochs": 0}), labeler=stripes_labeler)
    zero_epochs.fit(batches, backbone)
    assert zero_epochs.prompts.shape[1] == 0 and zero_epochs.report.kept_epoch == 0
    loaded = load_expert("ucad", zero_epochs.to_bytes())
    np.testing.assert_array_equal(loaded.predict(batches[0], backbone).scores, zero_epochs.predict(batches[0], backbone).scores)


def test_knowledge_is_a_coreset_of_prompted_features(fitted, backbone: Backbone) -> None:
    expert, context = fitted
    n_patches = 16 * backbone.vit.grid**2
    dim = len(expert.config.knowledge_layers) * backbone.vit.embed_dim
    assert expert.memory.bank.shape == (int(n_patches * expert.config.coreset_ratio), dim)


def test_state_round_trip_gives_identical_scores(fitted, backbone: Backbone) -> None:
    expert, context = fitted
    data = expert.to_bytes()
    assert data == expert.to_bytes()  # deterministic
    loaded = load_expert("ucad", data)
    batch = context["batches"][0]
    before, after = expert.predict(batch, backbone), loaded.predict(batch, backbone)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert before.maps.shape == (len(before.scores), IMAGE_SIZE, IMAGE_SIZE)


def test_predict_needs_the_vit(fitted) -> None:
    expert, context = fitted
    with pytest.raises(ValueError, match="ViT"):
        expert.predict(context["batches"][0], Backbone())


def _evaluate(expert: UCAD, backbone: Backbone, root: Path) -> float:
    pixels = [load_pixels(p, IMAGE_SIZE) for p in train_images(root, "brick")]
    expert.fit([backbone.extract(pixels)], backbone)
    items = labeled_test_images(root, "brick")
    output = expert.predict(backbone.extract([load_pixels(item.path, IMAGE_SIZE) for item in items]), backbone)
    return roc_auc([i.is_anomalous for i in items], output.scores)


def test_beats_a_random_weights_vit_on_synthetic_defects(backbone: Backbone, brick: Path) -> None:
    pretrained = _evaluate(UCAD(FAST, labeler=stripes_labeler), backbone, brick)
    random_vit = Backbone(vit=ViTBackbone.random_init(backbone.vit.image_size))  # same architecture, random weights
    control = _evaluate(UCAD(FAST, labeler=stripes_labeler), random_vit, brick)
    assert pretrained >= 0.85 and pretrained > control + 0.1, (pretrained, control)


def test_real_segment_anything_masks_drive_the_prompt(backbone: Backbone, brick: Path, tmp_path, monkeypatch) -> None:
    """The default labeler: MobileSAM's automatic masks (few points), cached per image."""
    monkeypatch.setenv("INSPECTION_CACHE_DIR", str(tmp_path))
    pixels = [load_pixels(p, IMAGE_SIZE) for p in train_images(brick, "brick")[:4]]
    config = UCADConfig(knowledge_layers=(5,), prompt_images=2, prompt_epochs=1, sam_points_per_side=4)
    expert = UCAD(config)
    expert.fit([backbone.extract(pixels)], backbone)
    assert len(expert.report.regions_per_image) == 2 and max(expert.report.regions_per_image) >= 2
    assert list(tmp_path.rglob("*.npz")), "masks were not cached"
    summary = expert.fit_summary()
    assert summary["prompt_images"] == 2 and summary["knowledge_size"] == len(expert.memory)


def test_built_from_the_model_config() -> None:
    expert = build_expert("ucad", ModelConfig(seed=7, map_sigma=2.0))
    assert isinstance(expert, UCAD) and expert.config.seed == 7 and expert.config.map_sigma == 2.0


# ------------------------------------------------------------------------------ store, continual
@pytest.mark.integration
def test_adding_a_ucad_task_leaves_the_earlier_task_byte_identical(backbone: Backbone, brick: Path, tmp_path,
                                                                   redis_client) -> None:
    """Two UCAD tasks through the real Redis store: publishing the second rewrites nothing of the first,
    the inspector reloads only the new one, and the first task's scores stay bit-identical."""
    write_synthetic_category(tmp_path, "gravel", "gravel", n_train=8, n_test_good=2, n_test_defect=2, size=160, seed=4)
    store = KnowledgeStore(redis_client, namespace="test-ucad")
    tasks = {}
    for name, root in (("brick", brick), ("gravel", tmp_path)):
        batch = backbone.extract([load_pixels(p, IMAGE_SIZE) for p in train_images(root, name)[:8]])
        expert = UCAD(FAST, labeler=stripes_labeler)
        expert.fit([batch], backbone)
        calibration = Calibration.from_normals(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([1e6]), 0.1, 1.0)
        tasks[name] = TaskArtifacts(name, "ucad", select_keys(task_features(batch), 16, 0), expert.to_bytes(), calibration)

    def raw_blobs(name: str) -> dict[str, bytes]:
        entry = store.manifest().tasks[name]
        return {kind: redis_client.get(f"test-ucad:blob:{digest}") for kind, digest in entry.blobs.items()}

    store.publish(tasks["brick"])
    inspector = Inspector(Backbones(backbone), ModelConfig(image_size=IMAGE_SIZE))
    inspector.sync(store)
    frames = [decode_image(i.path.read_bytes(), 10**7) for i in labeled_test_images(brick, "brick")[:4]]
    before_bytes, (before, _) = raw_blobs("brick"), inspector.inspect(frames)

    store.publish(tasks["gravel"])
    assert inspector.sync(store) == ["gravel"]
    after, _ = inspector.inspect(frames)
    assert raw_blobs("brick") == before_bytes
    assert set(store.size_report()["brick"]) >= {"keys", "expert.prompt", "expert.knowledge", "calibration"}
    for a, b in zip(before, after):
        assert a.match.category == b.match.category == "brick" and a.score_raw == b.score_raw
        np.testing.assert_array_equal(a.score_map, b.score_map)
