"""What a candidate costs on this machine, estimated from its work instead of timed while the task is added.

The automatic choice holds each candidate to the line's per-frame budget and the whole add to the add
budget. Wall time measured during the add moves with whatever else the machine is doing, so the same add
on the same data could choose differently on a quiet and on a loaded machine. Here a candidate's work is
counted instead (torch's FLOP counter: the convolutions and matrix products of its backbone and its
expert, a deterministic function of shapes and fitted sizes) and turned into time by this machine's speed,
measured once per machine and thread count and cached in the cache root (`machine-speed.json`).

Speeds are per kind of work, since a FLOP costs differently in each: the convolutions of each CNN
backbone (depthwise layers run far below the matrix units), and dense matrix work (the ViT, the
nearest-neighbour searches, heads), measured on the ViT. Work the counter does not see (blurs, resizes,
top-k, stitching) is left out, so estimates are lower bounds; the measured wall time is reported beside
them and decides nothing.
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
from pipeline.features.backbone import Backbones
from schemas.spec import CNN_BACKBONES

T = TypeVar("T")
DENSE = "dense"
SPEED_FILE = "machine-speed.json"
_PROBE_SIDE, _PROBE_BATCH, _PROBE_REPEATS = 224, 4, 3


@dataclass(frozen=True)
class Work:
    """FLOPs of convolutions and of dense matrix products (everything else the counter sees)."""

    conv: float = 0.0
    dense: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.conv + other.conv, self.dense + other.dense)

    def scaled(self, factor: float) -> "Work":
        return Work(self.conv * factor, self.dense * factor)


class WorkLimitReached(RuntimeError):
    """Raised inside `counted` once the work done passes its limit; `work` is what was done by then."""

    def __init__(self, work: Work):
        super().__init__(f"work limit reached after {work.conv / 1e9:.0f} GFLOP of convolutions and "
                         f"{work.dense / 1e9:.0f} GFLOP of dense work")
        self.work = work


class _MeteredCounter(FlopCounterMode):
    """A FLOP counter that stops the work as soon as `over(work so far)` says so, so a fit that would
    pass the add budget ends there instead of running to its end (checked after every counted op)."""

    def __init__(self, over: Callable[[Work], bool]):
        super().__init__(display=False)
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
    with (FlopCounterMode(display=False) if over is None else _MeteredCounter(over)) as counter:
        result = fn()
    return result, _work_of(counter.get_flop_counts())


def _work_of(flop_counts) -> Work:
    conv = dense = 0.0
    for op, flops in flop_counts.get("Global", {}).items():
        if "convolution" in str(op):
            conv += flops
        else:
            dense += flops
    return Work(conv, dense)


@dataclass(frozen=True)
class MachineSpeed:
    """GFLOP/s this machine reaches per kind of work: each CNN backbone's convolutions, and DENSE."""

    gflops: dict[str, float]

    def seconds(self, work: Work, backbone: str) -> float:
        conv_rate = self.gflops[backbone] if backbone in CNN_BACKBONES else self.gflops[DENSE]
        return (work.conv / conv_rate + work.dense / self.gflops[DENSE]) / 1e9

    @classmethod
    def measure(cls, backbones: Backbones) -> "MachineSpeed":
        """Best of a few timed passes of each backbone on a fixed batch (the fastest pass is the least
        disturbed by anything else running)."""
        images = [np.random.default_rng(i).random((3, _PROBE_SIDE, _PROBE_SIDE), dtype=np.float32)
                  for i in range(_PROBE_BATCH)]
        rates = {name: _rate(lambda b=backbones.for_spec(name): b.extract(images, keys=False)) for name in CNN_BACKBONES}
        rates[DENSE] = _rate(lambda: backbones.default.extract(images, keys=True, cnn=False))
        return cls(rates)

    @classmethod
    def cached(cls, backbones: Backbones) -> "MachineSpeed":
        """This machine's speed at the current thread count: measured the first time, then read back, so
        every later add on this machine is costed the same whatever the load."""
        path = cache_root() / SPEED_FILE
        key = machine_key()
        known = _read(path)
        if key in known:
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
    return (work.conv + work.dense) / max(best, 1e-6) / 1e9


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


__all__ = ["DENSE", "MachineSpeed", "Work", "WorkLimitReached", "counted", "machine_key"]
