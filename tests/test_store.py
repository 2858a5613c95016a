"""The Redis key-prompt-knowledge store, against the session's real Redis."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import redis
import torch

from pipeline.features.backbone import FeatureBatch
from pipeline.core.calibration import Calibration
from pipeline.core.decision import ImageDecision, MapStatistics
from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
from pipeline.core.audit import make_audit_set
from pipeline.core.store import KnowledgeStore, StoreError
from pipeline.core.task import TaskArtifacts
from schemas.spec import InputSpec, legacy_spec
from schemas.store import BLOB_KINDS, EPOCH, StoreManifest

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
        # Tasks stored before specs predate audit sets too.
        audit=None if spec is None else make_audit_set([rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)], seed).to_bytes(),
        # ... and image decisions: a position-aware one here
        decision=None if spec is None else ImageDecision(
            "top_k_mean", MapStatistics.from_maps([rng.random((24, 32), dtype=np.float32) for _ in range(3)])),
    )


def assert_same_task(a: TaskArtifacts, b: TaskArtifacts) -> None:
    assert a.category == b.category and a.expert_name == b.expert_name
    np.testing.assert_array_equal(a.keys, b.keys)
    assert a.keys.dtype == b.keys.dtype
    assert a.expert_state == b.expert_state
    assert a.calibration == b.calibration
    assert a.meta == b.meta
    assert a.spec == b.spec and a.input_spec == b.input_spec and a.audit == b.audit
    assert a.image_decision.describe() == b.image_decision.describe()
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
    assert loaded_old.decision is None and loaded_old.image_decision.aggregation == "expert"  # its own score, as before
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
    # the old brick is still readable from its manifest version: only garbage collection deletes blobs
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


# ------------------------------------------------------------------------------------- commands
def test_command_ids_are_recorded_and_applied_reports_their_version(
    store: KnowledgeStore, redis_client: redis.Redis
) -> None:
    task = make_task("brick", seed=1)
    assert store.publish(task, command_id="train-1") == 1
    assert store.publish(make_task("gravel", seed=2)) == 2  # no command id: none recorded
    assert store.set_calibration("brick", task.calibration.with_false_alarm_rate(0.3), command_id="thr-1") == 3
    assert store.remove("gravel", command_id="rm-1") == 4

    assert [store.manifest_at(v).command_id for v in (1, 2, 3, 4)] == ["train-1", None, "thr-1", "rm-1"]
    assert store.manifest_at(1).tasks["brick"].command_id == "train-1"
    assert store.manifest_at(2).tasks["gravel"].command_id is None
    assert store.manifest().tasks["brick"].command_id == "thr-1"  # the command that last wrote the entry
    assert [store.applied(c) for c in ("train-1", "thr-1", "rm-1", "never")] == [1, 3, 4, None]
    assert redis_client.hgetall("test-kpk:commands") == {b"train-1": b"1", b"thr-1": b"3", b"rm-1": b"4"}


def test_a_redelivered_command_changes_nothing(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    store.publish(make_task("brick", seed=1), command_id="train-1")
    store.remove("brick", command_id="rm-1")
    keys_before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
    # Redelivered after it was applied, even though applying it again would now fail or differ:
    assert store.publish(make_task("brick", seed=3), command_id="train-1") == 1
    assert store.remove("brick", command_id="rm-1") == 2
    assert store.version() == 2 and "brick" not in store.manifest().tasks
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == keys_before


def test_concurrent_redeliveries_apply_once(stack, store: KnowledgeStore) -> None:
    task = make_task("brick", seed=1)
    barrier = threading.Barrier(4)
    versions: list[int] = []

    def deliver() -> None:
        client = redis.Redis.from_url(stack.config.redis_url)
        try:
            barrier.wait()
            versions.append(KnowledgeStore(client, "test-kpk").publish(task, command_id="train-1"))
        finally:
            client.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert versions == [1, 1, 1, 1] and store.version() == 1


def test_manifests_stored_before_the_new_fields_still_parse(store: KnowledgeStore, redis_client: redis.Redis) -> None:
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("gravel", seed=2))
    for key in ("test-kpk:manifest:1", "test-kpk:manifest:2", "test-kpk:manifest"):  # rewrite in the old format
        old = json.loads(redis_client.get(key))
        del old["command_id"], old["published_at"]
        for entry in old["tasks"].values():
            del entry["command_id"], entry["restored_from"]
        redis_client.set(key, json.dumps(old))

    manifest = store.manifest()
    assert manifest.command_id is None and manifest.published_at is None
    assert all(e.command_id is None and e.restored_from is None for e in manifest.tasks.values())
    assert manifest.written_at() == manifest.tasks["gravel"].published_at  # newest entry: this publish's
    assert StoreManifest.model_validate_json('{"schema_version": 1, "version": 0, "tasks": {}}').written_at() == EPOCH
    assert store.publish(make_task("tile", seed=3), command_id="c") == 3
    assert store.manifest().tasks["brick"] == manifest.tasks["brick"]
    report = store.collect_garbage(keep_versions=1, grace_s=0, now=later())
    assert report.kept_versions == [3] and report.manifests_deleted == 2
    for entry in store.manifest().tasks.values():
        store.load_task(entry)


# ------------------------------------------------------------------------------------- rollback
def test_rollback_restores_byte_identical_blobs_under_a_new_version(
    store: KnowledgeStore, redis_client: redis.Redis
) -> None:
    original = make_task("brick", seed=1)
    store.publish(original)
    store.publish(make_task("gravel", seed=2))
    store.set_calibration("brick", original.calibration.with_false_alarm_rate(0.3))
    store.publish(make_task("brick", seed=3))
    first = store.manifest_at(1).tasks["brick"]
    gravel = store.manifest().tasks["gravel"]
    assert store.manifest().tasks["brick"].blobs != first.blobs

    version = store.rollback("brick", 1, command_id="rb-1")
    assert version == 5 and store.version() == 5 and store.applied("rb-1") == 5
    manifest = store.manifest()
    entry = manifest.tasks["brick"]
    assert entry.blobs == first.blobs and entry.blob_sizes == first.blob_sizes and entry.parts == first.parts
    assert entry.task_version == 5 and entry.restored_from == 1 and entry.command_id == "rb-1"
    assert entry.published_at > first.published_at and entry.published_at == manifest.published_at
    assert manifest.command_id == "rb-1" and manifest.tasks["gravel"] == gravel
    assert blob_snapshot(redis_client, store, "brick") == first.blobs  # the bytes hash to v1's addresses
    assert_same_task(store.load_task(entry), original)
    assert [e.task_version for e in store.history("brick")] == [1, 3, 4, 5]
    assert store.history("brick")[0] == first and store.history("brick")[-1] == entry
    assert [e.task_version for e in store.history("gravel")] == [2]


def test_rollback_restores_a_removed_category(store: KnowledgeStore) -> None:
    brick = make_task("brick", seed=1)
    store.publish(brick)
    store.publish(make_task("gravel", seed=2))
    store.remove("brick")
    assert "brick" not in store.manifest().tasks
    assert [e.task_version for e in store.history("brick")] == [1]  # removed, yet its history is kept

    assert store.rollback("brick", 1) == 4
    entry = store.manifest().tasks["brick"]
    assert entry.restored_from == 1 and entry.task_version == 4 and entry.command_id is None
    assert set(store.manifest().tasks) == {"brick", "gravel"}
    assert_same_task(store.load_task(entry), brick)


def test_rollback_to_an_unknown_or_lost_version_fails_and_changes_nothing(
    store: KnowledgeStore, redis_client: redis.Redis
) -> None:
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("gravel", seed=2))
    store.publish(make_task("brick", seed=3))
    keys_before = {k: redis_client.dump(k) for k in redis_client.keys("*")}

    with pytest.raises(StoreError, match=r"'brick' to task version 2: no such version .*\[1, 3\]"):
        store.rollback("brick", 2, command_id="rb")  # version 2 exists, but it wrote gravel
    with pytest.raises(StoreError, match="no such version"):
        store.rollback("brick", 99, command_id="rb")
    with pytest.raises(StoreError, match="no such version"):
        store.rollback("tile", 1, command_id="rb")
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == keys_before
    assert store.applied("rb") is None

    # A blob the old version needs is gone (deleted behind the store's back).
    lost = store.manifest_at(1).tasks["brick"].blobs["keys"]
    redis_client.delete(f"test-kpk:blob:{lost}")
    with pytest.raises(StoreError, match=f"keys blob {lost} is gone"):
        store.rollback("brick", 1, command_id="rb")
    assert store.version() == 3 and store.applied("rb") is None

    # Its manifests were garbage-collected.
    store.collect_garbage(keep_versions=1, grace_s=0, now=later())
    with pytest.raises(StoreError, match="manifest version 1 was garbage-collected"):
        store.rollback("brick", 1)
    assert store.version() == 3


def test_rollback_racing_a_garbage_collection_never_commits_a_missing_blob(
    store: KnowledgeStore, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector deletes the old blobs after rollback checked they exist but before its EXEC: the
    version key did not move, so only WATCH on the blobs themselves stops the rollback."""
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("brick", seed=2))
    collector = KnowledgeStore(redis_client, "test-kpk")
    require_blobs = store._require_blobs
    reports = []

    def check_then_collect(pipe, entry) -> None:
        require_blobs(pipe, entry)
        if not reports:
            reports.append(collector.collect_garbage(keep_versions=1, grace_s=0, now=later()))

    monkeypatch.setattr(store, "_require_blobs", check_then_collect)
    with pytest.raises(StoreError, match="garbage-collected"):
        store.rollback("brick", 1)
    assert reports and reports[0].blobs_deleted > 0  # the collector did delete v1's blobs meanwhile
    assert store.version() == 2
    store.load_task(store.manifest().tasks["brick"])


