"""Forgetting measured on audit sets: adding a task leaves an old task's audit values identical and its
forgetting exactly 0; silently swapping its stored expert for a worse one shows forgetting > 0, and the
alert rule fires on the values measured."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from pipeline.core.audit import METRICS, AuditMonitor, AuditSet, make_audit_set
from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from pipeline.core.training import train_task
from pipeline.data.datasets import write_synthetic_category
from pipeline.features.backbone import Backbones
from pipeline.features.geometry import resize_uint8
from pipeline.features.imaging import encode_png
from schemas.config import ModelConfig, TrainingConfig
from schemas.spec import InputSpec
from schemas.store import StoreManifest
from tools.stack import ALERT_RULES

SIZE = 128
MODEL = ModelConfig(image_size=SIZE, coreset_ratio=0.1, max_coreset_size=500, num_keys=16, seed=0)
TRAINING = TrainingConfig(batch_size=16, audit_fraction=0.1)  # 40 images: 24 fit, 4 validation, 8 calibration, 4 audit
SPEC = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=SIZE, width=SIZE)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("audit-data")
    backbones = Backbones.pretrained()
    out = {}
    for texture in ("brick", "gravel"):
        write_synthetic_category(root, texture, texture, n_train=40, n_test_good=2, n_test_defect=2, size=SIZE, seed=3)
        out[texture] = train_task(texture, root / texture / "train" / "good", "patchcore", backbones, MODEL, TRAINING,
                                  false_alarm_rate=0.1, spec=SPEC)
    return backbones, out


def test_audit_sets_round_trip_and_hold_normals_and_masked_anomalies() -> None:
    rng = np.random.default_rng(0)
    normals = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    audit = make_audit_set(normals, seed=1)
    assert audit.anomalous == [False] * 3 + [True] * 3
    assert all(m.shape == (64, 80) and m.any() for m in audit.masks[3:])
    again = AuditSet.from_bytes(audit.to_bytes())
    assert again.frames == audit.frames and all(
        (a is None and b is None) or np.array_equal(a, b) for a, b in zip(audit.masks, again.masks))
    assert again.images()[0].shape == normals[0].shape  # no spec: the frames' own size
    assert make_audit_set([], seed=1) is None


def test_audit_frames_are_stored_at_the_experts_canvas_in_the_smaller_format() -> None:
    coarse = np.random.default_rng(0).integers(0, 255, (100, 250, 3), dtype=np.uint8)
    smooth = resize_uint8(coarse, 400, 1000)  # a surface texture: smooth noise
    letterbox = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=224, width=544)
    audit = make_audit_set([smooth], seed=1, spec=letterbox)
    assert [image.shape for image in audit.images()] == [(218, 544, 3)] * 2  # fits the canvas, aspect kept
    assert audit.masks[1].shape == (218, 544)
    full_size_png = len(encode_png(smooth, compress_level=6))  # how a frame was kept before
    assert len(audit.frames[0]) < full_size_png / 3
    assert all(frame[:2] == b"\xff\xd8" or frame[:4] == b"\x89PNG" for frame in audit.frames)
    tiles = InputSpec(backbone="efficientnet_lite0", resize="tiles", height=256, width=256)
    assert make_audit_set([smooth], seed=1, spec=tiles).images()[0].shape == smooth.shape  # tiles: native pixels
    small = make_audit_set([smooth[:100, :200]], seed=1, spec=letterbox)
    assert small.images()[0].shape == (100, 200, 3)  # never enlarged


def test_forgetting_is_zero_when_a_task_is_added_and_positive_when_a_task_is_damaged(
        tasks, redis_client: redis.Redis, tmp_path: Path) -> None:
    backbones, trained = tasks
    assert trained["brick"].audit is not None and trained["brick"].meta["num_audit_frames"] == 8
    store, monitor = KnowledgeStore(redis_client), AuditMonitor()
    inspector = Inspector(backbones, MODEL)

    store.publish(trained["brick"])
    inspector.sync(store)
    [first] = monitor.score(inspector)
    assert set(first.values) == set(METRICS) and first.expert_frames_run == first.frames == 8
    assert all(value == 0.0 for value in first.forgetting.values())

    store.publish(trained["gravel"])  # adding task B
    inspector.sync(store)
    after = {r.category: r for r in monitor.score(inspector)}
    assert after["brick"].values == first.values  # every metric of A identical, to the last digit
    assert after["brick"].forgetting == {name: 0.0 for name in first.forgetting}
    assert after["brick"].expert_frames_run == 0  # routing unchanged: A's expert outputs came from the cache
    assert after["gravel"].expert_frames_run > 0

    _swap_expert(store, redis_client, "brick", trained["gravel"].expert_state)  # a worse expert, same version
    inspector.sync(store)
    damaged = {r.category: r for r in monitor.score(inspector)}["brick"]
    assert damaged.task_version == first.task_version
    worst = max(damaged.forgetting, key=damaged.forgetting.get)
    assert damaged.forgetting[worst] > 0.005, (first.values, damaged.values)
    _assert_alert_fires(tmp_path, damaged.forgetting)

    store.publish(trained["brick"])  # a deliberate retrain: a new baseline, nothing forgotten
    inspector.sync(store)
    retrained = {r.category: r for r in monitor.score(inspector)}["brick"]
    assert all(value == 0.0 for value in retrained.forgetting.values())


def _swap_expert(store: KnowledgeStore, client: redis.Redis, category: str, state: bytes) -> None:
    """Replace a task's expert blob behind the store's back (same task version): damage, not a retrain."""
    digest = hashlib.sha256(state).hexdigest()
    client.set(f"{store.namespace}:blob:{digest}", state)
    manifest = store.manifest()
    entry = manifest.tasks[category]
    swapped = entry.model_copy(update={"blobs": {**entry.blobs, "expert": digest}})
    version = manifest.version + 1
    new = StoreManifest(version=version, tasks={**manifest.tasks, category: swapped}).model_dump_json()
    client.set(f"{store.namespace}:manifest", new)
    client.set(f"{store.namespace}:manifest:{version}", new)
    client.set(f"{store.namespace}:version", version)


def _assert_alert_fires(tmp_path: Path, forgetting: dict[str, float]) -> None:
    """The real rule, evaluated by promtool on the values the monitor measured."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    series = [{"series": f'inspection_forgetting{{category="brick", metric="{name}"}}', "values": f"{value}x5"}
              for name, value in forgetting.items()]
    firing = [{"exp_labels": {"severity": "critical", "category": "brick", "metric": name},
               "exp_annotations": {"summary": f"brick forgot {value:.3f} of {name} since its last change"}}
              for name, value in sorted(forgetting.items()) if value > 0.005]
    test = {"rule_files": [str(ALERT_RULES)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series,
                       "alert_rule_test": [{"eval_time": "2m", "alertname": "InspectionForgetting",
                                            "exp_alerts": firing}]}]}
    path = tmp_path / "forgetting_test.yml"
    path.write_text(yaml.safe_dump(test))
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert firing, "nothing to fire on"


def test_audit_sets_stored_with_a_byte_a_pixel_still_load() -> None:
    from pipeline.common.serialization import pack

    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    old = pack({"count": 2}, {"frame_000": np.frombuffer(b"a", np.uint8), "frame_001": np.frombuffer(b"b", np.uint8),
                              "mask_001": mask.astype(np.uint8)})
    loaded = AuditSet.from_bytes(old)
    assert loaded.masks[0] is None and np.array_equal(loaded.masks[1], mask)
    again = AuditSet.from_bytes(loaded.to_bytes())  # and the bits layout round-trips the same mask
    assert np.array_equal(again.masks[1], mask) and len(loaded.to_bytes()) < len(old) + 200
