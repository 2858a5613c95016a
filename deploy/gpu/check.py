"""GPU check of live inspection: the project's own `Inspector` on JPEG frames, timed and compared with CPU.

Runs on the device machine (`python3 deploy/gpu/check.py --device cuda --out $OUT`, pydantic from the
carried wheels on PYTHONPATH) over the folder `deploy/gpu/prepare.py` wrote (`.gpu-check/`, carried):
`Backbones.from_folder` loads the checksum-verified fp16 weights, `Inspector.sync` loads the tasks from a
`DumpedStore` over the store dump (no Redis), and every frame goes through `Inspector.inspect` itself:
routing pass, key search, each routed task's expert at its stored spec, maps at frame resolution, the
task's decision. Nothing of the model path is copied here. `--device cpu` runs the same here (tests).

Agreement, before the timings: every prepared frame, decoded by the pipeline's own `decode_image`, is
inspected in each precision (bf16: the pipeline's autocast on cuda; fp32: that autocast off and TF32
off; on cpu the pipeline runs fp32 only) and compared with the reference outputs prepare.py stored
(CPU, fp32, the same weights and store): routed task, decision, raw score, routing distance, map maximum.
When the timed decoder is another one (nvJPEG on cuda), one more pass shows its effect.

Timings, per batch size (default 1, 8, 64; frames cycled) and precision: decode (torchvision's
`decode_jpeg` on the GPU, batched, copied to host arrays because `inspect` takes decoded uint8 frames;
else on the CPU; else PIL) and `inspect` (its own split: routing pass, task identification, experts),
each batch ended by a device synchronisation. frames/s = frames / summed batch time; p50 / p99 ms per
batch. The table (gpu_check.md) and gpu_check.json are rewritten after every row, so a run cut short
still leaves what it measured. Defaults take about 2-3 minutes on an H100 (`--budget-s` skips rows that
would start later).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.inspector import Inspector  # noqa: E402
from pipeline.core.store import DumpedStore  # noqa: E402
from pipeline.features.backbone import Backbones  # noqa: E402
from pipeline.features.imaging import decode_image  # noqa: E402
from schemas.config import InferenceConfig, ModelConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import inspect_all  # noqa: E402  (records as the reference was stored)

STAGES = ("decode", "routing", "task_id", "experts")


# ------------------------------------------------------------------------------------------ inputs
class Decoder:
    """JPEG bytes -> the decoded uint8 H x W x 3 host arrays `Inspector.inspect` takes. Modes: nvjpeg
    (torchvision on the GPU, batched, then copied to the host), torchvision (CPU), pipeline
    (`decode_image`, PIL, what the workers and the reference use)."""

    def __init__(self, jpegs: list[bytes], device: torch.device, mode: str = "auto"):
        self.device, self.note = device, ""
        self.max_pixels = InferenceConfig().max_frame_pixels
        self.encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        self.jpegs = jpegs
        wanted = ["nvjpeg", "torchvision", "pipeline"] if device.type == "cuda" else ["pipeline"]
        for candidate in ([mode] if mode != "auto" else wanted):
            try:
                self.mode = candidate
                self([0, min(1, len(jpegs) - 1)])
                return
            except Exception as error:  # noqa: BLE001 - noted, and the next decoder tried
                self.note += f"{candidate} failed ({type(error).__name__}: {error}); "
        raise SystemExit(f"no decoder works: {self.note}")

    def __call__(self, index: list[int]) -> list[np.ndarray]:
        if self.mode == "pipeline":
            return [decode_image(self.jpegs[i], self.max_pixels) for i in index]
        from torchvision.io import ImageReadMode, decode_jpeg

        batch = [self.encoded[i] for i in index]
        if self.mode == "nvjpeg":
            decoded = decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device)
        elif self.mode == "torchvision":
            decoded = decode_jpeg(batch, mode=ImageReadMode.RGB)
        else:
            raise ValueError(f"unknown decoder {self.mode!r}")
        return [image.permute(1, 2, 0).contiguous().cpu().numpy() for image in decoded]


@contextlib.contextmanager
def precision(name: str, device: torch.device, backbones: Backbones):
    """bf16: the pipeline as it is (its Backbone autocasts to bf16 on cuda). fp32: every loaded backbone's
    autocast off (`Backbone.gpu_bf16`) and TF32 off, for this block only."""
    if name == "bf16":
        if device.type != "cuda":
            raise SystemExit("bf16 is the pipeline's cuda precision; on cpu it runs fp32 only")
        yield
        return
    loaded = [backbones.for_spec(cnn) for cnn in backbones.loaded()]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    saved_bf16 = [backbone.gpu_bf16 for backbone in loaded]
    for backbone in loaded:
        backbone.gpu_bf16 = False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        for backbone, bf16 in zip(loaded, saved_bf16):
            backbone.gpu_bf16 = bf16
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ agreement
def _rel(ours: list, theirs: list, reduce=np.max) -> float:
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not pairs:
        return float("nan")
    a, b = np.array(pairs, dtype=np.float64).T
    return float(reduce(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def compare(ours: list[dict], reference: list[dict]) -> dict:
    """Our records against the reference's, frame by frame."""
    def column(records: list[dict], key: str) -> list:
        return [r[key] for r in records]

    return {
        "frames": len(ours),
        "routed_agree": sum(a["category"] == b["category"] for a, b in zip(ours, reference)),
        "decision_agree": sum(a["is_defective"] == b["is_defective"] for a, b in zip(ours, reference)),
        "score_max_rel": _rel(column(ours, "score_raw"), column(reference, "score_raw")),
        "score_median_rel": _rel(column(ours, "score_raw"), column(reference, "score_raw"), np.median),
        "distance_max_rel": _rel(column(ours, "distance"), column(reference, "distance")),
        "map_max_rel": _rel(column(ours, "map_max"), column(reference, "map_max")),
    }


