"""Training one task, and inspecting with several trained tasks loaded incrementally from the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from helpers import serve_one_task
from pipeline.core.audit import AUDIT_MAX_NORMALS
from pipeline.core.expert_selection import AUTO_EXPERTS
from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier
from pipeline.core.training import (
    MIN_TASK_IMAGES,
    ROLES,
    describe_skipped,
    load_frames,
    load_task_images,
    role_sizes,
    routing_tokens,
    split_roles,
    train_task,
)
from pipeline.data import datasets
from pipeline.data.datasets import list_images, write_synthetic_category
from pipeline.data.metrics import accuracy
from pipeline.experts import load_expert
from pipeline.experts.frames import run_on_frames
from pipeline.features.backbone import Backbones
from pipeline.features.imaging import decode_image
from schemas.config import ModelConfig, TrainingConfig
from schemas.spec import InputSpec

IMAGE_SIZE = 128
TRAINED = ("brick", "gravel")
UNTRAINED = "grass"
MODEL = ModelConfig(image_size=IMAGE_SIZE, coreset_ratio=0.1, max_coreset_size=500, num_keys=16, seed=0)
TRAINING = TrainingConfig(batch_size=16)  # 12 images: 7 fit, 1 validation, 3 calibration, 1 audit (role_sizes)
SPEC = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=IMAGE_SIZE, width=IMAGE_SIZE)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _labeled_test_images(root: Path, category: str):
    # The reader of test/<defect> folders (named test_images in older code, which pytest would collect).
    reader = getattr(datasets, "labeled_test_images", None) or getattr(datasets, "test_images")
    return reader(root, category)


@pytest.fixture(scope="module")
def backbones() -> Backbones:
    return Backbones.pretrained()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("training_data")
    for texture in (*TRAINED, UNTRAINED):
        write_synthetic_category(root, texture, texture, n_train=12, n_test_good=6, n_test_defect=6,
                                 size=IMAGE_SIZE, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(backbones: Backbones, data_root: Path) -> dict[str, tuple[TaskArtifacts, list[tuple[float, str]]]]:
    """category -> (artifacts, progress reports)."""
    out = {}
    for category in TRAINED:
        progress: list[tuple[float, str]] = []
        artifacts = train_task(
            category, data_root / category / "train" / "good", "patchcore", backbones, MODEL, TRAINING,
            false_alarm_rate=0.1, on_progress=lambda f, m, p=progress: p.append((f, m)), spec=SPEC,
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
def test_split_roles_disjoint_deterministic_and_capped(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:03d}.png" for i in range(40)]
    config = TrainingConfig(max_train_images=20)
    splits = split_roles(paths, config, seed=3)
    sizes = [len(getattr(splits, role)) for role in ROLES]
    # fractions first, then what is left of the held-out half lifts calibration towards its floor
    assert sizes == [10, 2, 7, 0, 1] and len(splits.unused) == 20
    everything = [p for role in (*ROLES, "unused") for p in getattr(splits, role)]
    assert sorted(everything) == sorted(paths) and len(set(everything)) == len(paths)  # disjoint, complete
    assert split_roles(paths, config, seed=3) == splits
    assert split_roles(paths, config, seed=4) != splits
    capped = split_roles(paths, config, seed=3, limit=8)
    assert [len(getattr(capped, r)) for r in ROLES] == [4, 1, 3, 0, 0] and len(capped.unused) == 32
    tiny = split_roles(paths[:4], config, 0)
    assert [len(getattr(tiny, r)) for r in ROLES] == [2, 1, 1, 0, 0]  # fit >= 2, one each to validate and calibrate
    held = split_roles(paths, TrainingConfig(), seed=3, hold_back=10)
    assert not set(held.unused) & {p for r in ROLES for p in getattr(held, r)}
    assert len(held.unused) == 10 and sum(len(getattr(held, r)) for r in ROLES) == 30  # no cap: every other image
    with pytest.raises(ValueError, match="at least 4"):
        split_roles(paths[:3], config, 0)
    with pytest.raises(ValueError, match="fit split"):
        TrainingConfig(validation_fraction=0.2, calibration_fraction=0.3, audit_fraction=0.1)


def test_every_image_is_used_with_floors_and_statistics_only_for_aligned_products() -> None:
    config = TrainingConfig()
    assert role_sizes(1000, config, aligned=True) == {"fit": 584, "validation": 100, "calibration": 200,
                                                      "statistics": 100, "audit": AUDIT_MAX_NORMALS}  # no unread audit normals
    assert role_sizes(1000, config, aligned=False)["fit"] == 684  # no statistics: fit takes them
    sizes = role_sizes(600, config, aligned=False)  # calibration's floor holds where the images exist
    assert sizes["calibration"] >= 100 and sizes["fit"] == 600 - sum(v for k, v in sizes.items() if k != "fit")
    assert sizes["fit"] >= 300  # the held-out roles never take more than half
    small = role_sizes(300, config, aligned=True)  # floors ask more than half: calibration is lifted first
    assert small == {"fit": 150, "validation": 30, "calibration": 75, "statistics": 30, "audit": 15}
    assert role_sizes(12, config, aligned=True)["statistics"] == 0  # too few maps for a spread: they fit


def test_bad_training_files_are_skipped_by_name(tmp_path: Path, data_root: Path) -> None:
    good = list_images(data_root / "brick" / "train" / "good")[:3]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(datasets.encode_png(np.zeros((8, 8, 3), dtype=np.uint8)))
    frames, kept, skipped = load_frames([*good, tmp_path / "empty.png", tmp_path / "text.png", tiny], min_side=32)
    assert kept == good and len(frames) == 3
    assert set(skipped) == {"empty.png", "text.png", "tiny.png"}
    assert "smaller than 32" in skipped["tiny.png"] and "not_an_image" in skipped["text.png"]
    assert skipped["empty.png"] == "empty file (0 bytes)"


def _noise_pngs(folder: Path, count: int, side: int = 48, prefix: str = "good") -> list[Path]:
    rng = np.random.default_rng(count)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{i:03d}.png" for i in range(count)]
    for path in paths:
        path.write_bytes(datasets.encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
    return paths


def test_training_images_over_the_pixel_bound_or_corrupt_are_skipped(tmp_path: Path) -> None:
    good = _noise_pngs(tmp_path, 2)
    whole = datasets.encode_png(np.zeros((40, 40, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "flipped.jpg").write_bytes(b"\xff\xd8\xff" + bytes(200))
    frames, kept, skipped = load_frames([*good, tmp_path / "cut.png", tmp_path / "flipped.jpg"], 32)
    assert kept == good and set(skipped) == {"cut.png", "flipped.jpg"}
    assert all(reason.startswith("corrupt_image") for reason in skipped.values())
    # The upper bound is read from the header: 48 x 48 = 2304 pixels is over a 2000-pixel bound.
    frames, kept, skipped = load_frames(good, 32, max_pixels=2000)
    assert kept == [] and skipped[good[0].name] == "oversize: 48x48 exceeds 2000 pixels"


def test_six_one_pixel_images_are_refused_naming_each(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"dot_{i}.png").write_bytes(datasets.encode_png(np.zeros((1, 1, 3), dtype=np.uint8)))
    with pytest.raises(ValueError, match=f"only 0 of 6 images .* at least {MIN_TASK_IMAGES}") as caught:
        load_task_images(tmp_path, TRAINING, seed=0)
    assert all(f"dot_{i}.png (1x1 is smaller than 32 px)" in str(caught.value) for i in range(6))
    # The add is refused before any model is touched: no backbone needed to see it.
    with pytest.raises(ValueError, match="only 0 of 6 images"):
        train_task("dots", tmp_path, "patchcore", None, MODEL, TRAINING, false_alarm_rate=0.1)


def test_too_few_usable_lists_a_bounded_number_of_skipped_files(tmp_path: Path) -> None:
    _noise_pngs(tmp_path, 3)
    for i in range(30):
        (tmp_path / f"empty_{i:02d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match="only 3 of 33 images") as caught:
        load_task_images(tmp_path, TRAINING, seed=0)
    message = str(caught.value)
    assert message.count("(empty file (0 bytes))") == 10 and message.endswith("... and 20 more")
    assert describe_skipped({"a.png": "x" * 500}) == "a.png (" + "x" * 117 + "...)"


def test_a_bad_file_is_replaced_by_the_next_image_not_left_in_a_role(tmp_path: Path) -> None:
    good = _noise_pngs(tmp_path, 20)
    (tmp_path / "empty.png").write_bytes(b"")
    read = 0
    for seed in range(8):  # wherever the seeded order puts it, a full cap of good images is dealt
        images = load_task_images(tmp_path, TrainingConfig(max_train_images=12), seed=seed)
        read += bool(images.skipped)
        roles = images.splits.names()
        # Named as skipped if it was read; past the cap it is never read, like any unused image.
        assert images.skipped == {"empty.png": "empty file (0 bytes)"} or "empty.png" in roles["unused"]
        assert sum(len(roles[r]) for r in ROLES) == 12
        assert all("empty.png" not in roles[r] for r in ROLES)
        assert [len(images.frames[r]) for r in ROLES[:3]] == [len(roles[r]) for r in ROLES[:3]]
    assert read > 0  # some seed did read it, and stepped past it
    # Without bad files the split is exactly split_roles' (tasks trained before keep their roles).
    (tmp_path / "empty.png").unlink()
    for limit in (None, 8):
        images = load_task_images(tmp_path, TRAINING, seed=3, limit=limit)
        assert images.splits == split_roles(good, TRAINING, seed=3, limit=limit, aligned=images.aligned)
        assert images.skipped == {} and images.aligned  # noise images of one size


def test_twenty_good_images_and_an_empty_file_train(backbones: Backbones, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_synthetic_category(root, "brick", "brick", n_train=20, n_test_good=1, n_test_defect=1, size=IMAGE_SIZE,
                             seed=2)
    folder = root / "brick" / "train" / "good"
    (folder / "empty.png").write_bytes(b"")
    progress: list[str] = []
    artifacts = train_task("brick", folder, "patchcore", backbones, MODEL, TRAINING, false_alarm_rate=0.1,
                           on_progress=lambda fraction, message: progress.append(message), spec=SPEC)
    assert artifacts.meta["skipped_files"] == {"empty.png": "empty file (0 bytes)"}
    assert "empty.png" in progress[0]  # the operator sees it in the first progress event
    roles = artifacts.meta["splits"]
    assert sum(len(roles[r]) for r in ROLES) == 20 and all("empty.png" not in roles[r] for r in ROLES)


# --------------------------------------------------------------------------------------- training
def test_trained_artifacts_shape_spec_and_meta(trained, backbones: Backbones) -> None:
    for category, (artifacts, progress) in trained.items():
        assert artifacts.category == category and artifacts.expert_name == "patchcore"
        assert artifacts.keys.shape == (MODEL.num_keys, backbones.vit.embed_dim)
        assert artifacts.keys.dtype == np.float32
        assert len({k.tobytes() for k in artifacts.keys}) == MODEL.num_keys  # distinct keys
        meta = artifacts.meta
        assert (meta["num_fit_images"], meta["num_validation_images"], meta["num_calibration_images"]) == (7, 1, 3)
        assert [len(meta["splits"][r]) for r in (*ROLES, "unused")] == [7, 1, 3, 0, 1, 0]
        assert meta["image_decision"] == artifacts.image_decision.describe() and meta["frame_budget_ms"] == 250.0
        assert meta["model_config"] == MODEL.model_dump() and meta["expert_ms_per_frame"] > 0
        assert artifacts.spec == SPEC and artifacts.input_spec == SPEC
        fractions = [f for f, _ in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        again = TaskArtifacts.from_blobs(category, "patchcore", artifacts.blobs())
        assert again.blobs() == artifacts.blobs() and again.spec == SPEC


def test_calibration_uses_only_the_calibration_split(trained, backbones: Backbones, data_root: Path) -> None:
    for category, (artifacts, _) in trained.items():
        folder = data_root / category / "train" / "good"
        names = artifacts.meta["splits"]
        calibration = artifacts.calibration
        assert len(calibration.normal_scores) == len(names["calibration"]) == 3
        expert = load_expert("patchcore", artifacts.expert_state)
        identifier = KeyTaskIdentifier({"self": artifacts.keys}, {"self": float("inf")})

        def scores_of(role: str):
            frames, _, _ = load_frames([folder / n for n in names[role]], 32)
            outputs = run_on_frames(expert, artifacts.spec, backbones, frames)
            distances = identifier.distances(routing_tokens(backbones, frames, MODEL, 16))[:, 0]
            scores = artifacts.image_decision.scores(outputs.scores, outputs.maps)  # the task's own decision
            return np.sort(scores), np.sort([m.max() for m in outputs.maps]), distances.numpy()

        scores, peaks, distances = scores_of("calibration")
        np.testing.assert_allclose(calibration.normal_scores, scores, rtol=1e-5)
        np.testing.assert_allclose(calibration.normal_map_peaks, peaks, rtol=1e-5)
        assert calibration.task_bound == pytest.approx(distances.max() * MODEL.unknown_slack, rel=1e-5)
        assert calibration.threshold in calibration.normal_scores
        # the calibration normals that score highest are named, highest first, with their scores
        highest = artifacts.meta["highest_calibration_normals"]
        assert [n["image"] for n in highest] and {n["image"] for n in highest} <= set(names["calibration"])
        np.testing.assert_allclose([n["score"] for n in highest], scores[::-1][: len(highest)], rtol=1e-5)
        assert [n["above_threshold"] for n in highest] == [n["score"] > calibration.threshold for n in highest]
        # The fit and validation images give other scores: they were not what the calibration measured.
        other, _, _ = scores_of("fit")
        assert not np.allclose(other[: len(scores)], scores, rtol=1e-3)


# -------------------------------------------------------------------------------------- inspector
@pytest.mark.integration
def test_inspector_routes_and_stays_stable_when_tasks_are_added(
    trained, backbones: Backbones, test_frames, redis_client: redis.Redis
) -> None:
    store = KnowledgeStore(redis_client, namespace="test-train")
    inspector = Inspector(backbones, MODEL)
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
            assert before.score_map.shape == brick_images[0].shape[:2]  # at the frame's own resolution
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
def test_inspector_follows_recalibration(trained, backbones: Backbones, test_frames, redis_client: redis.Redis) -> None:
    store = KnowledgeStore(redis_client, namespace="test-train")
    store.publish(trained["brick"][0])
    inspector = Inspector(backbones, MODEL)
    inspector.sync(store)
    expert = inspector.tasks["brick"].expert
    normal = [image for image, label in test_frames["brick"] if not label]

    # Far below any normal score (a threshold must be positive): every frame is flagged.
    calibration = trained["brick"][0].calibration.with_threshold(1e-9)
    store.set_calibration("brick", calibration)
    assert inspector.sync(store) == ["brick"]
    assert inspector.tasks["brick"].artifacts.calibration == calibration
    results, _ = inspector.inspect(normal)
    assert all(r.threshold == 1e-9 and r.is_defective for r in results if r.match.category == "brick")
    assert inspector.tasks["brick"].expert is not expert  # blobs changed: the task was reloaded


def test_automatic_choice_judges_every_candidate_on_validation_and_keeps_the_best(backbones: Backbones, data_root: Path) -> None:
    progress: list[str] = []
    artifacts = train_task(
        "brick", data_root / "brick" / "train" / "good", None, backbones, MODEL, TRAINING,
        false_alarm_rate=0.1, on_progress=lambda f, m: progress.append(m),
    )
    choice = artifacts.meta["expert_choice"]
    singles = [c for c in choice if not c["members"]]
    order = [AUTO_EXPERTS.index(c["expert"]) for c in singles]
    assert order == sorted(order) and set(order) == set(range(len(AUTO_EXPERTS)))  # every automatic expert, in turn
    # ensembles come after every single candidate; with one validation normal, as here, there is no spread
    # to scale members by, so none is composed (tests/test_benchmark.py and test_ensemble.py cover them)
    assert choice[len(singles):] == []
    eligible = [c for c in choice if c["status"] == "ok"]
    best = max(eligible, key=lambda c: c["score"])
    assert artifacts.expert_name == best["expert"] and artifacts.spec == InputSpec(**best["spec"])
    assert artifacts.spec.resize != "squeeze"  # new tasks never squeeze their frames
    assert all(0.0 <= c["image_auroc"] <= 1.0 and c["ms_per_frame"] > 0 for c in eligible)
    assert any(m.startswith("chose ") for m in progress)  # the reason reaches the training events
    assert type(load_expert(artifacts.expert_name, artifacts.expert_state)).name == artifacts.expert_name


@pytest.mark.integration
def test_a_task_at_routings_geometry_reads_routings_vit_pass(backbones: Backbones, data_root: Path,
                                                            redis_client: redis.Redis, monkeypatch) -> None:
    """No work done twice: a ViT expert whose spec is routing's own squeeze and whose blocks are no deeper
    than the keys gets its tokens from the routing pass; the ViT runs once per batch."""
    from pipeline.experts.dinov2 import DINOv2Patch, DINOv2PatchConfig
    from schemas.spec import routing_spec

    spec = routing_spec(MODEL.image_size)
    frames, _, _ = load_frames(list_images(data_root / "brick" / "train" / "good")[:6], 32)
    expert = DINOv2Patch(DINOv2PatchConfig(layers=(5, 7), final_norm=False, masking="off"))
    from pipeline.experts.frames import fit_batches

    expert.fit(fit_batches(frames, spec, backbones, 8), backbones.default)
    inspector = serve_one_task(redis_client, "test-shared-pass", "brick", expert, spec, backbones, MODEL)
    assert inspector.shared_layers() == (5, 7)
    calls = []
    original = backbones.vit.multi_layer_tokens
    monkeypatch.setattr(backbones.vit, "multi_layer_tokens", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    results, _ = inspector.inspect(frames[:3])
    assert [tuple(c) for c in calls] == [(5, 7)]  # one forward: keys (block 7) and the expert's blocks together
    alone = run_on_frames(expert, spec, backbones, frames[:3])  # the expert running the ViT itself
    np.testing.assert_allclose([r.score_raw for r in results], alone.scores, rtol=1e-5)