# ---------------------------------------------------------------------------- garbage collection
def later(days: float = 1.0) -> datetime:
    """A `now` past every grace period of the manifests a test just wrote."""
    return datetime.now(timezone.utc) + timedelta(days=days)


def digests_of(manifest: StoreManifest) -> set[str]:
    return {d for entry in manifest.tasks.values() for d in entry.blobs.values()}


def stored_blobs(redis_client: redis.Redis) -> set[str]:
    return {k.decode().removeprefix("test-kpk:blob:") for k in redis_client.keys("test-kpk:blob:*")}


def test_gc_deletes_only_blobs_no_retained_version_references(
    store: KnowledgeStore, redis_client: redis.Redis
) -> None:
    store.publish(make_task("brick", seed=1), command_id="c1")  # v1
    store.publish(make_task("gravel", seed=2))  # v2
    store.publish(make_task("brick", seed=3))  # v3: brick seed 1 now lives only in v1, v2
    calibration = make_task("gravel", seed=2).calibration.with_false_alarm_rate(0.3)
    store.set_calibration("gravel", calibration)  # v4: gravel's first calibration lives only in v2, v3
    store.publish(make_task("tile", seed=4))  # v5
    manifests = {v: store.manifest_at(v) for v in range(1, 6)}
    kept_digests = digests_of(manifests[4]) | digests_of(manifests[5])
    garbage = set().union(*(digests_of(manifests[v]) for v in (1, 2, 3))) - kept_digests
    assert stored_blobs(redis_client) == garbage | kept_digests and garbage
    assert manifests[1].tasks["brick"].blobs["spec"] in kept_digests  # shared with later tasks: kept
    garbage_bytes = sum(redis_client.strlen(f"test-kpk:blob:{d}") for d in garbage)

    report = store.collect_garbage(keep_versions=2, grace_s=0, now=later())
    assert report.kept_versions == [4, 5] and report.manifests_deleted == 3
    assert report.blobs_deleted == len(garbage) and report.bytes_freed == garbage_bytes > 0
    assert stored_blobs(redis_client) == kept_digests
    for version in (1, 2, 3):
        assert redis_client.get(f"test-kpk:manifest:{version}") is None
        with pytest.raises(StoreError, match=f"manifest version {version} was garbage-collected"):
            store.manifest_at(version)
    with pytest.raises(StoreError, match="no manifest version 6"):
        store.manifest_at(6)
    for version in report.kept_versions:  # every retained version still loads in full
        assert store.manifest_at(version) == manifests[version]
        for entry in manifests[version].tasks.values():
            store.load_task(entry)
    assert_same_task(store.load_task(store.manifest().tasks["brick"]), make_task("brick", seed=3))
    assert [e.task_version for e in store.history("brick")] == [3]
    assert store.applied("c1") == 1  # command ids outlive the versions they produced

    again = store.collect_garbage(keep_versions=2, grace_s=0, now=later())
    assert (again.manifests_deleted, again.blobs_deleted, again.bytes_freed) == (0, 0, 0)
    assert again.kept_versions == [4, 5]


