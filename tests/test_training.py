"""Training one task, and inspecting with several trained tasks loaded incrementally from the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from pipeline.data import datasets
from pipeline.features.backbone import Backbone
from pipeline.data.datasets import list_images, write_synthetic_category
from pipeline.data.metrics import accuracy
from pipeline.experts import EXPERT_TYPES, load_expert
from pipeline.features.imaging import decode_image
from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, task_features
from pipeline.core.training import feature_batches, split_images, train_task
from schemas.config import ModelConfig, TrainingConfig

IMAGE_SIZE = 128
TRAINED = ("brick", "gravel")
UNTRAINED = "grass"
MODEL = ModelConfig(image_size=IMAGE_SIZE, coreset_ratio=0.1, max_coreset_size=500, num_keys=16, seed=0)
TRAINING = TrainingConfig(batch_size=16, calibration_fraction=0.25)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _labeled_test_images(root: Path, category: str):
    # The reader of test/<defect> folders (named test_images in older code, which pytest would collect).
    reader = getattr(datasets, "labeled_test_images", None) or getattr(datasets, "test_images")
    return reader(root, category)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.pretrained(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("training_data")
    for texture in (*TRAINED, UNTRAINED):
        write_synthetic_category(root, texture, texture, n_train=12, n_test_good=6, n_test_defect=6,
                                 size=IMAGE_SIZE, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(backbone: Backbone, data_root: Path) -> dict[str, tuple[TaskArtifacts, list[tuple[float, str]]]]:
    """category -> (artifacts, progress reports)."""
    out = {}
    for category in TRAINED:
        progress: list[tuple[float, str]] = []
        artifacts = train_task(
            category, data_root / category / "train" / "good", "patchcore", backbone, MODEL, TRAINING,
            false_alarm_rate=0.1, on_progress=lambda f, m, p=progress: p.append((f, m)),
        )
        out[category] = (artifacts, progress)
    return out


@pytest.fixture(scope="module")
def test_frames(data_root: Path) -> dict[str, list[tuple[np.ndarray, bool]]]:
    """category -> decoded uint8 test frames with their is_anomalous label."""
    return {
        category: [(decode_image(item.path.read_bytes(), 10**7), item.is_anomalous)
                   for item in _labeled_test_images(data_root, category)]
        for category in (*TRAINED, UNTRAINED)
    }


# ------------------------------------------------------------------------------------------ split
def test_split_images_disjoint_and_deterministic(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:03d}.png" for i in range(20)]
    config = TrainingConfig(calibration_fraction=0.25)
    fit, held_out = split_images(paths, config, seed=3, limit=None)
    assert len(held_out) == 5 and len(fit) == 15
    assert set(fit).isdisjoint(held_out) and set(fit) | set(held_out) == set(paths)
    assert split_images(paths, config, seed=3, limit=None) == (fit, held_out)
    assert split_images(paths, config, seed=4, limit=None) != (fit, held_out)
    assert fit != sorted(fit) or held_out != sorted(held_out) or fit[0] != paths[5]  # actually shuffled

    fit, held_out = split_images(paths, config, seed=3, limit=8)
    assert len(fit) + len(held_out) == 8 and len(held_out) == 2
    fit, held_out = split_images(paths, TrainingConfig(max_train_images=10, calibration_fraction=0.25), 3, None)
    assert len(fit) + len(held_out) == 10
    fit, held_out = split_images(paths[:4], TrainingConfig(calibration_fraction=0.1), 0, None)
    assert len(held_out) == 2 and len(fit) == 2  # at least two held out
    with pytest.raises(ValueError, match="at least 4"):
        split_images(paths[:3], config, 0, None)


# --------------------------------------------------------------------------------------- training
def test_trained_artifacts_shape_and_meta(trained, backbone: Backbone) -> None:
    for category, (artifacts, progress) in trained.items():
        assert artifacts.category == category and artifacts.expert_name == "patchcore"
        assert artifacts.keys.shape == (MODEL.num_keys, backbone.vit.embed_dim)
        assert artifacts.keys.dtype == np.float32
        assert len({k.tobytes() for k in artifacts.keys}) == MODEL.num_keys  # distinct keys
        assert artifacts.meta["num_fit_images"] == 9 and artifacts.meta["num_calibration_images"] == 3
        assert artifacts.meta["model_config"] == MODEL.model_dump()
        fractions = [f for f, _ in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert TaskArtifacts.from_blobs(category, "patchcore", artifacts.blobs()).blobs() == artifacts.blobs()


def test_calibration_uses_only_held_out_normals(trained, backbone: Backbone, data_root: Path) -> None:
    for category, (artifacts, _) in trained.items():
        paths = list_images(data_root / category / "train" / "good")
        fit_paths, held_out = split_images(paths, TRAINING, MODEL.seed, None)
        calibration = artifacts.calibration
        assert len(calibration.normal_scores) == len(held_out) == 3
        assert len(calibration.normal_map_peaks) == len(held_out)

        expert = load_expert("patchcore", artifacts.expert_state)
        identifier = KeyTaskIdentifier({"self": artifacts.keys}, {"self": float("inf")})

        def scores_of(paths_):
            scores, peaks, distances = [], [], []
            for batch in feature_batches(backbone, paths_, MODEL, TRAINING.batch_size):
                output = expert.predict(batch)
                scores += output.scores.tolist()
                peaks += output.maps.reshape(len(output.maps), -1).max(axis=1).tolist()
                distances += identifier.distances(task_features(batch))[:, 0].tolist()
            return np.sort(scores), np.sort(peaks), np.array(distances)

        scores, peaks, distances = scores_of(held_out)
        np.testing.assert_allclose(calibration.normal_scores, scores, rtol=1e-5)
        np.testing.assert_allclose(calibration.normal_map_peaks, peaks, rtol=1e-5)
        assert calibration.task_bound == pytest.approx(distances.max() * MODEL.unknown_slack, rel=1e-5)
        assert calibration.threshold in calibration.normal_scores
        # The fit images give other scores: they were not what the calibration measured.
        fit_scores, _, _ = scores_of(fit_paths[: len(held_out)])
        assert not np.allclose(np.sort(fit_scores), scores, rtol=1e-3)


# -------------------------------------------------------------------------------------- inspector
@pytest.mark.integration
def test_inspector_routes_and_stays_stable_when_tasks_are_added(
    trained, backbone: Backbone, test_frames, redis_client: redis.Redis
) -> None:
    store = KnowledgeStore(redis_client, namespace="test-train")
    inspector = Inspector(backbone, MODEL)
    brick_images = [image for image, _ in test_frames["brick"]]

    # Nothing published: every frame is unknown.
    assert inspector.sync(store) == []
    results, _ = inspector.inspect(brick_images[:2])
    assert [r.match.category for r in results] == [None, None]

    store.publish(trained["brick"][0])
    assert inspector.sync(store) == ["brick"]
    assert inspector.sync(store) == []  # nothing new
    brick_expert = inspector.tasks["brick"].expert
    alone, _ = inspector.inspect(brick_images)

    store.publish(trained["gravel"][0])
    assert inspector.sync(store) == ["gravel"]
    assert inspector.store_version == 2 and set(inspector.tasks) == {"brick", "gravel"}
    assert inspector.tasks["brick"].expert is brick_expert  # incremental: brick was not reloaded
    together, _ = inspector.inspect(brick_images)

    # Adding gravel changed nothing for brick frames: same routing, bit-identical scores and maps.
    assert [r.match.category for r in together] == [r.match.category for r in alone]
    assert sum(r.match.category == "brick" for r in alone) >= len(TRAINED)  # several were scored
    for before, after in zip(alone, together):
        assert after.score_raw == before.score_raw
        assert after.threshold == before.threshold and after.task_version == before.task_version
        assert after.task_version == (1 if before.match.category == "brick" else None)
        if before.score_map is None:
            assert after.score_map is None
        else:
            assert before.score_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
            np.testing.assert_array_equal(after.score_map, before.score_map)

    # Routing with both tasks known, all categories mixed into one batch.
    frames = [(image, label, category) for category in (*TRAINED, UNTRAINED) for image, label in test_frames[category]]
    results, timings = inspector.inspect([image for image, _, _ in frames])
    assert timings.features_ms > 0 and timings.expert_ms > 0
    normal = [(r, c) for r, (_, label, c) in zip(results, frames) if not label and c in TRAINED]
    assert accuracy([r.match.category for r, _ in normal], [c for _, c in normal]) == 1.0
    for result, (_, label, category) in zip(results, frames):
        assert 0.0 <= result.match.margin <= 1.0
        if category in TRAINED:
            # Defective frames can fall beyond the unknown bound, but their nearest task is right.
            assert result.match.nearest == category
            if result.match.category is not None:
                assert result.expert == "patchcore" and result.score_raw is not None
                assert result.is_defective == (result.score_raw > result.threshold)
        else:
            assert result.match.category is None, result.match  # a texture with no task is unknown
            assert result.score_raw is None and result.is_defective is None and result.score_map is None

    # Mixed-batch scores equal the per-category ones up to float noise (the backbone's convolutions
    # round differently for another batch size): routing a sub-batch does not change an expert's output.
    mixed_brick = [r.score_raw for r, (_, _, c) in zip(results, frames) if c == "brick"]
    assert [m is None for m in mixed_brick] == [r.score_raw is None for r in alone]
    assert [m for m in mixed_brick if m is not None] == pytest.approx(
        [r.score_raw for r in alone if r.score_raw is not None], rel=1e-4)

    # Removing a task is incremental as well.
    store.remove("gravel")
    assert inspector.sync(store) == ["gravel"]
    assert set(inspector.tasks) == {"brick"} and inspector.tasks["brick"].expert is brick_expert
    gravel_results, _ = inspector.inspect([image for image, _ in test_frames["gravel"]])
    assert all(r.match.category != "gravel" for r in gravel_results)


@pytest.mark.integration
def test_inspector_follows_recalibration(trained, backbone: Backbone, test_frames, redis_client: redis.Redis) -> None:
    store = KnowledgeStore(redis_client, namespace="test-train")
    store.publish(trained["brick"][0])
    inspector = Inspector(backbone, MODEL)
    inspector.sync(store)
    expert = inspector.tasks["brick"].expert
    normal = [image for image, label in test_frames["brick"] if not label]

    calibration = trained["brick"][0].calibration.with_threshold(0.0)
    store.set_calibration("brick", calibration)
    assert inspector.sync(store) == ["brick"]
    assert inspector.tasks["brick"].artifacts.calibration == calibration
    results, _ = inspector.inspect(normal)
    assert all(r.threshold == 0.0 and r.is_defective for r in results if r.match.category == "brick")
    assert inspector.tasks["brick"].expert is not expert  # blobs changed: the task was reloaded


def test_automatic_expert_choice_fits_every_expert_and_keeps_the_best(backbone: Backbone, data_root: Path) -> None:
    progress: list[str] = []
    artifacts = train_task(
        "brick", data_root / "brick" / "train" / "good", None, backbone, MODEL, TRAINING,
        false_alarm_rate=0.1, on_progress=lambda f, m: progress.append(m),
    )
    choice = artifacts.meta["expert_choice"]
    assert [c["expert"] for c in choice] == list(EXPERT_TYPES)
    best = max(choice, key=lambda c: c["score"])
    assert artifacts.expert_name == best["expert"]
    assert all(0.0 <= c["image_auroc"] <= 1.0 and c["fit_seconds"] > 0 for c in choice)
    assert any(m.startswith("chose ") for m in progress)  # the reason reaches the training events
    assert type(load_expert(artifacts.expert_name, artifacts.expert_state)).name == artifacts.expert_name
