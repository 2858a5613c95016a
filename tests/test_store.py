"""The Redis key-prompt-knowledge store, against the session's real Redis."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import redis
import torch

from pipeline.features.backbone import FeatureBatch
from pipeline.core.calibration import Calibration
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.core.store import KnowledgeStore, StoreError
from pipeline.core.task import TaskArtifacts
from schemas.spec import InputSpec, legacy_spec
from schemas.store import BLOB_KINDS

pytestmark = pytest.mark.integration


def _expert_state(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    batch = FeatureBatch(
        pixels=torch.rand(2, 3, 32, 32, generator=g),
        stages={2: torch.rand(2, 40, 4, 4, generator=g), 3: torch.rand(2, 112, 2, 2, generator=g)},
    )
    expert = PatchCore(PatchCoreConfig(coreset_ratio=0.5, projection_dim=16, map_sigma=1.0, seed=seed))
    expert.fit([batch])
    return expert.to_bytes()


SPEC = InputSpec(backbone="efficientnet_lite2", resize="tiles", height=256, width=256, tile_overlap=32)


def make_task(category: str, seed: int = 0, spec: InputSpec | None = SPEC) -> TaskArtifacts:
    """`spec` None: a task as stored before per-task specs existed (no spec blob)."""
    rng = np.random.default_rng(seed)
    calibration = Calibration.from_normals(
        rng.gamma(2.0, size=12), rng.gamma(3.0, size=12), rng.uniform(1, 2, size=12), 0.05, 1.5
    )
    return TaskArtifacts(
        category=category,
        expert_name="patchcore",
        keys=rng.normal(size=(8, 16)).astype(np.float32),
        expert_state=_expert_state(seed),
        calibration=calibration,
        meta={"train_dir": f"/data/{category}", "num_fit_images": 10, "seed": seed},
        spec=spec,
    )


def assert_same_task(a: TaskArtifacts, b: TaskArtifacts) -> None:
    assert a.category == b.category and a.expert_name == b.expert_name
    np.testing.assert_array_equal(a.keys, b.keys)
    assert a.keys.dtype == b.keys.dtype
    assert a.expert_state == b.expert_state
    assert a.calibration == b.calibration
    assert a.meta == b.meta
    assert a.spec == b.spec and a.input_spec == b.input_spec
    assert a.blobs() == b.blobs()


def blob_snapshot(client: redis.Redis, store: KnowledgeStore, category: str) -> dict[str, str]:
    """kind -> sha256 of the bytes Redis holds right now for one task's blobs."""
    entry = store.manifest().tasks[category]
    return {kind: hashlib.sha256(client.get(store._blob_key(d))).hexdigest() for kind, d in entry.blobs.items()}


@pytest.fixture
def store(redis_client: redis.Redis) -> KnowledgeStore:
    return KnowledgeStore(redis_client, namespace="test-kpk")


# --------------------------------------------------------------------------------------- basics
def test_empty_store(store: KnowledgeStore) -> None:
    assert store.version() == 0
    manifest = store.manifest()
    assert manifest.version == 0 and manifest.tasks == {}
    assert store.task_sizes() == {}
    with pytest.raises(StoreError):
        store.manifest_at(1)


