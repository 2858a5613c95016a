"""GPU check of live inspection's model path: JPEG bytes in, routed task, PatchCore score and 8-bit map out.

Runs on the device machine (`python deploy/gpu/check.py --device cuda --out $OUT`) from the folder
`deploy/gpu/prepare.py` wrote here (`.gpu-check/`, carried), with torch, timm, torchvision and
safetensors only: no pydantic, faiss, kafka or redis there, so it imports `deploy/gpu/gpu_models.py`
(the pipeline's networks and arithmetic, rebuilt and tested equal to it) and never `pipeline`. It never
needs the network. `--device cpu` runs the same code here (tests, tiny sizes).

Per batch of B frames (1080 x 1080 JPEGs, cycled when B exceeds them), each stage timed between
`torch.cuda.synchronize()` calls:
  decode  batched nvJPEG decode (`torchvision.io.decode_jpeg(list, device='cuda')`) from pinned host
          buffers; CPU decode + pinned host-to-device copy if the GPU decoder is not available (noted);
  resize  uint8 -> float, antialiased bilinear on the GPU: routing's 224 x 224 squeeze and the PatchCore
          spec's letterbox canvas (224 x 544, edges replicated), both rounded to 8 bits like PIL's output;
  vit     DINOv2 ViT-S/14 to block KEY_LAYER (unprompted tokens, no final norm);
  keys    exhaustive key search over every task (mean over patches of the nearest-key distance), bounds;
  cnn     EfficientNet-Lite0 stages (channels_last) and PatchCore's patch embedding (stages 2 + 3);
  nn      nearest bank entry per patch (fp32 matmul + top-k, chunked) and the re-weighted image score
          over the patches that show the frame;
  map     patch distances -> canvas (bilinear) -> Gaussian blur -> frame size, quantised to 8 bits;
  d2h     routing results, scores and the 8-bit maps copied to pinned host memory.
Both networks run under bf16 autocast on cuda (fp32 on cpu) with cudnn.benchmark; warm-up batches are
not timed. "frames/s" is B / mean synced batch time; "frames/s, 1 sync" runs the same batches with one
synchronisation per batch (what a worker would see). Before the timings, every frame goes through the
path in fp32 (TF32 off) and in bf16, and both are compared with each other and with the pipeline's own
CPU outputs stored by prepare.py (PIL decode and resizes, fp32 weights, faiss).

Writes gpu_check.md (the table) and gpu_check.json to --out, after each batch size (a run cut short
still leaves what it measured). Default sizes fit in about 2-3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_models as gm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("decode", "resize", "vit", "keys", "cnn", "nn", "map", "d2h")


# ------------------------------------------------------------------------------------------ inputs
class Assets:
    """The prepared folder: weights, keys, bank, spec, frames and the pipeline's reference outputs."""

    def __init__(self, folder: Path, frames: int | None):
        self.folder = folder
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise SystemExit(f"{manifest_path} not found: run deploy/gpu/prepare.py first (and carry .gpu-check)")
        self.manifest = json.loads(manifest_path.read_text())
        m = self.manifest
        self.vit_state = load_file(str(folder / m["vit"]["file"]))
        self.cnn_state = load_file(str(folder / m["cnn"]["file"]))
        keys = load_file(str(folder / m["routing"]["keys_file"]))
        self.keys, self.bounds = keys["keys"], keys["bounds"]
        self.tasks: list[str] = m["routing"]["tasks"]
        self.bank = load_file(str(folder / m["patchcore"]["bank_file"]))["bank"]
        self.spec = m["patchcore"]["spec"]
        self.config = m["patchcore"]["config"]
        rows = m["frames"][:frames] if frames else m["frames"]
        self.frame_rows = rows
        self.jpegs = [(folder / row["file"]).read_bytes() for row in rows]
        ref = m["reference"]
        self.reference = {"scores": np.array(ref["scores"][: len(rows)], dtype=np.float64),
                          "routing_distances": np.array(ref["routing_distances"][: len(rows)], dtype=np.float64)}

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


