"""What a candidate costs on this machine, estimated from its work instead of timed while the task is added.

The automatic choice holds each candidate to the line's per-frame budget and the whole add to the add
budget. Wall time measured during the add moves with whatever else the machine is doing, so the same add
on the same data could choose differently on a quiet and on a loaded machine. Here a candidate's work is
counted instead (torch's FLOP counter: the convolutions and matrix products of its backbone and its
expert, a deterministic function of shapes and fitted sizes) and turned into time by this machine's speed,
measured once per machine and thread count and cached in the cache root (`machine-speed.json`).

Speeds are per kind of work, since a FLOP costs differently in each: the convolutions of each CNN
backbone (depthwise layers run far below the matrix units); dense matrix work (the ViT, the
nearest-neighbour searches, heads), measured on the ViT; and matrix-vector products, measured on
farthest-point sampling itself. The last kind is memory-bound: each greedy step of a coreset reads the
whole projected bank for 2 FLOPs a value, some 30 times slower per FLOP than a matrix product, and torch's
counter does not see it at all, so an uncounted coreset of a large fit set once took minutes that the
estimate called seconds. Work the counter still does not see (blurs, resizes, top-k, stitching) is left
out, so estimates are lower bounds; the measured wall time is reported beside them and decides nothing.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.common.local_files import cache_root, write_atomically
from pipeline.common.sampling import farthest_point_sampling
from pipeline.features.backbone import Backbones
from schemas.spec import CNN_BACKBONES

T = TypeVar("T")
DENSE = "dense"
STREAM = "stream"  # matrix-vector products: memory-bound
SPEED_FILE = "machine-speed.json"
_PROBE_SIDE, _PROBE_BATCH, _PROBE_REPEATS = 224, 4, 3
# farthest-point sampling over a bank far larger than any cache, as a coreset of a large fit set reads it
_STREAM_PROBE_ROWS, _STREAM_PROBE_DIM, _STREAM_PROBE_STEPS = 1 << 19, 64, 32


def _mv_flop(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix_shape[0] * matrix_shape[1]


def _cdist_flop(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    """torch.cdist as the matrix product it runs on for Euclidean distances (batch x N x M x D); larger
    inputs reach the dispatcher as _euclidean_dist, already flattened to N x D and M x D."""
    batch = 1
    for side in x1_shape[:-2]:
        batch *= side
    return 2 * batch * x1_shape[-2] * x2_shape[-2] * x1_shape[-1]


# Ops torch's counter leaves out that the experts spend real time in
_EXTRA_FLOPS = {torch.ops.aten.mv: _mv_flop, torch.ops.aten._cdist_forward: _cdist_flop,
                torch.ops.aten._euclidean_dist: _cdist_flop}


@dataclass(frozen=True)
class Work:
    """FLOPs of convolutions, of matrix-vector products (`stream`) and of dense matrix products
    (everything else the counter sees)."""

    conv: float = 0.0
    dense: float = 0.0
    stream: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.conv + other.conv, self.dense + other.dense, self.stream + other.stream)

    def scaled(self, factor: float) -> "Work":
        return Work(self.conv * factor, self.dense * factor, self.stream * factor)


class WorkLimitReached(RuntimeError):
    """Raised inside `counted` once the work done passes its limit; `work` is what was done by then."""

    def __init__(self, work: Work):
        super().__init__(f"work limit reached after {work.conv / 1e9:.0f} GFLOP of convolutions, "
                         f"{work.dense / 1e9:.0f} GFLOP of dense work and {work.stream / 1e9:.0f} GFLOP of "
                         "matrix-vector work")
        self.work = work


class _MeteredCounter(FlopCounterMode):
    """A FLOP counter that stops the work as soon as `over(work so far)` says so, so a fit that would
    pass the add budget ends there instead of running to its end (checked after every counted op)."""

    def __init__(self, over: Callable[[Work], bool]):
        super().__init__(display=False, custom_mapping=_EXTRA_FLOPS)
        self._over = over

    def _count_flops(self, func_packet, out, args, kwargs):
        result = super()._count_flops(func_packet, out, args, kwargs)
        if func_packet in self.flop_registry:
            work = _work_of(self.flop_counts)
            if self._over(work):
                raise WorkLimitReached(work)
        return result


def counted(fn: Callable[[], T], over: Callable[[Work], bool] | None = None) -> tuple[T, Work]:
    """fn()'s result and the work it did. With `over`, fn is stopped by WorkLimitReached once
    `over(work so far)` is true: the bound is on counted work, so where it stops does not move with load."""
    counter_mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) if over is None else _MeteredCounter(over)
    with counter_mode as counter:
        result = fn()
    return result, _work_of(counter.get_flop_counts())


def _work_of(flop_counts) -> Work:
    conv = dense = stream = 0.0
    for op, flops in flop_counts.get("Global", {}).items():
        if "convolution" in str(op):
            conv += flops
        elif op is torch.ops.aten.mv:
            stream += flops
        else:
            dense += flops
    return Work(conv, dense, stream)


@dataclass(frozen=True)
class MachineSpeed:
    """GFLOP/s this machine reaches per kind of work: each CNN backbone's convolutions, DENSE and STREAM."""

    gflops: dict[str, float]

    def seconds(self, work: Work, backbone: str) -> float:
        conv_rate = self.gflops[backbone] if backbone in CNN_BACKBONES else self.gflops[DENSE]
        return (work.conv / conv_rate + work.dense / self.gflops[DENSE] + work.stream / self.gflops[STREAM]) / 1e9

    @classmethod
    def measure(cls, backbones: Backbones) -> "MachineSpeed":
        """Best of a few timed passes of each backbone on a fixed batch (the fastest pass is the least
        disturbed by anything else running)."""
        images = [np.random.default_rng(i).random((3, _PROBE_SIDE, _PROBE_SIDE), dtype=np.float32)
                  for i in range(_PROBE_BATCH)]
        rates = {name: _rate(lambda b=backbones.for_spec(name): b.extract(images, keys=False)) for name in CNN_BACKBONES}
        rates[DENSE] = _rate(lambda: backbones.default.extract(images, keys=True, cnn=False))
        bank = torch.from_numpy(np.random.default_rng(0).random((_STREAM_PROBE_ROWS, _STREAM_PROBE_DIM), dtype=np.float32))
        rates[STREAM] = _rate(lambda: farthest_point_sampling(bank, _STREAM_PROBE_STEPS))
        return cls(rates)

    @classmethod
    def cached(cls, backbones: Backbones) -> "MachineSpeed":
        """This machine's speed at the current thread count: measured the first time, then read back, so
        every later add on this machine is costed the same whatever the load."""
        path = cache_root() / SPEED_FILE
        key = machine_key()
        known = _read(path)
        if set(known.get(key, ())) >= {*CNN_BACKBONES, DENSE, STREAM}:  # else measured before a kind was added
            return cls(known[key])
        speed = cls.measure(backbones)
        write_atomically(path, json.dumps({**_read(path), key: speed.gflops}, indent=2, sort_keys=True).encode())
        return speed


def machine_key() -> str:
    return f"{_cpu_model()}|{platform.machine()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def _read(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rate(run: Callable[[], object]) -> float:
    _, work = counted(run)  # also the untimed first pass: kernels are set up once per shape
    best = min(_timed(run) for _ in range(_PROBE_REPEATS))
    return (work.conv + work.dense + work.stream) / max(best, 1e-6) / 1e9


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


__all__ = ["DENSE", "STREAM", "MachineSpeed", "Work", "WorkLimitReached", "counted", "machine_key"]
