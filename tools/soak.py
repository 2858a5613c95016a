"""A randomized fault soak: the line under seeded faults, then every frame and command accounted for.

Its own local stack (free loopback ports) and real worker processes: a control worker and inference
workers, each under its supervisor as on a line. Cameras stream numbered frames of synthetic categories;
operators send threshold and add commands; a seeded nemesis meanwhile, at random moments,
- SIGKILLs an inference worker (its supervisor starts it again),
- SIGKILLs the control worker, while it trains when it can catch it so,
- SIGKILLs the broker or Redis and starts it again a few seconds later,
- pauses an inference worker (SIGSTOP) past its group session timeout, then resumes it (SIGCONT).

At the end every server and worker is up again and the streams are drained. Checked, by frame id and
command id, on what read_committed readers see: every frame the broker acknowledged has exactly one
result; every command the broker acknowledged has exactly one final event; the store holds at most one
version per command id (and the version the control worker named); every inference worker holds
partitions. The longest gap between consecutive results is reported with the faults just before it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.store import KnowledgeStore
from pipeline.data.datasets import SYNTHETIC_TEXTURES, labeled_test_images, write_synthetic_category
from schemas.config import StackConfig, TopicsConfig
from schemas.messages import AddCategory, EventKind, SetThreshold, TrainingEvent, control_to_json
from tools.client import parse_all, send_commands, wait_for_outcomes
from workers.kafka_io import make_producer, read_topic, send_record
from tools.processes import WorkerProcess, free_ports, spawn_worker, wait_for_store_version, wait_until
from tools.simulator import CameraPartitions, frame_of
from tools.stack import LocalStack

log = logging.getLogger(__name__)
FAULTS = ("kill_inference", "kill_control", "kill_broker", "kill_redis", "pause_inference")
_CAMERAS = 4
_FINAL = (EventKind.FINISHED, EventKind.FAILED)
_SESSION_TIMEOUT_S = 10.0  # kafka_io.GROUP_OPTIONS: a paused member is evicted after this
# About 22 s from one fault to the next with what each fault waits for itself: some 55 in 20 minutes
DEFAULT_FAULT_EVERY_S = (8.0, 20.0)
_CONTROL_BUSY_WAIT_S = 15.0  # how long a control kill waits to catch the worker training
_MAX_RESTARTS = 1000  # each worker is killed again and again: its supervisor must not give up


@dataclass(frozen=True)
class SoakOptions:
    minutes: float
    seed: int
    state_dir: Path
    inference_workers: int = 2
    rate_fps: float = 4.0
    fault_every_s: tuple[float, float] = DEFAULT_FAULT_EVERY_S  # the pause between two faults, drawn uniformly
    command_every_s: tuple[float, float] = (20.0, 45.0)
    drain_timeout_s: float = 600.0


@dataclass
class Fault:
    kind: str
    at_s: float  # seconds since the soak began
    detail: str = ""


@dataclass
class SoakReport:
    seed: int
    minutes: float
    faults: list[Fault] = field(default_factory=list)
    frames_acked: int = 0
    frames_unacked: int = 0  # the camera's send failed (broker away): the frame does not count
    results: int = 0
    duplicates: int = 0
    missing: list[str] = field(default_factory=list)
    commands_acked: int = 0
    commands_answered: int = 0
    commands_unanswered: list[str] = field(default_factory=list)
    commands_answered_twice: list[str] = field(default_factory=list)
    store_versions_per_command: dict[str, list[int]] = field(default_factory=dict)  # only ids with more than one
    store_disagrees: list[str] = field(default_factory=list)  # finished with a version the store does not name
    workers_without_partitions: list[str] = field(default_factory=list)
    longest_gap_s: float = 0.0
    faults_before_longest_gap: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.commands_unanswered or self.commands_answered_twice
                    or self.store_versions_per_command or self.store_disagrees or self.workers_without_partitions)

    def table(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        rows = [
            ("seed", self.seed), ("minutes", self.minutes),
            ("faults injected", f"{len(self.faults)} (" + ", ".join(f"{k} {kinds[k]}" for k in FAULTS) + ")"),
            ("frames acknowledged", self.frames_acked), ("frames refused to the camera", self.frames_unacked),
            ("results", self.results), ("duplicates", self.duplicates), ("missing", len(self.missing)),
            ("commands acknowledged", self.commands_acked), ("commands answered", self.commands_answered),
            ("commands unanswered", len(self.commands_unanswered)),
            ("commands answered twice", len(self.commands_answered_twice)),
            ("command ids with several store versions", len(self.store_versions_per_command)),
            ("workers without partitions", len(self.workers_without_partitions)),
            ("longest gap without results", f"{self.longest_gap_s:.1f} s after "
             + (", ".join(self.faults_before_longest_gap) or "no fault")),
            ("verdict", "PASS" if self.ok else "FAIL"),
        ]
        return "\n".join(["| check | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


class _Line:
    """The soak's stack, its data and its workers (each under its supervisor)."""

    def __init__(self, options: SoakOptions):
        kafka, controller, redis_port, prometheus = free_ports(4)
        self.options = options
        self.topics = TopicsConfig()
        self.stack = LocalStack(StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                                            prometheus_port=prometheus, state_dir=options.state_dir / "stack"),
                                self.topics)
        self.data = options.state_dir / "data"
        self.control: WorkerProcess | None = None
        self.inference: list[WorkerProcess] = []

    @property
    def bootstrap(self) -> str:
        return self.stack.config.bootstrap_servers

    @property
    def store(self) -> KnowledgeStore:
        return KnowledgeStore.from_url(self.stack.config.redis_url)

    def start(self) -> None:
        for texture in SYNTHETIC_TEXTURES:
            write_synthetic_category(self.data, texture, texture, n_train=16, n_test_good=4, n_test_defect=4, size=128)
        self.stack.down(wipe=True)
        self.stack.up()
        common = dict(bootstrap=self.bootstrap, redis_url=self.stack.config.redis_url,
                      log_dir=self.options.state_dir / "logs", threads=1)
        restarts = ("--max-restarts", str(_MAX_RESTARTS))
        self.control = spawn_worker("control", "soak-control", extra_args=("--training-root", str(self.data), *restarts),
                                    **common)
        self.inference = [spawn_worker("infer", f"soak-infer-{i}", extra_args=restarts, **common)
                          for i in range(self.options.inference_workers)]

    def stop(self) -> None:
        for worker in [w for w in (self.control, *self.inference) if w is not None]:
            worker.stop()
        self.stack.down()

    def restore(self) -> None:
        """Every server up and every worker's supervisor still there (after the last fault)."""
        self.stack.up()
        for worker in (self.control, *self.inference):
            if not worker.alive():
                raise RuntimeError(f"{worker.name}'s supervisor exited:\n{worker.log_tail()}")