class Decoder:
    """Encoded JPEGs (host uint8 tensors, pinned on cuda) -> B x 3 x H x W uint8 on the device."""

    def __init__(self, device: torch.device, jpegs: list[bytes], force_cpu: bool = False):
        self.device = device
        self.note = ""
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            self._decode, self._mode = decode_jpeg, ImageReadMode.RGB
        except Exception as error:  # noqa: BLE001 - no torchvision: PIL below
            self._decode = None
            self.note = f"torchvision.io unavailable ({type(error).__name__}: {error}); PIL decode on the CPU"
        cuda = device.type == "cuda"
        self.encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        if cuda:
            self.encoded = [t.pin_memory() for t in self.encoded]
        self.on_gpu = False
        if cuda and self._decode is not None and not force_cpu:
            try:
                probe = self._decode(self.encoded[:2], mode=self._mode, device=device)
                torch.cuda.synchronize()
                if len(probe) != min(2, len(self.encoded)) or probe[0].device.type != "cuda":
                    raise RuntimeError("unexpected output of decode_jpeg on the GPU")
                self.on_gpu = True
            except Exception as error:  # noqa: BLE001 - any failure: CPU decode, noted in the table
                self.note = f"GPU decode failed ({type(error).__name__}: {error}); CPU decode + pinned copy"
        elif force_cpu:
            self.note = "CPU decode asked for (--cpu-decode)"
        self.mode = "nvjpeg (GPU, batched)" if self.on_gpu else ("torchvision CPU" if self._decode else "PIL CPU")

    def __call__(self, index: list[int]) -> torch.Tensor:
        batch = [self.encoded[i] for i in index]
        if self.on_gpu:
            return torch.stack(self._decode(batch, mode=self._mode, device=self.device))
        if self._decode is not None:
            host = torch.stack(self._decode(batch, mode=self._mode))
        else:
            from PIL import Image

            host = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(t.numpy().tobytes())).convert("RGB")))
                                .permute(2, 0, 1) for t in batch])
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host