def agreement(inspector: Inspector, decoder: Decoder, precisions: list[str], manifest: dict, count: int,
              device: torch.device) -> dict:
    reference = manifest["reference"]["outputs"][:count]
    batch = manifest["reference_batch"]
    pipeline_decoder = decoder if decoder.mode == "pipeline" else Decoder(decoder.jpegs, device, "pipeline")
    frames = pipeline_decoder(list(range(count)))
    passes: dict[str, dict] = {}
    for name in precisions:
        with precision(name, device, inspector.backbones):
            records = inspect_all(inspector, frames, batch)
        passes[name] = {"decode": "pipeline", **compare(records, reference), "outputs": records}
    if decoder.mode != "pipeline":
        timed = decoder(list(range(count)))
        with precision(precisions[0], device, inspector.backbones):
            records = inspect_all(inspector, timed, batch)
        pixel_diff = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(timed, frames)]
        passes[f"{precisions[0]}, {decoder.mode}"] = {
            "decode": decoder.mode, **compare(records, reference), "outputs": records,
            "pixel_max_abs": int(max(d.max() for d in pixel_diff)),
            "pixel_mean_abs": float(np.mean([d.mean() for d in pixel_diff]))}
    truth = [row["task"] for row in manifest["frames"][:count]]
    return {"passes": passes,
            "routed_to_own_task": {name: sum(r["category"] == t for r, t in zip(p["outputs"], truth))
                                   for name, p in passes.items()},
            "fp16_weights_vs_registry": compare(reference, manifest["registry_reference"]["outputs"][:count])}


# ------------------------------------------------------------------------------------------ timings
def _percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(np.mean(values))}