def test_gc_keeps_the_current_version_and_an_empty_store_is_fine(
    store: KnowledgeStore, redis_client: redis.Redis
) -> None:
    assert store.collect_garbage(keep_versions=0, grace_s=0, now=later()).kept_versions == []
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("brick", seed=2))
    report = store.collect_garbage(keep_versions=0, grace_s=0, now=later())
    assert report.kept_versions == [2] and report.manifests_deleted == 1
    assert stored_blobs(redis_client) == digests_of(store.manifest())
    store.load_task(store.manifest().tasks["brick"])
    with pytest.raises(ValueError):
        store.collect_garbage(keep_versions=-1)


def test_gc_keeps_versions_superseded_within_the_grace_period(
    store: KnowledgeStore, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Just superseded, on Redis's own clock (the default `now`): nothing may go.
    store.publish(make_task("brick", seed=1))
    store.publish(make_task("brick", seed=2))
    assert store.collect_garbage(keep_versions=1, grace_s=300).kept_versions == [1, 2]
    redis_client.flushdb()

    def at(seconds: float) -> datetime:
        return datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)

    clock = [at(0)]
    monkeypatch.setattr(store, "_server_time", lambda conn: clock[0])
    for i in range(4):  # v1..v4 at t0, t0+100 s, t0+200 s, t0+300 s, each a new brick
        clock[0] = at(100 * i)
        store.publish(make_task("brick", seed=10 + i))
    assert [store.manifest_at(v).published_at for v in (1, 2, 3, 4)] == [at(s) for s in (0, 100, 200, 300)]

    # v1 was superseded at t0+100, 250 s before t0+350: inside a 300 s grace period, so all stay.
    assert store.collect_garbage(keep_versions=1, grace_s=300, now=at(350)).kept_versions == [1, 2, 3, 4]
    # At t0+400 with 150 s grace: v1 (superseded t0+100) and v2 (t0+200) go, v3 (t0+300) stays.
    report = store.collect_garbage(keep_versions=1, grace_s=150, now=at(400))
    assert report.kept_versions == [3, 4] and report.manifests_deleted == 2
    assert stored_blobs(redis_client) == digests_of(store.manifest_at(3)) | digests_of(store.manifest_at(4))
    store.load_task(store.manifest_at(3).tasks["brick"])  # a worker still on v3 loads it in full
    assert store.collect_garbage(keep_versions=1, grace_s=150, now=at(1000)).kept_versions == [4]