# ------------------------------------------------------------------------------------------ model path
class StageClock:
    """Times stages between device synchronisations (sync=True), or just runs them."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync = device, sync
        self.ms: dict[str, float] = {}

    def _wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str, fn):
        if not self.sync:
            return fn()
        self._wait()
        start = time.perf_counter()
        result = fn()
        self._wait()
        self.ms[name] = (time.perf_counter() - start) * 1e3
        return result


class ModelPath:
    def __init__(self, assets: Assets, device: torch.device, force_cpu_decode: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.vit = gm.RoutingViT(assets.vit_state, assets.manifest["vit"]["image_size"]).to(device)
        self.cnn = gm.PatchCNN(assets.cnn_state).to(device)
        if self.cuda:
            self.cnn = self.cnn.to(memory_format=torch.channels_last)
        self.keys = gm.KeySearch(assets.keys, assets.bounds).to(device)
        self.bank = gm.BankSearch(assets.bank.to(device), int(assets.config["num_neighbors"]))
        self.routing_hw = (assets.manifest["routing"]["image_size"] // gm.VIT_PATCH * gm.VIT_PATCH,) * 2
        self.canvas = (int(assets.spec["height"]), int(assets.spec["width"]))
        self.sigma = float(assets.config["map_sigma"])
        self.map_scale = float(assets.manifest["map_scale"])
        self.decoder = Decoder(device, assets.jpegs, force_cpu_decode)
        self._valid: dict[tuple, torch.Tensor] = {}

    def autocast(self, amp: bool):
        if not amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _resize(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = frames.float()  # 0-255: both resizes round to 8 bits as the pipeline's PIL resizes do
        return gm.to_unit(gm.squeeze(pixels, *self.routing_hw)), gm.to_unit(gm.letterbox(pixels, self.canvas))

    def _vit(self, pixels: torch.Tensor, amp: bool) -> torch.Tensor:
        with torch.inference_mode(), self.autocast(amp):
            return self.vit(pixels)

    def _cnn(self, pixels: torch.Tensor, amp: bool) -> torch.Tensor:
        if self.cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast(amp):
            stages = self.cnn(pixels)
        return gm.embed_patches({s: stages[s].float() for s in gm.PATCH_STAGES})

    def _nn(self, patches: torch.Tensor, frame_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, d = patches.shape
        key = (frame_hw, h, w)
        if key not in self._valid:
            self._valid[key] = gm.valid_grid(frame_hw, self.canvas, (h, w), self.device)
        query = patches.reshape(b, h * w, d)
        dist, index = self.bank.search(query.reshape(-1, d), 1)
        dist, index = dist.view(b, h * w), index.view(b, h * w)
        return self.bank.image_scores(query, dist, index, self._valid[key]), dist.view(b, h, w)

    def _map(self, patch_dist: torch.Tensor, frame_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = gm.patch_maps_to_frames(patch_dist, self.canvas, frame_hw, self.sigma)
        return maps, (maps * (255.0 / self.map_scale)).round_().clamp_(0, 255).to(torch.uint8)

    def _d2h(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not self.cuda:
            return list(tensors)
        out = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        return out

    @torch.inference_mode()
    def step(self, index: list[int], amp: bool, clock: StageClock) -> dict[str, torch.Tensor]:
        frames = clock("decode", lambda: self.decoder(index))
        frame_hw = (int(frames.shape[-2]), int(frames.shape[-1]))
        routing_px, expert_px = clock("resize", lambda: self._resize(frames))
        tokens = clock("vit", lambda: self._vit(routing_px, amp))
        distances, best, best_distance, known = clock("keys", lambda: self.keys.route(tokens))
        patches = clock("cnn", lambda: self._cnn(expert_px, amp))
        scores, patch_dist = clock("nn", lambda: self._nn(patches, frame_hw))
        maps, maps_u8 = clock("map", lambda: self._map(patch_dist, frame_hw))
        host = clock("d2h", lambda: self._d2h(best, best_distance, known, scores, maps_u8))
        if not clock.sync and self.cuda:
            torch.cuda.synchronize(self.device)  # the worker needs the host copies
        return {"distances": distances, "best": host[0], "scores": host[3], "maps": maps, "maps_u8": host[4]}


# ------------------------------------------------------------------------------------------ measurements
def _batches(count: int, batch: int):
    start = 0
    while True:
        yield [(start + j) % count for j in range(batch)]
        start = (start + batch) % count


def _rel(a: np.ndarray, b: np.ndarray, reduce=np.max) -> float:
    """Max (or `reduce`) of |a - b| / |b|, b the reference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(reduce(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if a.size else float("nan")


def _compare(ours: dict[str, np.ndarray], scores: np.ndarray, distances: np.ndarray, best: np.ndarray) -> dict:
    return {"score_max_rel": _rel(ours["scores"], scores), "score_median_rel": _rel(ours["scores"], scores, np.median),
            "routing_distance_max_rel": _rel(ours["distances"], distances),
            "routed_task_agree": int((ours["best"] == best).sum())}


def run_all(path: ModelPath, count: int, amp: bool, batch: int) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {"distances": [], "best": [], "scores": [], "map_max": [], "maps": []}
    for start in range(0, count, batch):
        index = list(range(start, min(count, start + batch)))
        out = path.step(index, amp, StageClock(path.device, sync=False))
        parts["distances"].append(out["distances"].float().cpu().numpy())
        parts["best"].append(out["best"].cpu().numpy())
        parts["scores"].append(out["scores"].float().cpu().numpy())
        maps = out["maps"].float()
        parts["map_max"].append(maps.flatten(1).amax(dim=1).cpu().numpy())
        parts["maps"].append(maps.cpu())  # float32 maps of a few frames: small enough for the host
    result = {k: np.concatenate(v) for k, v in parts.items() if k != "maps"}
    result["maps"] = torch.cat(parts["maps"]).numpy()
    return result


def precision_check(path: ModelPath, assets: Assets) -> dict:
    """Every frame in fp32 (TF32 off) and in bf16, compared with each other and with the pipeline."""
    count = len(assets.jpegs)
    batch = min(count, 16)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = run_all(path, count, amp=False, batch=batch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = assets.reference
    ref_best = ref["routing_distances"].argmin(axis=1)
    truth = np.array([assets.tasks.index(row["task"]) for row in assets.frame_rows])
    bf16 = run_all(path, count, amp=True, batch=batch)  # bf16 autocast on the CPU too (slow, but tiny there)
    bf16_vs_fp32 = _compare(bf16, fp32["scores"], fp32["distances"], fp32["best"])
    bf16_vs_fp32["map_max_abs_over_map_max"] = float(np.abs(bf16["maps"] - fp32["maps"]).max()
                                                     / max(1e-12, float(np.abs(fp32["maps"]).max())))
    return {
        "frames": count,
        "bf16_vs_fp32": bf16_vs_fp32,
        "fp32_vs_pipeline": _compare(fp32, ref["scores"], ref["routing_distances"], ref_best),
        "bf16_vs_pipeline": _compare(bf16, ref["scores"], ref["routing_distances"], ref_best),
        "routed_to_own_task_fp32": int((fp32["best"] == truth).sum()),
        "routed_to_own_task_bf16": int((bf16["best"] == truth).sum()),
        "scores_pipeline": ref["scores"].tolist(),
        "scores_fp32": fp32["scores"].tolist(),
        "scores_bf16": bf16["scores"].tolist(),
        "frame_files": [row["file"] for row in assets.frame_rows],
    }


def measure(path: ModelPath, count: int, batch: int, amp: bool, seconds: float, warmup: int,
            min_iters: int, max_iters: int) -> dict:
    batches = _batches(count, batch)
    for _ in range(warmup):
        path.step(next(batches), amp, StageClock(path.device, sync=True))
    if path.cuda:
        torch.cuda.reset_peak_memory_stats(path.device)
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []
    began = time.perf_counter()
    while len(totals) < max_iters and (len(totals) < min_iters or time.perf_counter() - began < seconds):
        clock = StageClock(path.device, sync=True)
        start = time.perf_counter()
        path.step(next(batches), amp, clock)
        clock._wait()
        totals.append((time.perf_counter() - start) * 1e3)
        for name in STAGES:
            stage_ms[name].append(clock.ms.get(name, 0.0))
    # the same batches with one synchronisation per batch (stages overlap host work)
    unsynced_iters, began = 0, time.perf_counter()
    while unsynced_iters < max_iters and (unsynced_iters < min_iters or time.perf_counter() - began < seconds / 2):
        path.step(next(batches), amp, StageClock(path.device, sync=False))
        unsynced_iters += 1
    unsynced_s = time.perf_counter() - began
    row = {
        "batch": batch,
        "iterations": len(totals),
        "frames_per_s": batch * len(totals) / (sum(totals) / 1e3),
        "frames_per_s_one_sync": batch * unsynced_iters / unsynced_s,
        "one_sync_iterations": unsynced_iters,
        "stages_ms": {name: _percentiles(values) for name, values in stage_ms.items()},
        "total_ms": _percentiles(totals),
    }
    if path.cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(path.device) / 2**30
    return row


def _percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(np.mean(values))}


# ------------------------------------------------------------------------------------------ report
def _fmt(ms: dict[str, float]) -> str:
    return f"{ms['p50']:.2f} / {ms['p99']:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check: {env['device_name']}",
        "",
        f"torch {env['torch']}, timm {env['timm']}, torchvision {env['torchvision']}; networks in "
        f"{report['precision_mode']}; decode: {env['decode']}" + (f" ({env['decode_note']})" if env["decode_note"] else ""),
        f"frames {env['frames']} x {env['frame_hw'][0]}x{env['frame_hw'][1]} JPEG; routing {env['routing_hw'][0]}x"
        f"{env['routing_hw'][1]} over {env['tasks']} tasks x {env['keys_per_task']} keys; PatchCore letterbox "
        f"{env['canvas'][0]}x{env['canvas'][1]}, bank {env['bank'][0]} x {env['bank'][1]}",
        "",
        "ms per batch, p50 / p99 (each stage between device synchronisations)",
        "",
        "| batch | frames/s | frames/s, 1 sync | " + " | ".join(STAGES) + " | total | iters | peak GiB |",
        "|" + "---|" * (len(STAGES) + 6),
    ]
    for row in report["rows"]:
        cells = [str(row["batch"]), f"{row['frames_per_s']:.1f}", f"{row['frames_per_s_one_sync']:.1f}"]
        cells += [_fmt(row["stages_ms"][s]) for s in STAGES]
        cells += [_fmt(row["total_ms"]), str(row["iterations"]), f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for note in report["notes"]:
        lines.append(f"\nnote: {note}")
    precision = report.get("precision")
    if precision:
        lines += ["", f"## Precision ({precision['frames']} frames)", "",
                  "| comparison | image score rel diff, max (median) | routing distance max rel | routed task agrees "
                  "| map max abs / max |",
                  "|---|---|---|---|---|"]
        for name in ("bf16_vs_fp32", "fp32_vs_pipeline", "bf16_vs_pipeline"):
            if name in precision:
                c = precision[name]
                map_cell = f"{c['map_max_abs_over_map_max']:.2e}" if "map_max_abs_over_map_max" in c else "-"
                lines.append(f"| {name.replace('_', ' ')} | {c['score_max_rel']:.2e} ({c['score_median_rel']:.2e}) "
                             f"| {c['routing_distance_max_rel']:.2e} "
                             f"| {c['routed_task_agree']}/{precision['frames']} | {map_cell} |")
        lines.append(f"\nframes routed to their own task: fp32 {precision['routed_to_own_task_fp32']}/{precision['frames']}, "
                     f"bf16 {precision['routed_to_own_task_bf16']}/{precision['frames']} (pipeline: fp32 weights, PIL "
                     "decode and resizes, faiss; its differences from fp32 here are the fp16 weights and the tensor resizes)")
    lines.append(f"\nwall time {report['wall_s']:.1f} s")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the device machine) or cpu (tests)")
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu-check", help="the folder prepare.py wrote")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--frames", type=int, default=0, help="use only the first N prepared frames (0: all)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per batch size (synced run)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per batch size")
    parser.add_argument("--min-iters", type=int, default=5)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip the remaining batch sizes after this")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="networks' precision in the timings: auto = bf16 autocast on cuda, fp32 on cpu")
    parser.add_argument("--no-precision-check", action="store_true", help="skip the fp32 / bf16 / pipeline comparison")
    parser.add_argument("--cpu-decode", action="store_true", help="decode on the CPU even on cuda")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # the searches' fp32 products stay fp32
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    assets = Assets(args.data.resolve(), args.frames or None)
    path = ModelPath(assets, device, args.cpu_decode)
    frame_hw = tuple(int(s) for s in path.decoder(list(range(min(2, len(assets.jpegs))))).shape[-2:])

    import timm

    try:
        import torchvision

        tv = torchvision.__version__
    except Exception:  # noqa: BLE001
        tv = "missing"
    report = {
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "timm": timm.__version__, "torchvision": tv, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "decode": path.decoder.mode, "decode_note": path.decoder.note,
            "frames": len(assets.jpegs), "frame_hw": list(frame_hw), "routing_hw": list(path.routing_hw),
            "tasks": len(assets.tasks), "keys_per_task": int(assets.keys.shape[1]),
            "canvas": list(path.canvas), "bank": list(assets.bank.shape), "prepared_bytes": assets.size_bytes,
        },
        "precision_mode": "bf16 autocast" if amp else "fp32",
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
        "notes": [],
        "wall_s": 0.0,
    }
    if not path.decoder.on_gpu and device.type == "cuda":
        report["notes"].append(f"decode ran on the CPU: {path.decoder.note}")
    if not args.no_precision_check:
        report["precision"] = precision_check(path, assets)
        report["wall_s"] = time.perf_counter() - started
        write(report, args.out)
        print(f"precision check done ({report['wall_s']:.0f} s)", flush=True)
    for batch in batch_sizes:
        if time.perf_counter() - started > args.budget_s:
            report["notes"].append(f"batch {batch} skipped: the {args.budget_s:.0f} s budget was spent")
            continue
        row = measure(path, len(assets.jpegs), batch, amp, args.seconds, args.warmup, args.min_iters, args.max_iters)
        report["rows"].append(row)
        report["wall_s"] = time.perf_counter() - started
        write(report, args.out)
        print(f"batch {batch}: {row['frames_per_s']:.1f} frames/s ({report['wall_s']:.0f} s)", flush=True)
    report["wall_s"] = time.perf_counter() - started
    print(write(report, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
