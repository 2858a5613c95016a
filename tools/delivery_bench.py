"""Delivery benchmark: what exactly-once costs, and how fast results come back after faults.

On a stack of its own (free loopback ports, a temporary folder): one synthetic task, then for each
delivery mode two inference workers (real processes) and
  - throughput: `frames` frames from 4 cameras published at once; frames/s from the first send to the
    last result committed;
  - worker SIGKILL mid-stream: seconds from the kill to the next committed result a read_committed
    reader sees (a killed transaction holds readers back until the broker aborts it), and to the last
    frame's result (its partitions move to the surviving worker after the session timeout);
  - broker SIGKILL + restart mid-stream: seconds from the broker being ready again to the next
    committed result;
  and, for every run, missing and duplicate results counted by frame id.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.data.datasets import labeled_test_images, write_synthetic_category
from schemas.config import StackConfig, TopicsConfig
from schemas.messages import AddCategory, Frame, InspectionResult
from tools.client import collect_results, seconds_to_next_result, send_commands, wait_for_outcomes
from workers.kafka_io import make_producer, send_record
from tools.processes import WorkerProcess, free_port, spawn_worker, wait_for_store_version, wait_until
from tools.simulator import CameraPartitions, frame_of
from tools.stack import LocalStack

log = logging.getLogger(__name__)
MODES = ("exactly_once", "at_least_once")
CAMERAS = 4


@dataclass(frozen=True)
class DeliveryRow:
    delivery: str
    scenario: str
    frames: int
    missing: int
    duplicates: int
    frames_per_second: float | None = None
    seconds_to_next_result: float | None = None
    seconds_to_all_results: float | None = None


def run_delivery_benchmark(frames: int = 160, rate_fps: float = 6.0) -> list[DeliveryRow]:
    with bench_line() as bench:
        return _scenarios(bench, frames, rate_fps)


@contextmanager
def bench_line() -> Iterator["BenchLine"]:
    """A stack of its own (free loopback ports, a temporary folder) with a control worker; everything is
    stopped and removed afterwards, also when the body fails."""
    with tempfile.TemporaryDirectory(prefix="bench-line-") as folder:
        state = Path(folder)
        kafka, controller, redis_port, prometheus = (free_port() for _ in range(4))
        stack = LocalStack(StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                                       prometheus_port=prometheus, state_dir=state / "stack"), TopicsConfig())
        stack.up()
        try:
            bench = BenchLine(stack, state)
            try:
                yield bench
            finally:  # a failed run must not leave worker processes behind
                bench.stop_all()
        finally:
            stack.down()


def _scenarios(bench: "BenchLine", frames: int, rate_fps: float) -> list[DeliveryRow]:
    bench.add_task()
    rows = []
    for mode in MODES:
        workers = bench.start_inference(mode)
        rows.append(bench.throughput(mode, frames))
        # Both fault runs use the same two workers' slots; the killed one is not replaced.
        fault_frames = max(frames // 2, int(rate_fps * 30))  # long enough to straddle each fault
        rows.append(bench.worker_kill(mode, workers[0], fault_frames, rate_fps))
        rows.append(bench.broker_restart(mode, fault_frames, rate_fps))
        bench.stop_inference()
    return rows


class BenchLine:
    """A stack with a control worker, one synthetic task and inference workers in a chosen delivery mode."""

    def __init__(self, stack: LocalStack, state: Path):
        self.stack = stack
        self.topics = stack.topics
        self.bootstrap = stack.config.bootstrap_servers
        self.data = state / "data"
        self.logs = state / "logs"
        self.control = spawn_worker("control", "bench-control", self.bootstrap, stack.config.redis_url, self.logs, threads=1,
                                    extra_args=("--training-root", str(self.data)))
        self.inference: list[WorkerProcess] = []
        self.store_version = 0
        self._runs = 0

    def add_task(self) -> None:
        write_synthetic_category(self.data, "brick", "brick", n_train=24, n_test_good=8, n_test_defect=8, size=192)
        command = AddCategory(category="brick", train_dir=str(self.data / "brick" / "train" / "good"), expert="patchcore")
        outcome = wait_for_outcomes(self.bootstrap, self.topics, send_commands(self.bootstrap, self.topics, [command]),
                                    600)[command.command_id]
        if outcome.kind.value != "finished":
            raise RuntimeError(f"training the benchmark task failed: {outcome.message}")
        self.store_version = outcome.store_version

    def start_inference(self, mode: str, count: int = 2, extra_args: tuple[str, ...] = ()) -> list[WorkerProcess]:
        self.inference = [
            spawn_worker("infer", f"bench-{mode}-{i}", self.bootstrap, self.stack.config.redis_url, self.logs, threads=1,
                         extra_args=("--delivery", mode, "--max-wait-ms", "20", *extra_args))
            for i in range(count)
        ]
        wait_for_store_version(self.inference, self.store_version, timeout_s=300)
        wait_until(lambda: all((w.metric("inspection_consumer_lag") is not None) for w in self.inference), 120,
                   what="both workers assigned")
        self.throughput(mode, 8, warm_up=True)  # models loaded, first batches compiled
        return self.inference

    def stop_inference(self) -> None:
        for worker in self.inference:
            worker.stop()
        self.inference = []

    def stop_all(self) -> None:
        self.stop_inference()
        self.control.stop()

    # ------------------------------------------------------------------------------ scenarios
    def throughput(self, mode: str, count: int, warm_up: bool = False) -> DeliveryRow:
        results, duplicates, seconds = self.stream(count)
        return DeliveryRow(mode, "warm-up" if warm_up else "throughput", count, count - len(results), duplicates,
                           frames_per_second=len(results) / seconds)

    def stream(self, count: int) -> tuple[dict[str, InspectionResult], int, float]:
        """`count` frames published at once: their first results, duplicates, and seconds from the first
        send to the last result."""
        frames = self._frames(count)
        started = time.monotonic()
        self._publish(frames, rate_fps=0)
        results, duplicates = collect_results(self.bootstrap, self.topics, [f.frame_id for f in frames], 900)
        return results, duplicates, time.monotonic() - started

    def worker_kill(self, mode: str, victim: WorkerProcess, count: int, rate_fps: float) -> DeliveryRow:
        frames = self._frames(count)
        publisher = self._publish_in_background(frames, rate_fps)
        wait_until(lambda: (victim.metric("inspection_results_out_total") or 0) >= 3, 120, what="results before the kill")
        victim.kill()
        killed_at = time.monotonic()
        to_next = seconds_to_next_result(self.bootstrap, self.topics, 120)
        publisher.join()
        results, duplicates = collect_results(self.bootstrap, self.topics, [f.frame_id for f in frames], 600)
        self.inference.remove(victim)
        return DeliveryRow(mode, "worker SIGKILL", count, count - len(results), duplicates,
                           seconds_to_next_result=to_next, seconds_to_all_results=time.monotonic() - killed_at)

    def broker_restart(self, mode: str, count: int, rate_fps: float) -> DeliveryRow:
        frames = self._frames(count)
        worker = self.inference[0]
        before = worker.metric("inspection_results_out_total") or 0
        publisher = self._publish_in_background(frames, rate_fps)
        wait_until(lambda: (worker.metric("inspection_results_out_total") or 0) >= before + 3, 120,
                   what="results before the broker goes down")
        self.stack.kill("kafka")
        time.sleep(3)
        self.stack.up()
        ready_at = time.monotonic()
        to_next = seconds_to_next_result(self.bootstrap, self.topics, 120)
        publisher.join()
        results, duplicates = collect_results(self.bootstrap, self.topics, [f.frame_id for f in frames], 600)
        return DeliveryRow(mode, "broker SIGKILL + restart", count, count - len(results), duplicates,
                           seconds_to_next_result=to_next, seconds_to_all_results=time.monotonic() - ready_at)

    # ------------------------------------------------------------------------------ frames
    def _frames(self, count: int) -> list[Frame]:
        self._runs += 1
        items = labeled_test_images(self.data, "brick")
        base = [frame_of(item, "bench", with_ground_truth=True) for item in items]
        return [base[i % len(base)].model_copy(update={"frame_id": f"run{self._runs}-{i}", "camera_id": f"cam-{i % CAMERAS}"})
                for i in range(count)]

    def _publish(self, frames: list[Frame], rate_fps: float) -> None:
        producer = make_producer(self.bootstrap, self.topics, client_id="bench-cameras")
        partition_of = CameraPartitions(self.topics.frame_partitions)
        try:
            for frame in frames:
                send_record(producer, self.topics.frames, frame.to_record(), partition_of(frame.camera_id))
                if rate_fps > 0:
                    time.sleep(1 / rate_fps)
            producer.flush()
        finally:
            producer.close()

    def _publish_in_background(self, frames: list[Frame], rate_fps: float) -> threading.Thread:
        thread = threading.Thread(target=self._publish, args=(frames, rate_fps), daemon=True)
        thread.start()
        return thread


def markdown_table(rows: list[DeliveryRow]) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))

    fields = list(asdict(rows[0]))
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(cell(v) for v in asdict(row).values()) + " |" for row in rows]
    return "\n".join(lines)
