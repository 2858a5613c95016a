"""Prepare the GPU check's folder (default `.gpu-check/`, git-ignored) and its wheels (`.gpu-wheels/`) here.

The device machine has torch, timm, torchvision, safetensors, numpy, scipy and Pillow, but not pydantic,
faiss, kafka-python, redis, the weight packages or a network. What `deploy/gpu/check.py` needs to run the
project's own `Inspector` there is written here, on CPU, with the pipeline itself:

- `weights/`: the backbones' weights as fp16 safetensors plus `weights.json` with their SHA-256
  (`pipeline.features.backbone.write_folder`; read with `Backbones.from_folder`): EfficientNet-Lite0 (the
  CNN the tasks' specs name) and the DINOv2 ViT's blocks 0..KEY_LAYER, all that routing runs;
- `store/`: a dump of a real KnowledgeStore (`KnowledgeStore.dump`; read with `DumpedStore`): a Redis
  started here on a free port holds the tasks, and the dump is its manifest and blobs byte for byte.
  Tasks: ball_screw and magnetic_tile trained by `train_task` on `--images` train images each (expert
  PatchCore at the automatic choice's first candidate spec, calibrated, audit set and all), and
  `--synthetic` more (a real task's artifacts with its keys moved by seeded noise);
- `frames/*.jpg`: `--frames` test images of both datasets (good and defective), scaled so the longer
  side is `--frame-side` (aspect kept), JPEG quality `--quality`;
- `manifest.json`: what is where, the model config, and the reference outputs of `Inspector.inspect` on
  those frames here (CPU, fp32, the pipeline's PIL decode): with the folder's weights over the dump (what
  the check must reproduce) and with the registry's weights over the live Redis store (the fp16 effect).

The wheels are pydantic and its dependencies for CPython 3.12 on x86-64 (the device README's recipe).
Finally it prints what a device call would carry: the repo's tracked and untracked-not-ignored files,
the prepared folder and the wheels, which must stay under 64 MiB.

Run: `.venv/bin/python deploy/gpu/prepare.py` (about a minute and a half on two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.inspector import Inspection, Inspector  # noqa: E402
from pipeline.core.store import DumpedStore, KnowledgeStore  # noqa: E402
from pipeline.features.backbone import KEY_LAYER, Backbones, write_folder  # noqa: E402
from pipeline.features.imaging import decode_image  # noqa: E402
from schemas.config import InferenceConfig, ModelConfig, TrainingConfig  # noqa: E402

REAL_TASKS = ("ball_screw", "magnetic_tile")
EXPERT = "patchcore"
FALSE_ALARM_RATE = 0.01  # AddCategory's default
INSPECTOR_BATCH = 16  # Inspector's default, as the workers build it
REFERENCE_BATCH = 8  # frames per inspect() call for the reference outputs (the worker's max_batch_size)
WHEELS = {"pydantic": "pydantic", "pydantic-core": "pydantic_core", "annotated-types": "annotated_types",
          "typing-extensions": "typing_extensions", "typing-inspection": "typing_inspection"}
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")
MAX_TRAVEL_BYTES = 64 * 2**20  # the device tool's limit on what one call carries


def inspection_record(inspection: Inspection) -> dict:
    """One frame's outputs as stored and compared (the map as its maximum, mean and 99th percentile)."""
    match, score_map = inspection.match, inspection.score_map
    return {"category": match.category, "nearest": match.nearest, "distance": float(match.distance),
            "margin": float(match.margin), "expert": inspection.expert, "score_raw": inspection.score_raw,
            "score": inspection.score, "threshold": inspection.threshold, "is_defective": inspection.is_defective,
            "task_version": inspection.task_version,
            "map_max": None if score_map is None else float(score_map.max()),
            "map_mean": None if score_map is None else float(score_map.mean()),
            "map_p99": None if score_map is None else float(np.percentile(score_map, 99))}


def inspect_all(inspector: Inspector, frames: list[np.ndarray], batch: int) -> list[dict]:
    records = []
    for start in range(0, len(frames), batch):
        results, _ = inspector.inspect(frames[start:start + batch])
        records += [inspection_record(r) for r in results]
    return records


