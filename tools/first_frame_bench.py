"""First-frame benchmark: does the first frame of a newly added task cost more than its tenth?

A task whose expert reads a backbone no earlier task used (PatchCore on EfficientNet-Lite2 where the
first task reads Lite0) is added to the store while an inference worker (a real process) serves the
first task. The worker prepares the new store version beside the stream, its backbones included, and
swaps it in ready; the task's frames then go one at a time (each waits for its result, batch size 1).
Reported per frame: the worker's processing latency, the sum of the result's decode, features, task_id,
expert and encode stages (what the worker spent on it, not the queueing around it).

On a stack of its own (free loopback ports, a temporary folder); both tasks are trained in this process
at a fixed input spec, then published to the store as the control worker would.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.store import KnowledgeStore
from pipeline.core.training import train_task
from pipeline.data.datasets import labeled_test_images, write_synthetic_category
from pipeline.features.backbone import Backbones
from schemas.config import ModelConfig, StackConfig, TopicsConfig, TrainingConfig
from schemas.messages import Frame, InspectionResult
from schemas.spec import InputSpec
from tools.client import collect_results
from tools.processes import WorkerProcess, free_ports, spawn_worker, wait_for_store_version
from tools.simulator import frame_of
from tools.stack import LocalStack
from workers.kafka_io import make_producer, send_record

log = logging.getLogger(__name__)
SIDE = 192  # synthetic frames are SIDE x SIDE; both specs letterbox them to it
FIRST_TASK = ("brick", "efficientnet_lite0")
NEW_TASK = ("gravel", "efficientnet_lite2")  # a backbone the first task never loaded
WARM_UP_FRAMES = 5


@dataclass(frozen=True)
class FrameLatency:
    index: int  # 1: the new task's first frame
    category: str | None
    latency_ms: float  # decode + features + task_id + expert + encode, in the worker


def run_first_frame_benchmark(frames: int = 10, threads: int = 1) -> list[FrameLatency]:
    with _stack() as (stack, folder):
        tasks = _trained_tasks(folder / "data")
        store = KnowledgeStore.from_url(stack.config.redis_url)
        first_version = store.publish(tasks[FIRST_TASK[0]])
        worker = spawn_worker("infer", "first-frame-bench", stack.config.bootstrap_servers, stack.config.redis_url,
                              folder / "logs", threads=threads, extra_args=("--max-batch-size", "1"))
        try:
            wait_for_store_version([worker], first_version, timeout_s=300)
            line = _Line(stack, folder / "data", worker)
            line.latencies(FIRST_TASK[0], WARM_UP_FRAMES)  # the worker's own first frames, on the first task
            wait_for_store_version([worker], store.publish(tasks[NEW_TASK[0]]), timeout_s=300)
            return line.latencies(NEW_TASK[0], frames)
        finally:
            worker.stop()


@contextmanager
def _stack() -> Iterator[tuple[LocalStack, Path]]:
    with tempfile.TemporaryDirectory(prefix="first-frame-bench-") as name:
        folder = Path(name)
        kafka, controller, redis_port, prometheus = free_ports(4)
        stack = LocalStack(StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                                       prometheus_port=prometheus, state_dir=folder / "stack"), TopicsConfig())
        stack.up()
        try:
            yield stack, folder
        finally:
            stack.down()


def _trained_tasks(data: Path) -> dict:
    """Both tasks, PatchCore at a fixed spec each: the backbone is the benchmark's point, not chosen."""
    backbones = Backbones.pretrained()
    tasks = {}
    for category, backbone in (FIRST_TASK, NEW_TASK):
        write_synthetic_category(data, category, category, n_train=24, n_test_good=12, n_test_defect=4, size=SIDE)
        spec = InputSpec(backbone=backbone, resize="letterbox", height=SIDE, width=SIDE)
        log.info("training %s with PatchCore at %s", category, spec.describe())
        tasks[category] = train_task(category, data / category / "train" / "good", "patchcore", backbones,
                                     ModelConfig(), TrainingConfig(), 0.01, spec=spec)
    return tasks


class _Line:
    """Frames of one camera, sent one at a time to the worker; each waits for its result."""

    def __init__(self, stack: LocalStack, data: Path, worker: WorkerProcess):
        self.bootstrap = stack.config.bootstrap_servers
        self.topics = stack.topics
        self.data = data
        self.worker = worker
        self.sent = 0

    def latencies(self, category: str, count: int) -> list[FrameLatency]:
        items = labeled_test_images(self.data, category)
        rows = []
        for index in range(1, count + 1):
            result = self._inspect(frame_of(items[(index - 1) % len(items)], "bench-cam", with_ground_truth=True))
            rows.append(FrameLatency(index, result.category, processing_ms(result)))
        return rows

    def _inspect(self, frame: Frame) -> InspectionResult:
        self.sent += 1
        frame = frame.model_copy(update={"frame_id": f"first-frame-{self.sent}"})
        producer = make_producer(self.bootstrap, self.topics, client_id="bench-camera")
        try:
            send_record(producer, self.topics.frames, frame.to_record())
            producer.flush()
        finally:
            producer.close()
        results, _ = collect_results(self.bootstrap, self.topics, [frame.frame_id], 300)
        if frame.frame_id not in results:
            raise RuntimeError(f"no result for {frame.frame_id}:\n{self.worker.log_tail()}")
        return results[frame.frame_id]


def processing_ms(result: InspectionResult) -> float:
    stages = result.latency
    return stages.decode_ms + stages.features_ms + stages.task_id_ms + stages.expert_ms + stages.encode_ms


def table(rows: list[FrameLatency]) -> str:
    """A markdown table of the rows, and the first frame's latency over the last one's."""
    lines = ["| frame | category | latency ms |", "|---|---|---|"]
    lines += [f"| {row.index} | {row.category} | {row.latency_ms:.1f} |" for row in rows]
    ratio = rows[0].latency_ms / rows[-1].latency_ms
    lines.append(f"\nfirst / frame {rows[-1].index}: {ratio:.2f} ({'within' if ratio <= 1.2 else 'over'} 1.2)")
    if len(rows) > 2:  # one frame against one frame is noisy on a shared machine: the others' median too
        later = statistics.median(row.latency_ms for row in rows[1:])
        lines.append(f"first / median of frames 2-{rows[-1].index}: {rows[0].latency_ms / later:.2f}")
    return "\n".join(lines)