class _Camera(threading.Thread):
    """Numbered frames of the synthetic categories at a fixed rate, four cameras; a frame counts once
    the broker acknowledged it."""

    def __init__(self, line: _Line, run_id: str, rate_fps: float, stop: threading.Event):
        super().__init__(name="camera", daemon=True)
        self.line, self.run_id, self.interval, self.stop_event = line, run_id, 1.0 / rate_fps, stop
        self.items = [item for texture in SYNTHETIC_TEXTURES for item in labeled_test_images(line.data, texture)]
        self.acked: list[str] = []
        self.unacked = 0

    def run(self) -> None:
        producer = make_producer(self.line.bootstrap, self.line.topics, client_id="soak-camera", max_block_ms=5000,
                                 delivery_timeout_ms=30_000)
        partition_of = CameraPartitions(self.line.topics.frame_partitions)
        pending: list[tuple[str, object]] = []
        number = 0
        try:
            while not self.stop_event.is_set():
                camera_id = f"soak-cam{number % _CAMERAS}"
                frame = frame_of(self.items[number % len(self.items)], camera_id, with_ground_truth=True)
                frame = frame.model_copy(update={"frame_id": f"{self.run_id}-{number}"})
                number += 1
                try:
                    pending.append((frame.frame_id, send_record(producer, self.line.topics.frames, frame.to_record(),
                                                                partition_of(camera_id))))
                except Exception:  # noqa: BLE001 - the broker is away: this frame is not sent
                    self.unacked += 1
                pending = self._settle(pending, wait=False)
                self.stop_event.wait(self.interval)
            producer.flush(timeout=60)
            self._settle(pending, wait=True)
        finally:
            producer.close(timeout=5)

    def _settle(self, pending: list, wait: bool) -> list:
        """Count the sends that ended; return those still in flight."""
        left = []
        for frame_id, future in pending:
            if not (wait or future.is_done):
                left.append((frame_id, future))
                continue
            try:
                future.get(timeout=60)
                self.acked.append(frame_id)
            except Exception:  # noqa: BLE001 - refused or timed out: not acknowledged, not counted
                self.unacked += 1
        return left