@contextlib.contextmanager
def redis_server():
    """A throw-away redis-server on a free port (no persistence), stopped on exit; yields its URL."""
    import redis

    from tools.processes import free_ports

    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH: the store dump is written from a real Redis")
    port = free_ports(1)[0]
    with tempfile.TemporaryDirectory() as home:
        process = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", home, "--save", "",
                                    "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"redis-server on port {port} did not start")
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def train_tasks(datasets: Path, backbones: Backbones, model: ModelConfig, images: int, synthetic: int,
                noise: float, seed: int) -> list:
    """The real tasks trained as adding them does (one candidate: the automatic choice's first), then the
    synthetic ones (a real task with its keys moved by `noise` x their spread, seeded)."""
    from pipeline.core.expert_selection import candidate_specs
    from pipeline.core.training import load_task_images, train_task

    training = TrainingConfig()
    tasks = []
    for category in REAL_TASKS:
        started = time.perf_counter()
        train_dir = datasets / category / "train" / "good"
        fit = load_task_images(train_dir, training, model.seed, images).frames["fit"]
        spec = candidate_specs(EXPERT, fit)[0]
        tasks.append(train_task(category, train_dir, EXPERT, backbones, model, training, FALSE_ALARM_RATE,
                                max_train_images=images, spec=spec))
        print(f"  {category}: {EXPERT} at {spec.describe()}, threshold {tasks[-1].calibration.threshold:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    rng = np.random.default_rng(seed)
    for index in range(synthetic):
        source = tasks[index % len(REAL_TASKS)]
        spread = source.keys.std(axis=0, keepdims=True)
        keys = (source.keys + noise * spread * rng.standard_normal(source.keys.shape)).astype(np.float32)
        name = f"synthetic_{index:02d}_{source.category}"
        tasks.append(dataclasses.replace(source, category=name, keys=keys,
                                         meta={**source.meta, "synthetic": {"source": source.category, "noise": noise,
                                                                            "seed": seed}}))
    return tasks


def write_frames(datasets: Path, out: Path, count: int, side: int, quality: int, seed: int) -> list[dict]:
    """Test images of both datasets (about half each, good and defective), longer side scaled to `side`."""
    from PIL import Image

    from pipeline.data.datasets import labeled_test_images

    rows = []
    for category, share in zip(REAL_TASKS, (count - count // 2, count // 2)):
        items = labeled_test_images(datasets, category)
        chosen = np.random.default_rng(seed).choice(len(items), size=min(share, len(items)), replace=False)
        for item in (items[i] for i in sorted(chosen)):
            with Image.open(item.path) as image:
                rgb = image.convert("RGB")
            scale = side / max(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=quality)
            label = item.defect
            name = f"frames/frame_{len(rows):02d}_{category}_{label}.jpg"
            (out / name).write_bytes(buffer.getvalue())
            rows.append({"file": name, "task": category, "label": label, "size": [rgb.height, rgb.width],
                         "source": str(Path(item.path).relative_to(datasets))})
    return rows


def download_wheels(folder: Path) -> list[Path]:
    """pydantic and its dependencies at this environment's versions, as CPython 3.12 x86-64 wheels
    (pip download; kept when the folder already holds exactly them)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    wanted = {f"{module}-{version(name)}-" for name, module in WHEELS.items()}
    have = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if len(have) == len(wanted) and all(any(p.name.startswith(w) for p in have) for w in wanted):
        return have
    if folder.exists():
        shutil.rmtree(folder)
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pip = [shutil.which("python3") or "python3", "-m", "pip"]
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(folder), *pins], check=True)
    return sorted(folder.glob("*.whl"))


def travelling_bytes(carried: list[Path]) -> dict[str, int]:
    """What a device call sends: the repo's tracked and untracked-not-ignored files, and `carried`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    sizes = {"repo": sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())}
    for folder in carried:
        sizes[folder.name] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    sizes["total"] = sum(sizes.values())
    return sizes


def prepare(out: Path, datasets: Path, wheels: Path | None, images: int, frames: int, synthetic: int, noise: float,
            frame_side: int, quality: int, seed: int) -> dict:
    started = time.perf_counter()

    def done(what: str) -> None:
        print(f"{what} ({time.perf_counter() - started:.0f} s)", flush=True)

    model = ModelConfig()
    if out.exists():
        shutil.rmtree(out)
    (out / "frames").mkdir(parents=True)
    backbones = Backbones.pretrained("cpu")
    done("registry weights loaded")
    tasks = train_tasks(datasets, backbones, model, images, synthetic, noise, seed)
    done(f"{len(tasks)} tasks")
    write_folder(out / "weights", backbones, {task.input_spec.backbone for task in tasks}, KEY_LAYER + 1)
    rows = write_frames(datasets, out, frames, frame_side, quality, seed)
    decoded = [decode_image((out / row["file"]).read_bytes(), InferenceConfig().max_frame_pixels) for row in rows]
    done(f"weights and {len(rows)} frames written")

    with redis_server() as url:
        store = KnowledgeStore.from_url(url)
        for task in tasks:
            store.publish(task)
        dump = store.dump(out / "store")
        live = Inspector(backbones, model, INSPECTOR_BATCH)
        live.sync(store)
        registry_reference = inspect_all(live, decoded, REFERENCE_BATCH)
    done(f"store dumped (version {dump['version']}, {len(dump['blobs'])} blobs, "
         f"{sum(dump['blobs'].values()) / 2**20:.1f} MiB); registry-weights reference")

    # What the check must reproduce: the folder's weights over the dump, as the device loads them.
    inspector = Inspector(Backbones.from_folder(out / "weights"), model, INSPECTOR_BATCH)
    inspector.sync(DumpedStore(out / "store"))
    reference = inspect_all(inspector, decoded, REFERENCE_BATCH)
    done("folder-weights reference")

    import timm
    import torch

    manifest = {
        "format": 2,
        "created_by": "deploy/gpu/prepare.py",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__},
        "weights": "weights", "store": "store", "model": model.model_dump(mode="json"),
        "inspector_batch": INSPECTOR_BATCH, "reference_batch": REFERENCE_BATCH,
        "tasks": {task.category: {"expert": task.expert_name, "spec": task.input_spec.describe(),
                                  "synthetic": "synthetic" in task.meta,
                                  "fit_images": task.meta.get("num_fit_images")} for task in tasks},
        "frames": rows,
        "reference": {"what": "Inspector.inspect on CPU, fp32, decode_image: folder weights over the store dump",
                      "outputs": reference},
        "registry_reference": {"what": "the same with the registry packages' weights over the live Redis store",
                               "outputs": registry_reference},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(out.iterdir()) if p.is_dir()}
    done(f"wrote {out}: " + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items()))
    carried = [out]
    if wheels is not None:
        found = download_wheels(wheels)
        carried.append(wheels)
        done(f"{len(found)} wheels in {wheels}: " + ", ".join(p.name for p in found))
    travel = travelling_bytes(carried)
    print("a device call carries " + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in travel.items())
          + f" (limit {MAX_TRAVEL_BYTES / 2**20:.0f} MiB)", flush=True)
    if travel["total"] >= MAX_TRAVEL_BYTES:
        raise SystemExit(f"{travel['total'] / 2**20:.1f} MiB would travel, over the device tool's 64 MiB")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels", help="where the pydantic wheels go")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (tests: no network needed)")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--images", type=int, default=20, help="train images per real task (all roles)")
    parser.add_argument("--frames", type=int, default=16, help="test frames, about half from each dataset")
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic tasks beside the 2 real ones")
    parser.add_argument("--noise", type=float, default=0.5, help="synthetic keys: noise in units of the keys' std")
    parser.add_argument("--frame-side", type=int, default=1080, help="frames' longer side, px")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 4 or args.frames < 1:
        parser.error("--images must be >= 4 (a task's minimum) and --frames >= 1")
    prepare(args.out.resolve(), args.datasets.resolve(), None if args.no_wheels else args.wheels.resolve(), args.images,
            args.frames, args.synthetic, args.noise, args.frame_side, args.quality, args.seed)


if __name__ == "__main__":
    main()
