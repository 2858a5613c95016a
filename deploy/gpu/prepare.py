"""Prepare the GPU check's folder (default `.gpu-check/`, git-ignored) here, on CPU, with the pipeline itself.

Everything `deploy/gpu/check.py` needs on the device machine, which has torch, timm, torchvision and
safetensors but not pydantic, faiss, kafka-python or redis, and no network, so it cannot run `pipeline`:

- `vit_s14_dinov2_224.safetensors`: the routing ViT's weights (`ViTBackbone.pretrained()`'s timm state dict
  at 224 px, position embedding already resampled as the pipeline does), blocks 0..KEY_LAYER only (routing
  never runs the others; saves 14 MB), fp16;
- `efficientnet_lite0.safetensors`: `Backbone.pretrained().net`'s state dict (features_only, stages 1-4), fp16;
- `patchcore_bank.safetensors` + `patchcore_spec.json`: a PatchCore memory bank fitted the pipeline's way
  (`pipeline.experts.frames.fit_batches`, `PatchCore.fit`, default config) on `--images` normal ball_screw
  train images at the first candidate spec the automatic choice would try for them
  (`pipeline.core.expert_selection.candidate_specs`: EfficientNet-Lite0, letterbox, short side 224, the
  frames' aspect -> 224 x 544);
- `task_keys.safetensors`: keys of 2 real tasks (ball_screw, magnetic_tile: `routing_tokens` + `select_keys`
  on their train images) and `--synthetic` more (a real task's keys + seeded Gaussian noise), with bounds
  (unknown slack x the largest distance of held-out train images to their own keys);
- `frames/*.jpg`: `--frames` real test images of both datasets (good and defective), stretched to
  1080 x 1080 and encoded with PIL at quality 90;
- `manifest.json`: what is where, and the pipeline's own outputs for those frames (CPU, fp32, PIL decode
  and resize, faiss search), which the check compares the device's results with.

Run: `.venv/bin/python deploy/gpu/prepare.py` (under a minute on two cores; the folder is about 37 MiB).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_models  # noqa: E402  (deploy/gpu: the check's own model code)
from safetensors.torch import save_file  # noqa: E402

VIT_FILE = "vit_s14_dinov2_224.safetensors"
CNN_FILE = "efficientnet_lite0.safetensors"
BANK_FILE = "patchcore_bank.safetensors"
SPEC_FILE = "patchcore_spec.json"
KEYS_FILE = "task_keys.safetensors"
MANIFEST = "manifest.json"
REAL_TASKS = ("ball_screw", "magnetic_tile")
PATCHCORE_TASK = "ball_screw"
MAX_FOLDER_BYTES = 60 * 2**20


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _sample(paths: list[Path], count: int, seed: int) -> list[Path]:
    if count >= len(paths):
        return list(paths)
    chosen = np.random.default_rng(seed).choice(len(paths), size=count, replace=False)
    return [paths[i] for i in sorted(chosen)]


def _fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}


def _test_images(dataset: Path) -> list[tuple[str, Path]]:
    """(label, path) of every test image, labels sorted with 'good' first."""
    labels = sorted((d.name for d in (dataset / "test").iterdir() if d.is_dir()), key=lambda n: (n != "good", n))
    from pipeline.data.datasets import list_images

    return [(label, path) for label in labels for path in list_images(dataset / "test" / label)]


def prepare(out: Path, datasets: Path, images: int, frames: int, synthetic: int, noise: float, frame_side: int,
            quality: int, seed: int, batch_size: int) -> dict:
    from pipeline.core.expert_selection import candidate_specs
    from pipeline.core.task_id import KeyTaskIdentifier, select_keys
    from pipeline.core.training import routing_tokens
    from pipeline.data.datasets import list_images
    from pipeline.experts.frames import fit_batches, run_on_frames
    from pipeline.experts.patchcore import PatchCore, PatchCoreConfig
    from pipeline.features.backbone import KEY_LAYER, PATCH_STAGES, Backbones
    from pipeline.features.imaging import decode_image
    from schemas.config import ModelConfig

    if KEY_LAYER != gpu_models.KEY_LAYER or PATCH_STAGES != gpu_models.PATCH_STAGES:
        raise SystemExit(f"deploy/gpu/gpu_models.py is out of date: pipeline KEY_LAYER {KEY_LAYER}, PATCH_STAGES "
                         f"{PATCH_STAGES}; gpu_models has {gpu_models.KEY_LAYER}, {gpu_models.PATCH_STAGES}")
    started = time.perf_counter()
    model = ModelConfig()
    if out.exists():
        shutil.rmtree(out)
    (out / "frames").mkdir(parents=True)
    backbones = Backbones.pretrained("cpu")
    vit, cnn = backbones.vit, backbones.default
    print(f"models loaded ({time.perf_counter() - started:.0f} s)", flush=True)

    # --- weights
    vit_state = gpu_models.truncate_vit_state(vit.net.state_dict(), KEY_LAYER)
    save_file(_fp16(vit_state), str(out / VIT_FILE),
              metadata={"timm": gpu_models.VIT_TIMM, "image_size": str(vit.image_size), "blocks": str(KEY_LAYER + 1)})
    save_file(_fp16(cnn.net.state_dict()), str(out / CNN_FILE),
              metadata={"timm": gpu_models.CNN_TIMM, "out_indices": ",".join(map(str, cnn.stage_ids))})

    # --- tasks: keys from fit images, bounds from held-out ones
    holdout = max(2, images // 5)
    train: dict[str, tuple[list[Path], list[Path]]] = {}
    for task in REAL_TASKS:
        chosen = _sample(list_images(datasets / task / "train" / "good"), images + holdout, seed)
        train[task] = (chosen[:images], chosen[images:])
    keys: dict[str, np.ndarray] = {}
    bounds: dict[str, float] = {}
    fit_frames: dict[str, list[np.ndarray]] = {}
    for task, (fit_paths, held_paths) in train.items():
        fit_frames[task] = [_read_rgb(p) for p in fit_paths]
        keys[task] = select_keys(routing_tokens(backbones, fit_frames[task], model, batch_size), model.num_keys, model.seed)
        identifier = KeyTaskIdentifier({task: keys[task]}, {task: float("inf")})
        held = routing_tokens(backbones, [_read_rgb(p) for p in held_paths], model, batch_size)
        bounds[task] = float(model.unknown_slack * identifier.distances(held)[:, 0].max())
    rng = np.random.default_rng(seed)
    synthetic_info = {}
    for index in range(synthetic):
        source = REAL_TASKS[index % len(REAL_TASKS)]
        name = f"synthetic_{index:02d}_{source}"
        spread = keys[source].std(axis=0, keepdims=True)
        keys[name] = (keys[source] + noise * spread * rng.standard_normal(keys[source].shape)).astype(np.float32)
        bounds[name] = bounds[source]
        synthetic_info[name] = {"source": source, "noise": noise}
    names = sorted(keys)
    save_file({"keys": torch.from_numpy(np.stack([keys[n] for n in names])).contiguous(),
               "bounds": torch.tensor([bounds[n] for n in names], dtype=torch.float32)},
              str(out / KEYS_FILE), metadata={"tasks": json.dumps(names)})
    print(f"task keys ({time.perf_counter() - started:.0f} s)", flush=True)

    # --- PatchCore on ball_screw at the automatic choice's first candidate spec
    spec = candidate_specs("patchcore", fit_frames[PATCHCORE_TASK])[0]
    config = PatchCoreConfig(coreset_ratio=model.coreset_ratio, projection_dim=model.coreset_projection_dim,
                             max_coreset_size=model.max_coreset_size, num_neighbors=model.num_neighbors,
                             map_sigma=model.map_sigma, seed=model.seed)
    expert = PatchCore(config)
    expert.fit(fit_batches(fit_frames[PATCHCORE_TASK], spec, backbones, batch_size))
    bank = np.ascontiguousarray(expert.bank, dtype=np.float32)
    save_file({"bank": torch.from_numpy(bank)}, str(out / BANK_FILE))
    spec_json = {"task": PATCHCORE_TASK, "spec": spec.model_dump(), "config": dict(config.__dict__),
                 "patch_stages": list(PATCH_STAGES), "bank_size": int(bank.shape[0]), "dim": int(bank.shape[1])}
    (out / SPEC_FILE).write_text(json.dumps(spec_json, indent=2) + "\n")
    print(f"PatchCore bank {bank.shape} at {spec.describe()} ({time.perf_counter() - started:.0f} s)", flush=True)

    # --- frames: real test images (good and defective) of both datasets, 1080 x 1080 JPEG
    frame_rows, decoded = [], []
    per_task = [frames - frames // 2, frames // 2]
    for task, count in zip(REAL_TASKS, per_task):
        for label, path in _sample(_test_images(datasets / task), count, seed + 1):
            with Image.open(path) as image:
                square = image.convert("RGB").resize((frame_side, frame_side), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            square.save(buffer, format="JPEG", quality=quality)
            name = f"frame_{len(frame_rows):02d}_{task}_{label}.jpg"
            (out / "frames" / name).write_bytes(buffer.getvalue())
            decoded.append(decode_image(buffer.getvalue(), max_pixels=frame_side * frame_side))
            frame_rows.append({"file": f"frames/{name}", "task": task, "label": label,
                               "source": str(path.relative_to(datasets))})

    # --- the pipeline's own outputs for those frames (what the check compares with)
    identifier = KeyTaskIdentifier(keys, bounds, candidates=len(names))
    distances = identifier.distances(routing_tokens(backbones, decoded, model, batch_size))
    outputs = run_on_frames(expert, spec, backbones, decoded, batch_size)
    map_max = [float(m.max()) for m in outputs.maps]
    manifest = {
        "format": 1,
        "created_by": "deploy/gpu/prepare.py",
        "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__, "python": sys.version.split()[0]},
        "vit": {"file": VIT_FILE, "timm": gpu_models.VIT_TIMM, "image_size": vit.image_size,
                "blocks": KEY_LAYER + 1, "key_layer": KEY_LAYER, "dtype": "float16"},
        "cnn": {"file": CNN_FILE, "timm": gpu_models.CNN_TIMM, "out_indices": list(cnn.stage_ids), "dtype": "float16"},
        "patchcore": {"bank_file": BANK_FILE, "spec_file": SPEC_FILE, **spec_json,
                      "fit_images": [str(p.relative_to(datasets)) for p in train[PATCHCORE_TASK][0]]},
        "routing": {"keys_file": KEYS_FILE, "tasks": names, "bounds": bounds, "real": list(REAL_TASKS),
                    "synthetic": synthetic_info, "num_keys": model.num_keys, "unknown_slack": model.unknown_slack,
                    "image_size": model.image_size,
                    "key_images": {t: [str(p.relative_to(datasets)) for p in train[t][0]] for t in REAL_TASKS},
                    "bound_images": {t: [str(p.relative_to(datasets)) for p in train[t][1]] for t in REAL_TASKS}},
        "frames": frame_rows,
        "map_scale": max(map_max),  # quantisation of the maps to 8 bits (the live PNG's max_score)
        "reference": {
            "what": "the pipeline on CPU in fp32: PIL decode and resizes, faiss search (run_on_frames, KeyTaskIdentifier)",
            "routing_distances": distances.tolist(),
            "scores": [float(s) for s in outputs.scores],
            "map_max": map_max,
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB, {len(frame_rows)} frames, {len(names)} tasks) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    if total > MAX_FOLDER_BYTES:
        raise SystemExit(f"{out} is {total / 2**20:.1f} MiB, over {MAX_FOLDER_BYTES / 2**20:.0f} MiB")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--images", type=int, default=20, help="normal train images per task (bank, keys)")
    parser.add_argument("--frames", type=int, default=16, help="test frames, half from each dataset")
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic tasks beside the 2 real ones")
    parser.add_argument("--noise", type=float, default=0.5, help="synthetic keys: noise in units of the keys' std")
    parser.add_argument("--frame-side", type=int, default=1080)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.images < 2 or args.frames < 1:
        parser.error("--images must be >= 2 and --frames >= 1")
    prepare(args.out.resolve(), args.datasets.resolve(), args.images, args.frames, args.synthetic, args.noise,
            args.frame_side, args.quality, args.seed, args.batch_size)


if __name__ == "__main__":
    main()