class _Operator(threading.Thread):
    """Threshold changes and adds (new categories, then retraining known ones) at random moments."""

    def __init__(self, line: _Line, rng: random.Random, every_s: tuple[float, float], stop: threading.Event):
        super().__init__(name="operator", daemon=True)
        self.line, self.rng, self.every_s, self.stop_event = line, rng, every_s, stop
        self.acked: list[str] = []

    def run(self) -> None:
        producer = make_producer(self.line.bootstrap, self.line.topics, client_id="soak-operator", max_block_ms=5000,
                                 delivery_timeout_ms=30_000)
        try:
            while not self.stop_event.wait(self.rng.uniform(*self.every_s)):
                command = self._next()
                try:
                    producer.send(self.line.topics.control, key=command.category.encode(),
                                  value=control_to_json(command)).get(timeout=60)
                    self.acked.append(command.command_id)
                except Exception:  # noqa: BLE001 - the broker is away: the operator would send it again later
                    log.info("command %s not acknowledged", command.command_id)
        finally:
            producer.close(timeout=5)

    def _next(self):
        texture = self.rng.choice(SYNTHETIC_TEXTURES)
        if self.rng.random() < 0.5:
            return SetThreshold(category=texture, false_alarm_rate=round(self.rng.uniform(0.01, 0.1), 3))
        return AddCategory(category=texture, train_dir=str(self.line.data / texture / "train" / "good"),
                           expert="patchcore", replace=True)


class _Nemesis(threading.Thread):
    """Seeded faults at random moments until stopped; each one recorded with its time."""

    def __init__(self, line: _Line, rng: random.Random, every_s: tuple[float, float], began: float,
                 stop: threading.Event):
        super().__init__(name="nemesis", daemon=True)
        self.line, self.rng, self.every_s, self.began, self.stop_event = line, rng, every_s, began, stop
        self.faults: list[Fault] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.wait(self.rng.uniform(*self.every_s)):
                kind = self.rng.choice(FAULTS)
                detail = getattr(self, f"_{kind}")()
                self.faults.append(Fault(kind, time.monotonic() - self.began, detail))
                log.info("fault %d: %s %s", len(self.faults), kind, detail)
        except BaseException as error:  # noqa: BLE001 - reported by the soak, which then fails
            self.error = error

    def _kill_inference(self) -> str:
        worker = self.rng.choice(self.line.inference)
        return f"{worker.name} {_kill_child(worker)}"

    def _kill_control(self) -> str:
        # mid-training when an add runs soon
        training = _wait_for(lambda: self.line.control.metric("inspection_control_busy") == 1, _CONTROL_BUSY_WAIT_S,
                             self.stop_event)
        return f"{_kill_child(self.line.control)}{' while busy' if training else ''}"

    def _kill_broker(self) -> str:
        return self._restart_server("kafka")

    def _kill_redis(self) -> str:
        return self._restart_server("redis")

    def _restart_server(self, name: str) -> str:
        self.line.stack.kill(name)
        down_s = self.rng.uniform(2.0, 8.0)
        time.sleep(down_s)
        self.line.stack.up()
        return f"down {down_s:.1f} s"

    def _pause_inference(self) -> str:
        worker = self.rng.choice(self.line.inference)
        child = worker.child_pid()
        if child is None:
            return f"{worker.name} not running (restarting)"
        paused_s = self.rng.uniform(_SESSION_TIMEOUT_S + 2, _SESSION_TIMEOUT_S + 10)
        _signal(child, signal.SIGSTOP)
        time.sleep(paused_s)
        _signal(child, signal.SIGCONT)
        return f"{worker.name} paused {paused_s:.1f} s"


def run_soak(options: SoakOptions, on_line: Callable[[str], None] = print) -> SoakReport:
    """The soak; its report says whether every acknowledged frame and command was answered exactly once."""
    shutil.rmtree(options.state_dir, ignore_errors=True)
    line = _Line(options)
    rng = random.Random(options.seed)
    report = SoakReport(options.seed, options.minutes)
    try:
        on_line(f"soak: starting a stack and workers in {options.state_dir}")
        line.start()
        first = AddCategory(category=SYNTHETIC_TEXTURES[0], expert="patchcore",
                            train_dir=str(line.data / SYNTHETIC_TEXTURES[0] / "train" / "good"))
        version = _send_and_wait(line, first)
        wait_for_store_version(line.inference, version, timeout_s=300)
        stop = threading.Event()
        began, began_wall = time.monotonic(), time.time()
        run_id = f"soak{options.seed}-{int(time.time())}"
        camera = _Camera(line, run_id, options.rate_fps, stop)
        operator = _Operator(line, random.Random(rng.random()), options.command_every_s, stop)
        nemesis = _Nemesis(line, random.Random(rng.random()), options.fault_every_s, began, stop)
        for thread in (camera, operator, nemesis):
            thread.start()
        on_line(f"soak: streaming and injecting faults for {options.minutes:g} min (seed {options.seed})")
        stop.wait(options.minutes * 60)
        stop.set()
        for thread in (nemesis, operator, camera):
            thread.join()
        if nemesis.error is not None:
            raise RuntimeError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error
        line.restore()
        on_line("soak: faults over; draining")
        report.faults = nemesis.faults
        report.frames_acked, report.frames_unacked = len(camera.acked), camera.unacked
        report.commands_acked = len(operator.acked) + 1
        _check_results(line, camera.acked, options.drain_timeout_s, nemesis.faults, began_wall, report)
        _check_commands(line, [first.command_id, *operator.acked], options.drain_timeout_s, report)
        _check_partitions(line, report)
        return report
    finally:
        line.stop()