def measure(inspector: Inspector, decoder: Decoder, count: int, batch: int, name: str, device: torch.device,
            seconds: float, warmup: int, min_iters: int, max_iters: int) -> dict:
    position = 0

    def next_batch() -> list[int]:
        nonlocal position
        index = [(position + j) % count for j in range(batch)]
        position = (position + batch) % count
        return index

    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []
    with precision(name, device, inspector.backbones):
        for _ in range(warmup):
            inspector.inspect(decoder(next_batch()))
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        while len(totals) < max_iters and (len(totals) < min_iters or time.perf_counter() - began < seconds):
            start = time.perf_counter()
            images = decoder(next_batch())
            decoded = time.perf_counter()
            _, timings = inspector.inspect(images)
            _sync(device)
            totals.append((time.perf_counter() - start) * 1e3)
            for stage, ms in zip(STAGES, ((decoded - start) * 1e3, timings.features_ms, timings.task_id_ms,
                                          timings.expert_ms)):
                stage_ms[stage].append(ms)
    row = {"batch": batch, "precision": name, "iterations": len(totals),
           "frames_per_s": batch * len(totals) / (sum(totals) / 1e3), "batch_ms": _percentiles(totals),
           "stages_ms": {stage: _percentiles(values) for stage, values in stage_ms.items()}}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device_name']}", "",
             f"torch {env['torch']}, timm {env['timm']}, torchvision {env['torchvision']}, pydantic {env['pydantic']}, "
             f"Python {env['python']}; decode: {env['decode']}" + (f" ({env['decode_note'].rstrip('; ')})" if env['decode_note'] else ""),
             f"{env['frames']} frames ({env['frame_sizes']}); store version {env['store_version']}: {env['tasks']} tasks "
             f"({env['task_specs']}); weights: {env['weights']}; sync {env['sync_s']:.1f} s", "",
             "ms per batch, p50 / p99 (decode, then `Inspector.inspect`: routing pass, task identification, experts; "
             "each batch ends with a device synchronisation)", "",
             "| batch | precision | frames/s | batch | " + " | ".join(STAGES) + " | iters | peak GiB |",
             "|" + "---|" * (len(STAGES) + 6)]
    for row in report["rows"]:
        cells = [str(row["batch"]), row["precision"], f"{row['frames_per_s']:.1f}",
                 f"{row['batch_ms']['p50']:.1f} / {row['batch_ms']['p99']:.1f}"]
        cells += [f"{row['stages_ms'][s]['p50']:.1f} / {row['stages_ms'][s]['p99']:.1f}" for s in STAGES]
        cells += [str(row["iterations"]), f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nnote: {note}" for note in report["notes"]]
    found = report.get("agreement")
    if found:
        lines += ["", "## Agreement with the CPU reference (prepare.py: fp32, decode_image, the same weights and store)", "",
                  "| pass | decode | routed task agrees | decision agrees | score rel diff max (median) "
                  "| routing distance max rel | map max rel | own task |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, c in found["passes"].items():
            lines.append(f"| {name} | {c['decode']} | {c['routed_agree']}/{c['frames']} | {c['decision_agree']}/{c['frames']} "
                         f"| {c['score_max_rel']:.2e} ({c['score_median_rel']:.2e}) | {c['distance_max_rel']:.2e} "
                         f"| {c['map_max_rel']:.2e} | {found['routed_to_own_task'][name]}/{c['frames']} |")
        for c in found["passes"].values():
            if "pixel_max_abs" in c:
                lines.append(f"\n{c['decode']} against decode_image: pixels differ by at most {c['pixel_max_abs']} "
                             f"(mean {c['pixel_mean_abs']:.3f}) grey levels")
        w = found["fp16_weights_vs_registry"]
        lines.append(f"\nthe reference's fp16 weights against the registry's (both CPU, prepare.py): score rel diff max "
                     f"{w['score_max_rel']:.2e}, routed {w['routed_agree']}/{w['frames']}, decisions "
                     f"{w['decision_agree']}/{w['frames']}")
    lines.append(f"\nwall time {report['wall_s']:.1f} s")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path, started: float) -> str:
    report["wall_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


def _imported() -> list[str]:
    """Top-level modules imported here beyond the standard library (what the device had to provide)."""
    names = {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
    return sorted(name for name in names if not name.startswith("_") and name != "cython_runtime")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the device machine) or cpu (tests)")
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu-check", help="the folder prepare.py wrote")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--frames", type=int, default=0, help="only the first N prepared frames (0: all)")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--precisions", default="auto", help="comma-separated bf16,fp32; auto: both on cuda, fp32 on cpu")
    parser.add_argument("--decode", choices=("auto", "nvjpeg", "torchvision", "pipeline"), default="auto",
                        help="the timed decoder; auto: nvjpeg on cuda when it works, else torchvision; pipeline on cpu")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per batch size and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each row")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--budget-s", type=float, default=300.0, help="rows that would start later are skipped")
    parser.add_argument("--no-agreement", action="store_true", help="skip the comparison with the reference")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    precisions = (["bf16", "fp32"] if device.type == "cuda" else ["fp32"]) if args.precisions == "auto" \
        else [p.strip() for p in args.precisions.split(",") if p.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    data = args.data.resolve()
    if not (data / "manifest.json").is_file():
        raise SystemExit(f"{data / 'manifest.json'} not found: run deploy/gpu/prepare.py first (and carry .gpu-check)")
    manifest = json.loads((data / "manifest.json").read_text())
    rows = manifest["frames"][: args.frames or None]
    jpegs = [(data / row["file"]).read_bytes() for row in rows]

    backbones = Backbones.from_folder(data / manifest["weights"], device)
    inspector = Inspector(backbones, ModelConfig(**manifest["model"]), manifest["inspector_batch"])
    sync_began = time.perf_counter()
    store = DumpedStore(data / manifest["store"])
    inspector.sync(store)
    _sync(device)
    sync_s = time.perf_counter() - sync_began
    decoder = Decoder(jpegs, device, args.decode)
    print(f"loaded: {len(inspector.tasks)} tasks, store version {inspector.store_version}, decode {decoder.mode} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    import pydantic
    import timm

    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = "missing"
    report = {
        "environment": {
            "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torchvision": torchvision_version, "pydantic": pydantic.VERSION,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "cuda": torch.version.cuda, "decode": decoder.mode, "decode_note": decoder.note,
            "frames": len(jpegs), "frame_sizes": ", ".join(sorted({f"{r['size'][0]}x{r['size'][1]}" for r in rows})),
            "store_version": inspector.store_version, "tasks": len(inspector.tasks),
            "task_specs": ", ".join(sorted({t.spec.describe() for t in inspector.tasks.values()})),
            "weights": ", ".join(sorted(backbones.weights.entries)), "loaded_cnns": sorted(backbones.loaded()),
            "sync_s": sync_s,
        },
        "precisions": precisions, "args": {k: str(v) for k, v in vars(args).items()}, "rows": [], "notes": [],
    }
    if decoder.note:
        report["notes"].append(f"decode: {decoder.note.rstrip('; ')}")
    if not args.no_agreement:
        report["agreement"] = agreement(inspector, decoder, precisions, manifest, len(jpegs), device)
        write(report, args.out, started)
        print(f"agreement done ({time.perf_counter() - started:.0f} s)", flush=True)
    for batch in batch_sizes:
        for name in precisions:
            if time.perf_counter() - started > args.budget_s:
                report["notes"].append(f"batch {batch} {name} skipped: the {args.budget_s:.0f} s budget was spent")
                continue
            row = measure(inspector, decoder, len(jpegs), batch, name, device, args.seconds, args.warmup,
                          args.min_iters, args.max_iters)
            report["rows"].append(row)
            write(report, args.out, started)
            print(f"batch {batch} {name}: {row['frames_per_s']:.1f} frames/s "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    report["environment"]["imported"] = _imported()
    print(write(report, args.out, started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