def test_publish_and_load_round_trip(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    task = make_task("brick", seed=1)
    version = store.publish(task)
    assert version == 1 and store.version() == 1

    manifest = store.manifest()
    assert manifest.version == 1 and set(manifest.tasks) == {"brick"}
    entry = manifest.tasks["brick"]
    assert entry.task_version == 1 and entry.expert == "patchcore"
    assert set(entry.blobs) == set(BLOB_KINDS)
    blobs = task.blobs()
    for kind, digest in entry.blobs.items():
        assert digest == hashlib.sha256(blobs[kind]).hexdigest()
        assert redis_client.get(f"test-kpk:blob:{digest}") == blobs[kind]
    assert store.manifest_at(1) == manifest

    assert_same_task(store.load_task(entry), task)


def test_per_task_specs_round_trip_and_old_tasks_keep_theirs(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    """A task stored before specs (no spec blob) loads with the square squeeze it was trained with and
    keeps its bytes; a task with a spec gets exactly that spec back; adding it touches no old byte."""
    old = make_task("tile", seed=2, spec=None)
    store.publish(old)
    old_entry = store.manifest().tasks["tile"]
    assert "spec" not in old_entry.blobs
    before = blob_snapshot(redis_client, store, "tile")

    store.publish(make_task("screw", seed=3))
    manifest = store.manifest()
    assert manifest.tasks["tile"] == old_entry and blob_snapshot(redis_client, store, "tile") == before
    loaded_old = store.load_task(manifest.tasks["tile"])
    assert loaded_old.spec is None and loaded_old.input_spec == legacy_spec(224)
    assert loaded_old.blobs() == old.blobs()
    loaded_new = store.load_task(manifest.tasks["screw"])
    assert loaded_new.spec == SPEC and set(manifest.tasks["screw"].blobs) == set(BLOB_KINDS)


def test_blobs_are_deterministic_and_shared(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    assert make_task("brick", seed=1).blobs() == make_task("brick", seed=1).blobs()
    store.publish(make_task("brick", seed=1))
    keys_before = set(redis_client.keys("test-kpk:blob:*"))
    store.publish(make_task("brick", seed=1))  # republishing identical content adds no blob
    assert set(redis_client.keys("test-kpk:blob:*")) == keys_before
    assert store.version() == 2 and store.manifest().tasks["brick"].task_version == 2


def test_publishing_b_leaves_a_byte_identical(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    a = make_task("brick", seed=1)
    store.publish(a)
    entry_a = store.manifest().tasks["brick"]
    before = blob_snapshot(redis_client, store, "brick")

    version = store.publish(make_task("gravel", seed=2))
    assert version == 2

    manifest = store.manifest()
    assert set(manifest.tasks) == {"brick", "gravel"}
    assert manifest.tasks["brick"] == entry_a  # same digests, sizes, task_version, timestamp
    assert blob_snapshot(redis_client, store, "brick") == before
    assert before == entry_a.blobs  # the stored bytes still hash to their address
    # Content-addressed: the two tasks share only what is equal byte for byte (here their input spec).
    shared = {k for k in entry_a.blobs if manifest.tasks["gravel"].blobs[k] == entry_a.blobs[k]}
    assert shared == {"spec"}
    assert_same_task(store.load_task(manifest.tasks["brick"]), a)


def test_replacing_a_task_bumps_only_its_entry(store: KnowledgeStore) -> None:
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("gravel", seed=2))
    gravel = store.manifest().tasks["gravel"]
    store.publish(make_task("brick", seed=3))
    manifest = store.manifest()
    assert manifest.tasks["brick"].task_version == 3
    assert manifest.tasks["gravel"] == gravel
    assert_same_task(store.load_task(manifest.tasks["brick"]), make_task("brick", seed=3))
    # the old brick is still readable from its manifest version: blobs are never deleted
    assert_same_task(store.load_task(store.manifest_at(1).tasks["brick"]), make_task("brick", seed=1))


# ---------------------------------------------------------------------------- versions and edits
def test_remove_creates_version_and_keeps_history(store: KnowledgeStore) -> None:
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("gravel", seed=2))
    v1, v2 = store.manifest_at(1), store.manifest_at(2)

    version = store.remove("brick")
    assert version == 3 and store.version() == 3
    assert set(store.manifest().tasks) == {"gravel"}
    assert store.manifest().tasks["gravel"] == v2.tasks["gravel"]
    # Old versions are untouched and their tasks still load.
    assert store.manifest_at(1) == v1 and store.manifest_at(2) == v2
    assert set(store.manifest_at(2).tasks) == {"brick", "gravel"}
    assert_same_task(store.load_task(v2.tasks["brick"]), make_task("brick", seed=1))
    assert store.manifest_at(3) == store.manifest()


def test_set_calibration_replaces_only_calibration(store: KnowledgeStore) -> None:
    task = make_task("brick", seed=1)
    store.publish(task)
    store.publish(make_task("gravel", seed=2))
    old = store.manifest().tasks["brick"]
    new_calibration = task.calibration.with_false_alarm_rate(0.3)
    assert new_calibration != task.calibration

    version = store.set_calibration("brick", new_calibration)
    assert version == 3
    entry = store.manifest().tasks["brick"]
    assert entry.task_version == 3
    assert entry.blobs["calibration"] != old.blobs["calibration"]
    assert {k: v for k, v in entry.blobs.items() if k != "calibration"} == {
        k: v for k, v in old.blobs.items() if k != "calibration"
    }
    assert entry.blob_sizes["calibration"] == len(new_calibration.to_bytes())
    loaded = store.load_task(entry)
    assert loaded.calibration == new_calibration
    assert loaded.expert_state == task.expert_state and np.array_equal(loaded.keys, task.keys)
    # the previous version still has the previous calibration
    assert store.manifest_at(2).tasks["brick"] == old
    assert store.load_task(store.manifest_at(2).tasks["brick"]).calibration == task.calibration
    assert store.manifest().tasks["gravel"] == store.manifest_at(2).tasks["gravel"]


def test_unknown_category_raises_and_changes_nothing(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    store.publish(make_task("brick", seed=1))
    manifest = store.manifest()
    keys_before = set(redis_client.keys("*"))
    calibration = make_task("x", seed=5).calibration
    with pytest.raises(StoreError, match="unknown category"):
        store.remove("nope")
    with pytest.raises(StoreError, match="unknown category"):
        store.set_calibration("nope", calibration)
    assert store.version() == 1 and store.manifest() == manifest
    assert set(redis_client.keys("*")) == keys_before  # no stray blob from the aborted transaction
    with pytest.raises(StoreError):
        store.manifest_at(2)


# ------------------------------------------------------------------------------------ integrity
@pytest.mark.parametrize("kind", BLOB_KINDS)
def test_corrupted_blob_detected_on_load(store: KnowledgeStore, redis_client: redis.Redis, kind: str) -> None:
    store.publish(make_task("brick", seed=1))
    entry = store.manifest().tasks["brick"]
    key = f"test-kpk:blob:{entry.blobs[kind]}"
    data = bytearray(redis_client.get(key))
    data[len(data) // 2] ^= 0x01  # one flipped bit
    redis_client.set(key, bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        store.load_task(entry)


def test_missing_blob_detected_on_load(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    store.publish(make_task("brick", seed=1))
    entry = store.manifest().tasks["brick"]
    redis_client.delete(f"test-kpk:blob:{entry.blobs['keys']}")
    with pytest.raises(StoreError, match="missing"):
        store.load_task(entry)


def test_namespaces_are_isolated(redis_client: redis.Redis) -> None:
    one, two = KnowledgeStore(redis_client, "ns-one"), KnowledgeStore(redis_client, "ns-two")
    one.publish(make_task("brick", seed=1))
    assert two.version() == 0 and two.manifest().tasks == {}


def test_task_sizes_report_bytes(store: KnowledgeStore) -> None:
    brick, gravel = make_task("brick", seed=1), make_task("gravel", seed=2)
    store.publish(brick)
    store.publish(gravel)
    sizes = store.task_sizes()
    assert sizes == {
        "brick": sum(len(b) for b in brick.blobs().values()),
        "gravel": sum(len(b) for b in gravel.blobs().values()),
    }
    entry = store.manifest().tasks["brick"]
    assert entry.blob_sizes == {kind: len(data) for kind, data in brick.blobs().items()}
    assert sizes["brick"] > len(brick.expert_state) > 0



def test_size_report_breaks_a_task_into_keys_prompt_and_knowledge(store: KnowledgeStore) -> None:
    """A UCAD task: its expert state holds the prompt and the knowledge; the report names each part."""
    from pipeline.common.serialization import pack

    ucad = make_task("tile", seed=3)
    state = pack({"expert": "ucad"}, {"prompt": np.zeros((8, 4, 16), np.float32), "knowledge": np.ones((50, 32), np.float32)})
    ucad = TaskArtifacts(ucad.category, "ucad", ucad.keys, state, ucad.calibration, ucad.meta)
    store.publish(ucad)
    report = store.size_report()["tile"]
    assert report["expert.prompt"] == 8 * 4 * 16 * 4 and report["expert.knowledge"] == 50 * 32 * 4
    assert report["keys"] == len(ucad.blobs()["keys"]) and report["calibration"] == len(ucad.calibration.to_bytes())
    assert report["total"] == store.task_sizes()["tile"]

# ---------------------------------------------------------------------------------- concurrency
def test_concurrent_publishers_all_land(stack, redis_client: redis.Redis) -> None:
    per_thread = 12
    tasks = {name: [make_task(f"{name}-{i}", seed=i) for i in range(per_thread)] for name in ("left", "right")}
    barrier = threading.Barrier(2)
    versions: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def publisher(name: str) -> None:
        # Each thread has its own client (own connections), as separate workers would.
        client = redis.Redis.from_url(stack.config.redis_url)
        try:
            store = KnowledgeStore(client, namespace="test-kpk")
            barrier.wait()
            versions[name] = [store.publish(task) for task in tasks[name]]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=publisher, args=(name,)) for name in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    total = 2 * per_thread
    store = KnowledgeStore(redis_client, namespace="test-kpk")
    manifest = store.manifest()
    assert store.version() == total and manifest.version == total
    assert set(manifest.tasks) == {t.category for ts in tasks.values() for t in ts}  # nothing overwritten
    for name, vs in versions.items():
        assert vs == sorted(vs) and len(set(vs)) == per_thread, (name, vs)  # strictly increasing
    assert sorted(versions["left"] + versions["right"]) == list(range(1, total + 1))  # each version once
    # Every intermediate manifest is one publish on top of the previous one.
    previous: set[str] = set()
    for v in range(1, total + 1):
        names = set(store.manifest_at(v).tasks)
        assert previous < names and len(names - previous) == 1, v
        previous = names
    for entry in manifest.tasks.values():
        assert entry.task_version in versions["left"] + versions["right"]
        store.load_task(entry)  # every blob is intact