def _send_and_wait(line: _Line, command) -> int:
    [command_id] = send_commands(line.bootstrap, line.topics, [command])
    event = wait_for_outcomes(line.bootstrap, line.topics, [command_id], 600)[command_id]
    if event.kind != EventKind.FINISHED:
        raise RuntimeError(f"{command.action} {command.category} failed: {event.message}")
    return event.store_version


def _check_results(line: _Line, acked: list[str], timeout_s: float, faults: list[Fault], began_wall: float,
                   report: SoakReport) -> None:
    keys = {frame_id.encode() for frame_id in acked}
    records = read_topic(line.bootstrap, line.topics.results, line.topics, timeout_s,
                         until=lambda rs: keys <= {r.key for r in rs})
    mine = [r for r in records if r.key in keys]
    counts = Counter(r.key for r in mine)
    report.results = len(counts)
    report.duplicates = sum(n - 1 for n in counts.values())
    report.missing = sorted(k.decode() for k in keys - set(counts))
    stamps = sorted(r.timestamp / 1000 for r in mine)
    gaps = [(later - earlier, earlier) for earlier, later in zip(stamps, stamps[1:])]
    if gaps:
        report.longest_gap_s, gap_start = max(gaps)
        start_s = gap_start - began_wall  # the faults of the minute before the gap began, and during it
        report.faults_before_longest_gap = [f"{f.kind} at {f.at_s:.0f} s ({f.detail})" for f in faults
                                            if start_s - 60 <= f.at_s <= start_s + report.longest_gap_s]


def _check_commands(line: _Line, command_ids: list[str], timeout_s: float, report: SoakReport) -> None:
    wanted = set(command_ids)

    def finals(records) -> list[TrainingEvent]:
        return [e for e in parse_all(TrainingEvent, records) if e.command_id in wanted and e.kind in _FINAL]

    records = read_topic(line.bootstrap, line.topics.events, line.topics, timeout_s,
                         until=lambda rs: {e.command_id for e in finals(rs)} >= wanted)
    answers = Counter(e.command_id for e in finals(records))
    report.commands_answered = len(answers)
    report.commands_unanswered = sorted(wanted - set(answers))
    report.commands_answered_twice = sorted(c for c, n in answers.items() if n > 1)
    store = line.store
    versions = store.versions_by_command()
    report.store_versions_per_command = {c: v for c, v in versions.items() if c in wanted and len(v) > 1}
    for event in finals(records):
        if event.kind == EventKind.FINISHED and store.applied(event.command_id) != event.store_version:
            report.store_disagrees.append(event.command_id)


def _check_partitions(line: _Line, report: SoakReport, timeout_s: float = 90.0) -> None:
    """Every inference worker holds partitions once the group has settled."""

    def holders() -> list[str]:
        return [w.name for w in line.inference if not any(labels.get("partition") is not None
                                                          for labels, _ in w.samples("inspection_consumer_lag"))]

    try:
        wait_until(lambda: not holders(), timeout_s, what="every inference worker to hold partitions")
    except TimeoutError:
        pass
    report.workers_without_partitions = holders()


def _kill_child(worker: WorkerProcess) -> str:
    child = worker.child_pid()
    if child is None:
        return "not running (restarting)"
    _signal(child, signal.SIGKILL)
    return f"pid {child} killed"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_for(condition: Callable[[], bool], timeout_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if condition():
            return True
        time.sleep(0.5)
    return False


def write_report(report: SoakReport, path: Path) -> None:
    path.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))


__all__ = ["DEFAULT_FAULT_EVERY_S", "FAULTS", "SoakOptions", "SoakReport", "run_soak", "write_report"]