def test_a_publish_during_gc_never_leaves_the_current_manifest_missing_a_blob(
    store: KnowledgeStore, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the collector's read and its MULTI another worker republishes brick seed 1, whose blobs
    only the old v1 referenced: SET NX writes nothing (they exist), so deleting them after that commit
    would break the new current manifest. WATCH on the version key makes the collector re-plan."""
    store.publish(make_task("brick", seed=1))  # v1
    store.publish(make_task("brick", seed=2))  # v2: seed 1's blobs are garbage now
    publisher = KnowledgeStore(redis_client, "test-kpk")  # another connection, as another worker
    plan_garbage = store._plan_garbage
    plans = []

    def plan_then_publish(*args):
        plan = plan_garbage(*args)
        plans.append(plan)
        if len(plans) == 1:
            publisher.publish(make_task("brick", seed=1))  # v3 re-references v1's blobs
        return plan

    monkeypatch.setattr(store, "_plan_garbage", plan_then_publish)
    report = store.collect_garbage(keep_versions=1, grace_s=0, now=later())

    assert len(plans) == 2  # the first plan was thrown away
    assert set(plans[0].digests) & digests_of(store.manifest())  # ... and would have deleted v3's blobs
    assert store.version() == 3 and report.kept_versions == [3]
    assert digests_of(store.manifest()) <= stored_blobs(redis_client)
    assert_same_task(store.load_task(store.manifest().tasks["brick"]), make_task("brick", seed=1))
    assert stored_blobs(redis_client) == digests_of(store.manifest())  # v2's own blobs did go
