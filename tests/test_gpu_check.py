"""The prepared GPU check (deploy/gpu): a small prepare (tasks trained and published to a real Redis, its
dump, the weights folder, frames, reference outputs), then the check's CPU mode through the project's own
Inspector in a process that cannot import what the device machine lacks; and the weights folder and the
store dump refusing changed bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import assets

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "deploy" / "gpu"
DATASETS = ROOT.parent / "shared" / "datasets"
FRAMES = 4

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DATASETS / "ball_screw" / "train" / "good").is_dir(),
                                 reason=f"datasets not found under {DATASETS}"),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="prepare.py dumps a real Redis")]
# Not on the device machine: the optional servers' clients, SAM, and every registry package of weights
# (assets.py's WeightAssets); the check must run without any of them.
WEIGHT_MODULES = tuple(sorted({a.module for a in vars(assets).values() if isinstance(a, assets.WeightAsset)}))
BLOCKED = ("faiss", "redis", "kafka", "segment_anything", *WEIGHT_MODULES)
WITHOUT_DEVICE_MISSING = f"""
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):  # as if these were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(name + " is blocked: the device machine has no such package", name=name)
sys.meta_path.insert(0, Hide())
sys.argv = {{argv!r}}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "prepared"
    _run(str(GPU_DIR / "prepare.py"), "--out", str(out), "--no-wheels", "--images", "8", "--frames", str(FRAMES),
         timeout=300)
    return out


def test_prepare_writes_weights_store_frames_and_reference(prepared: Path) -> None:
    from pipeline.core.store import DumpedStore

    manifest = json.loads((prepared / "manifest.json").read_text())
    weights = json.loads((prepared / "weights" / assets.WEIGHTS_MANIFEST).read_text())["weights"]
    assert sorted(weights) == ["efficientnet_lite0", "vit_small_patch14_dinov2"]
    for entry in weights.values():
        assert assets.sha256_of(prepared / "weights" / entry["file"]) == entry["sha256"]
    assert weights["vit_small_patch14_dinov2"]["meta"]["blocks"] == 8  # routing's blocks, 0..KEY_LAYER

    store = DumpedStore(prepared / "store")
    tasks = store.manifest().tasks
    assert store.version() == 10 and len(tasks) == 10
    assert {tasks["ball_screw"].expert, tasks["magnetic_tile"].expert} == {"patchcore"}
    assert store.load_task(tasks["ball_screw"]).input_spec.resize == "letterbox"

    assert len(manifest["frames"]) == FRAMES == len(list((prepared / "frames").glob("*.jpg")))
    reference = manifest["reference"]["outputs"]
    assert len(reference) == FRAMES and all(r["category"] == row["task"] for r, row in zip(reference, manifest["frames"]))
    assert all(r["score_raw"] > 0 and r["map_max"] > 0 for r in reference)


def test_cpu_check_runs_the_projects_inspector_without_what_the_device_lacks(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [str(GPU_DIR / "check.py"), "--device", "cpu", "--data", str(prepared), "--out", str(out),
            "--batch-sizes", "1,2", "--seconds", "0.2", "--warmup", "1", "--min-iters", "2"]
    # an empty cache: no converted ViT to fall back on
    result = _run("-c", WITHOUT_DEVICE_MISSING.format(argv=argv), timeout=240,
                  env={"INSPECTION_CACHE_DIR": str(tmp_path / "empty-cache")})
    table = (out / "gpu_check.md").read_text()
    assert table in result.stdout
    assert len([line for line in table.splitlines() if line.startswith(("| 1 | fp32 |", "| 2 | fp32 |"))]) == 2

    report = json.loads((out / "gpu_check.json").read_text())
    imported = set(report["environment"]["imported"])
    assert {"pipeline", "schemas"} <= imported and not imported & set(BLOCKED)
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").iterdir())
    assert [(row["batch"], row["precision"]) for row in report["rows"]] == [(1, "fp32"), (2, "fp32")]
    for row in report["rows"]:
        assert row["iterations"] >= 2 and 0 < row["frames_per_s"] < 1e4
        stages = sum(row["stages_ms"][s]["mean"] for s in ("decode", "routing", "task_id", "experts"))
        assert 0.5 * row["batch_ms"]["mean"] <= stages <= 1.01 * row["batch_ms"]["mean"]

    # the check's own outputs against the reference prepare.py stored, frame by frame
    reference = json.loads((prepared / "manifest.json").read_text())["reference"]["outputs"]
    ours = report["agreement"]["passes"]["fp32"]["outputs"]
    assert len(ours) == len(reference) == FRAMES
    for mine, theirs in zip(ours, reference):
        assert mine["category"] == theirs["category"] and mine["is_defective"] == theirs["is_defective"]
        assert mine["score_raw"] == pytest.approx(theirs["score_raw"], rel=1e-4)
        assert mine["distance"] == pytest.approx(theirs["distance"], rel=1e-4)
        assert mine["map_max"] == pytest.approx(theirs["map_max"], rel=1e-4)
    summary = report["agreement"]["passes"]["fp32"]
    assert summary["routed_agree"] == summary["decision_agree"] == FRAMES


def test_weights_folder_and_store_dump_refuse_changed_bytes(prepared: Path, tmp_path: Path) -> None:
    from pipeline.core.store import DumpedStore, StoreError
    from pipeline.features.backbone import Backbones

    weights = shutil.copytree(prepared / "weights", tmp_path / "weights")
    cnn = weights / "efficientnet_lite0.safetensors"
    data = bytearray(cnn.read_bytes())
    data[-1] ^= 1
    cnn.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError, match="checksum mismatch"):
        Backbones.from_folder(weights)
    (weights / assets.WEIGHTS_MANIFEST).unlink()
    with pytest.raises(assets.AssetError, match="not a weights folder"):
        Backbones.from_folder(weights)

    store = shutil.copytree(prepared / "store", tmp_path / "store")
    dumped = DumpedStore(store)
    entry = dumped.manifest().tasks["ball_screw"]
    blob = store / "blobs" / entry.blobs["expert"]
    blob.write_bytes(blob.read_bytes()[:-1])
    with pytest.raises(StoreError, match="corrupt"):
        dumped.load_task(entry)
    (store / "manifest").write_bytes((store / "manifest").read_bytes().replace(b"ball_screw", b"ball_screx"))
    with pytest.raises(StoreError, match="does not match"):
        DumpedStore(store)
