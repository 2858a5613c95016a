"""The prepared GPU check (deploy/gpu): a tiny prepare + CPU run end to end, and its self-contained model
code (what the device measures) against the pipeline's own Backbone / ViTBackbone / PatchCore / keys."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "deploy" / "gpu"
DATASETS = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(GPU_DIR))

import gpu_models as gm  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DATASETS / "ball_screw" / "train" / "good").is_dir(),
                                                   reason=f"datasets not found under {DATASETS}")]
STAGES = ("decode", "resize", "vit", "keys", "cnn", "nn", "map", "d2h")
BLOCKED = ("pipeline", "schemas", "workers", "pydantic", "faiss", "kafka", "redis")  # none on the device machine
WITHOUT_PROJECT_DEPS = f"""
import runpy, sys
class Hide:  # every finder finds nothing for these, as if they were not installed
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)
sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
sys.argv = {{argv!r}}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "prepared"
    _run(str(GPU_DIR / "prepare.py"), "--out", str(out), "--images", "6", "--frames", "4", timeout=180)
    return out


def test_prepare_then_tiny_cpu_check(prepared: Path, tmp_path: Path) -> None:
    files = {p.relative_to(prepared).as_posix(): p.stat().st_size for p in prepared.rglob("*") if p.is_file()}
    assert sum(files.values()) < 60 * 2**20, files
    for name in ("manifest.json", "patchcore_spec.json", "vit_s14_dinov2_224.safetensors",
                 "efficientnet_lite0.safetensors", "patchcore_bank.safetensors", "task_keys.safetensors"):
        assert files.get(name, 0) > 0, name
    assert len([f for f in files if f.startswith("frames/") and f.endswith(".jpg")]) == 4
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(manifest["routing"]["tasks"]) == 10 and manifest["patchcore"]["spec"]["resize"] == "letterbox"

    out = tmp_path / "out"
    argv = [str(GPU_DIR / "check.py"), "--device", "cpu", "--data", str(prepared), "--out", str(out),
            "--batch-sizes", "1,2", "--seconds", "0.2", "--warmup", "1", "--min-iters", "2"]
    # as on the device machine: none of these can be imported there
    result = _run("-c", WITHOUT_PROJECT_DEPS.format(argv=argv), timeout=150)
    table = (out / "gpu_check.md").read_text()
    assert table in result.stdout
    header = "| batch | frames/s | frames/s, 1 sync | " + " | ".join(STAGES) + " | total | iters | peak GiB |"
    assert header in table
    assert len([line for line in table.splitlines() if line.startswith(("| 1 |", "| 2 |"))]) == 2

    report = json.loads((out / "gpu_check.json").read_text())
    assert [row["batch"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["iterations"] >= 2 and 0 < row["frames_per_s"] < 1e4 and 0 < row["frames_per_s_one_sync"] < 1e4
        stage_means = 0.0
        for name in STAGES:
            ms = row["stages_ms"][name]
            assert math.isfinite(ms["p50"]) and 0 <= ms["p50"] <= ms["p99"]
            stage_means += ms["mean"]
        for name in ("vit", "cnn"):
            assert row["stages_ms"][name]["p50"] > 0.1
        assert stage_means <= row["total_ms"]["mean"] * 1.05  # the stages account for the batch, no more
        assert stage_means >= row["total_ms"]["mean"] * 0.5
    precision = report["precision"]
    assert precision["frames"] == 4 and precision["routed_to_own_task_fp32"] == 4
    # fp16 weights + tensor resizes against the pipeline's fp32, PIL and faiss path: close
    assert precision["fp32_vs_pipeline"]["score_max_rel"] < 0.02
    assert precision["fp32_vs_pipeline"]["routing_distance_max_rel"] < 0.01
    assert precision["fp32_vs_pipeline"]["routed_task_agree"] == 4
    assert precision["bf16_vs_fp32"]["score_max_rel"] < 0.05 and precision["bf16_vs_fp32"]["routed_task_agree"] == 4
    assert report["environment"]["decode"] in ("torchvision CPU", "PIL CPU")
    assert report["environment"]["canvas"] == [224, 544] and report["environment"]["tasks"] == 10


# ------------------------------------------------------------------ the check's model code == the pipeline's
@pytest.fixture(scope="module")
def pipeline_backbone(one_torch_thread):
    from pipeline.features.backbone import Backbone

    return Backbone.pretrained()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    from PIL import Image

    paths = [DATASETS / "ball_screw" / "train" / "good" / "000.jpg", DATASETS / "magnetic_tile" / "train" / "good" / "000.jpg"]
    return [np.array(Image.open(p).convert("RGB")) for p in paths]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def test_model_code_matches_pipeline(pipeline_backbone, frames) -> None:
    from pipeline.core.task_id import KeyTaskIdentifier
    from pipeline.experts.patchcore.memory_bank import MemoryBank
    from pipeline.experts.frames import _valid_pixels
    from pipeline.experts.patchcore.torch_model import embed_patches
    from pipeline.features.backbone import KEY_LAYER, PATCH_STAGES, FeatureBatch
    from pipeline.features.geometry import frame_views
    from pipeline.features.imaging import resize_rgb
    from schemas.spec import InputSpec

    assert (KEY_LAYER, PATCH_STAGES) == (gm.KEY_LAYER, gm.PATCH_STAGES)
    backbone = pipeline_backbone
    vit = gm.RoutingViT(gm.truncate_vit_state(backbone.vit.net.state_dict()))
    cnn = gm.PatchCNN(backbone.net.state_dict())
    assert len(vit.net.blocks) == KEY_LAYER + 1

    # routing tokens: same pixels, fp32
    routing = torch.from_numpy(np.stack([resize_rgb(f, 224) for f in frames]))
    with torch.inference_mode():
        expected_tokens = backbone(routing, keys=True, cnn=False).tokens[KEY_LAYER]
        tokens = vit(routing)
    assert tokens.shape == expected_tokens.shape == (2, 256, 384)
    _close(tokens, expected_tokens)

    # CNN stages and PatchCore patches on the letterbox views
    spec = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=224, width=544)
    views = [frame_views(f, spec)[0] for f in frames]
    pixels = torch.from_numpy(np.stack([v.pixels for v in views]))
    with torch.inference_mode():
        expected = backbone(pixels, keys=False)
        stages = cnn(pixels)
    # the pipeline runs the CNN with its batch norms folded into the convolutions: rounding-level changes
    for stage in (1, 2, 3, 4):
        _close(stages[stage], expected.stages[stage], tol=5e-4)
    patches, expected_patches = gm.embed_patches(stages), embed_patches(expected, PATCH_STAGES)
    _close(patches, expected_patches, tol=5e-4)

    # key search == KeyTaskIdentifier's exhaustive distances
    rng = np.random.default_rng(0)
    keys = {"a": expected_tokens[0, :32].numpy(), "b": expected_tokens[1, :32].numpy() + rng.normal(0, 0.1, (32, 384)).astype(np.float32)}
    search = gm.KeySearch(torch.from_numpy(np.stack([keys["a"], keys["b"]])), torch.tensor([1.0, 1.0]))
    _close(search.distances(expected_tokens), KeyTaskIdentifier(keys, {"a": 1.0, "b": 1.0}).distances(expected_tokens))

    # PatchCore scoring: matmul top-k search == faiss, same re-weighted score and smoothed map
    bank_np = expected_patches[0].reshape(-1, expected_patches.shape[-1])[::7].numpy()
    memory = MemoryBank(bank_np, num_neighbors=3)
    query = expected_patches[1:]  # the magnetic_tile view: letterboxed with padding on both sides
    grid = FeatureBatch(pixels[1:], {}, valid=_valid_pixels(views[1:])).valid_grid(tuple(query.shape[1:3]))
    assert not grid.all()
    want_scores, want_maps = memory.score(query, (224, 544), 4.0, grid)
    bank = gm.BankSearch(torch.from_numpy(bank_np), 3)
    _close(bank.neighbours[:, 0], torch.arange(len(bank_np)))
    b, h, w, d = query.shape
    dist, index = bank.search(query.reshape(-1, d))
    valid = gm.valid_grid(frames[1].shape[:2], (224, 544), (h, w), torch.device("cpu"))
    assert torch.equal(valid, grid[0])
    scores = bank.image_scores(query.reshape(b, h * w, d), dist.view(b, -1), index.view(b, -1), valid)
    _close(scores, torch.from_numpy(want_scores))
    _close(gm.canvas_maps(dist.view(b, h, w), (224, 544), 4.0), torch.from_numpy(want_maps))


def test_tensor_resizes_match_pil(frames) -> None:
    """The check's resizes (antialiased bilinear on the tensor, rounded to 8 bits) against the pipeline's PIL
    ones: within one grey level, and on average far less."""
    from pipeline.features.geometry import frame_views
    from pipeline.features.imaging import resize_rgb
    from schemas.spec import InputSpec

    spec = InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=224, width=544)
    for frame in frames:
        pixels = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        view = frame_views(frame, spec)[0]
        assert gm.letterbox_box(frame.shape[:2], (224, 544)) == (view.content[0], view.content[1],
                                                                 view.content[2] - view.content[0], view.content[3] - view.content[1])
        for ours, theirs in ((gm.to_unit(gm.squeeze(pixels, 224, 224))[0], resize_rgb(frame, 224)),
                             (gm.to_unit(gm.letterbox(pixels, (224, 544)))[0], view.pixels)):
            diff = (ours - torch.from_numpy(theirs)).abs()
            assert diff.max() <= 1.5 / 255 and diff.mean() < 0.25 / 255
