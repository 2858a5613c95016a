"""Control worker: operator commands -> train / remove / recalibrate / roll back one task -> store -> events.

Commands are carried out one at a time, in order (the control topic has one partition), each on a
thread of its own while the main loop keeps polling the (paused) partition: training takes minutes,
and a consumer that stops polling for that long loses its group membership (kafka-python can then
spin inside poll() for good; see workers/liveness.py). A command ends with a `finished` or `failed`
event that names its command id whenever the id can be read, even from a malformed command.

Exactly one final event per command id. A command's final event (`finished` or `failed`, with its dead
letter for a malformed one) and its control offset are one Kafka transaction, committed under the group
membership the command was polled in; `started` and `progress` events go in small transactions of their
own. A worker killed before that commit leaves nothing a read_committed reader sees, and the command is
redelivered. Idempotence: the store records which command produced each version, so a redelivered
command whose id the store already knows is answered `finished` with that version, not carried out again.

A command that runs past its timeout (ControlConfig.command_timeout_s, plus three times the add budget
for one that trains) is answered `failed` with its offset, and the worker then exits for its supervisor
to restart it: a Python thread cannot be stopped, and a hung command must neither block later commands
nor publish after its answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from pipeline.features.backbone import Backbones
from schemas.spec import InputSpec
from pipeline.core.store import KnowledgeStore, StoreError
from pipeline.core.training import train_task
from schemas.config import ControlConfig, ModelConfig, TopicsConfig, TrainingConfig
from schemas.messages import (
    AddCategory,
    ChooseExpert,
    ControlCommand,
    DeadLetter,
    DeadLetterReason,
    EventKind,
    RemoveCategory,
    RollbackCategory,
    SchemaError,
    SetThreshold,
    Record,
    TrainingEvent,
    command_fields_of,
    parse_control,
)
from workers.kafka_io import (make_consumer, make_transactional_producer, record_of, rewind_to_committed,
                              transaction_step_timeout_ms)
from workers.liveness import RESTARTS_ENV, PollWatchdog
from workers.metrics import ControlMetrics
from workers.security import TRANSACTIONAL_ID_PREFIXES
from workers.transactions import TransactionFailed, TransactionSlot

log = logging.getLogger(__name__)


_FINAL_KINDS = (EventKind.FINISHED, EventKind.FAILED)
_TRAINING_TIMEOUT_FACTOR = 3.0  # x the add budget: an add's wall time ran up to 2.3 x its counted budget
EXIT_FAULT = 70  # the exit code of an injected fault


class CommandRejected(Exception):
    """A well-formed command that cannot be carried out (unknown category, missing folder, ...)."""


class CommandTimedOut(RuntimeError):
    """A command ran past its timeout: it was answered `failed`; the worker stops for its supervisor."""


@dataclass
class _Running:
    """The command being carried out on its own thread, and what to commit once it is done."""

    partition: TopicPartition
    next_offset: int
    group: ConsumerGroupMetadata  # the membership it was polled in: its offset is committed under it
    thread: threading.Thread
    fields: dict  # what could be read of the command (command_id, action, category), for a timeout's answer
    timeout_s: float  # from its start (time.monotonic()); training raises it to its add budget's share
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    final: list[tuple[str, Record]] = field(default_factory=list)  # its final event (and dead letter)


class ControlWorker:
    def __init__(
        self,
        bootstrap: str,
        topics: TopicsConfig,
        config: ControlConfig,
        model: ModelConfig,
        training: TrainingConfig,
        backbones: Backbones,
        store: KnowledgeStore,
        metrics: ControlMetrics,
        worker_id: str,
        **client_options,
    ):
        self.topics = topics
        self.config = config
        self.model = model
        self.training = training
        self.backbones = backbones
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, config.group_id, [topics.control], topics, client_id=worker_id, max_poll_records=1,
            **client_options,
        )
        slot_id = TRANSACTIONAL_ID_PREFIXES["control"] + worker_id  # stable: a restart fences its predecessor
        self.slot = TransactionSlot(
            slot_id, lambda: make_transactional_producer(bootstrap, topics, slot_id, config.transaction_timeout_ms,
                                                         **client_options),
            step_timeout_s=transaction_step_timeout_ms(config.transaction_timeout_ms) / 1000,
            stuck_after_s=config.stuck_after_s)
        self.watchdog = PollWatchdog(metrics, config.stuck_after_s)
        self._running: _Running | None = None
        self._handlers: dict[type, Callable] = {
            AddCategory: self._add,
            RemoveCategory: self._remove,
            SetThreshold: self._set_threshold,
            ChooseExpert: self._choose_expert,
            RollbackCategory: self._rollback,
        }

    def run(self, stop: threading.Event) -> None:
        log.info("control worker %s consuming %s", self.worker_id, self.topics.control)
        self._refresh_gauges()
        self.watchdog.start()
        try:
            while not stop.is_set():
                polled = self.consumer.poll(timeout_ms=200)
                self.watchdog.beat()
                for records in polled.values():
                    for consumer_record in records:
                        self._take(consumer_record)
                self._finish_if_done()
                self._give_up_if_overdue()
        finally:
            # A command still running is not committed: it is redelivered (and recognised) on restart.
            self.watchdog.stop()
            self.consumer.close()
            self.slot.close()

    def _take(self, consumer_record) -> None:
        partition = TopicPartition(consumer_record.topic, consumer_record.partition)
        if self._running is not None:
            # Fetched again after a rebalance while one command runs: read it once the running one is done.
            self.consumer.seek(partition, consumer_record.offset)
            self.consumer.pause(partition)
            return
        self.consumer.pause(partition)
        running = _Running(partition, consumer_record.offset + 1, self.consumer.group_metadata(), threading.Thread(
            target=lambda: self._handle_then_signal(consumer_record), name="command", daemon=True),
            command_fields_of(consumer_record.value), self.config.command_timeout_s)
        self._running = running
        self.metrics.busy.set(1)
        running.thread.start()

    def _handle_then_signal(self, consumer_record) -> None:
        try:
            if self.config.fault_hang_category and self._running.fields.get("category") == self.config.fault_hang_category:
                time.sleep(3600)  # fault injection (tests): a command that hangs
            self.handle(consumer_record)
        finally:
            self._running.done.set()

    def _finish_if_done(self) -> None:
        running = self._running
        if running is None or not running.done.is_set():
            return
        self._running = None
        self.metrics.busy.set(0)
        self._commit_final(running)
        if running.partition in self.consumer.assignment():
            self.consumer.resume(running.partition)

    def _commit_final(self, running: _Running) -> None:
        """The command's final records and its offset, in one transaction under the membership it was
        polled in. A failure (membership lost meanwhile, broker away) leaves neither: the command comes
        again, and the store's record of its id answers it without redoing it."""
        offsets = {running.partition: OffsetAndMetadata(running.next_offset, "", -1)}
        try:
            self.slot.commit(running.final, offsets, running.group, before_commit=lambda: self._fault_exit(running))
        except TransactionFailed as exc:
            log.warning("final event and offset %d of a command were not committed (%s); the command will be "
                        "redelivered and recognised", running.next_offset, exc)
            rewind_to_committed(self.consumer, self.consumer.assignment() & {running.partition})

    def _fault_exit(self, running: _Running) -> None:
        """Fault injection (tests): the first process of a supervised worker dies with a command's final
        event sent in its transaction but not committed."""
        category = self.config.fault_exit_before_commit_category
        if category is not None and running.fields.get("category") == category \
                and os.environ.get(RESTARTS_ENV, "0") == "0":
            log.error("fault injection: exiting before the final commit of %s", running.fields.get("command_id"))
            os._exit(EXIT_FAULT)  # noqa: SLF001 - a kill, as far as the broker can tell

    def _give_up_if_overdue(self) -> None:
        """A command past its deadline is answered `failed` with its offset, then the worker stops."""
        running = self._running
        if running is None or running.done.is_set() or time.monotonic() - running.started < running.timeout_s:
            return
        fields = running.fields
        message = (f"{fields.get('action')} timed out after {running.timeout_s:.0f} s; the control worker "
                   "restarts, and later commands go on")
        log.error("command %s: %s", fields.get("command_id"), message)
        running.final = [(self.topics.events, TrainingEvent(
            command_id=fields.get("command_id"), action=fields.get("action"), category=fields.get("category"),
            kind=EventKind.FAILED, message=message).to_record())]
        self.metrics.commands.labels(str(fields.get("action") or "invalid"), "failed").inc()
        self._commit_final(running)
        raise CommandTimedOut(message)

    # ------------------------------------------------------------------------------- dispatch
    def handle(self, consumer_record) -> None:
        record = record_of(consumer_record)
        try:
            command = parse_control(record.value)
        except SchemaError as exc:
            self._bad_command(consumer_record, record, str(exc))
            return
        action = command.action
        try:
            if self._already_applied(command):
                return
            self._handlers[type(command)](command)
            self.metrics.commands.labels(action, "ok").inc()
        except (CommandRejected, StoreError, ValueError, OSError) as exc:
            self._event(command, EventKind.FAILED, f"{action} rejected: {exc}")
            self.metrics.commands.labels(action, "rejected").inc()
        except Exception as exc:  # training blew up: report it and keep serving commands
            log.exception("command %s failed", command.command_id)
            self._event(command, EventKind.FAILED, f"{action} failed: {type(exc).__name__}: {exc}")
            self.metrics.commands.labels(action, "failed").inc()
        self._refresh_gauges()

    def _already_applied(self, command: ControlCommand) -> bool:
        """A redelivered command (the worker died between carrying it out and committing) is answered,
        not redone: retraining would publish different blobs (the meta holds timings) under a new version."""
        version = self.store.applied(command.command_id)
        if version is None:
            return False
        self._event(command, EventKind.FINISHED, f"{command.action} {command.command_id} was already applied "
                    f"as store version {version}", store_version=version, details={"redelivered": True})
        self.metrics.commands.labels(command.action, "redelivered").inc()
        return True

    def _add(self, command: AddCategory) -> None:
        if command.category in self.store.manifest().tasks and not command.replace:
            raise CommandRejected(f"category {command.category!r} exists; send replace=true to retrain it")
        self._train(command, Path(command.train_dir), command.expert, command.false_alarm_rate, command.max_train_images,
                    command.frame_budget_ms)

    def _choose_expert(self, command: ChooseExpert) -> None:
        entry = self._entry(command.category)
        artifacts = self.store.load_task(entry)
        self._train(command, Path(artifacts.meta["train_dir"]), command.expert,
                    artifacts.calibration.false_alarm_rate, artifacts.meta.get("max_train_images"),
                    artifacts.meta.get("frame_budget_ms"))

    def _check_store_room(self, task_bytes: int, when: str) -> None:
        """Redis runs with maxmemory and noeviction: a task that does not fit is refused here, with its
        sizes, rather than failing in the middle of a publish (or evicting another task's blobs)."""
        memory = self.store.memory()
        if not memory.fits(task_bytes, self.config.store_fill_limit):
            raise CommandRejected(
                f"the store would not fit {when}: {memory.used_bytes} bytes used + {task_bytes} of the task > "
                f"{self.config.store_fill_limit:g} x maxmemory {memory.limit_bytes}; remove tasks or raise maxmemory")

    def _confined(self, train_dir: Path) -> Path:
        """The folder, links resolved, if it lies under the training root; else the add is refused. A task
        copies some of its images into the store and names its files in events: an add must not reach
        whatever else this worker can read. A relative path is refused too: it would resolve in this
        worker's directory, not the operator's (the CLI sends absolute ones)."""
        root = self.config.training_root
        if root is None:
            raise CommandRejected("this control worker has no training root (--training-root): adds are refused")
        if not train_dir.is_absolute():
            raise CommandRejected(f"train_dir {str(train_dir)!r} is relative; send an absolute path")
        resolved, root = train_dir.resolve(), root.resolve()
        if not resolved.is_relative_to(root):
            raise CommandRejected(f"train_dir {str(train_dir)!r} is outside the training root {str(root)!r}")
        if not resolved.is_dir():
            raise CommandRejected(f"train_dir {str(train_dir)!r} is not a readable folder")
        return resolved

    def _train(self, command: ControlCommand, train_dir: Path, expert: str | None, far: float, limit: int | None,
               frame_budget_ms: float | None = None) -> None:
        """Train and publish one task; `expert` None = automatic choice among all experts; `frame_budget_ms`
        None = the worker's default per-frame budget."""
        train_dir = self._confined(train_dir)
        self._check_store_room(0, "before training")
        how = expert or "an automatically chosen expert"
        self._event(command, EventKind.STARTED, f"training {command.category!r} with {how} from {train_dir}",
                    progress=0.0, details={"expert": expert or "auto"})
        started = time.perf_counter()
        training = self.training if frame_budget_ms is None else self.training.at_frame_budget(frame_budget_ms)
        self._running.timeout_s = self.config.command_timeout_s + _TRAINING_TIMEOUT_FACTOR * training.scaled_add_budget_s
        task = train_task(
            command.category, train_dir, expert, self.backbones, self.model, training, far, limit,
            on_progress=lambda fraction, message: self._event(command, EventKind.PROGRESS, message, progress=fraction),
        )
        self._check_store_room(sum(len(blob) for blob in task.blobs().values()), "for the trained task")
        version = self.store.publish(task, command_id=command.command_id)
        self._collect_garbage()
        seconds = time.perf_counter() - started
        self.metrics.training_seconds.labels(task.expert_name).observe(seconds)
        entry = self.store.manifest().tasks[command.category]
        self._event(
            command, EventKind.FINISHED, f"{command.category!r} published as store version {version}",
            progress=1.0, store_version=version,
            details={
                "expert": task.expert_name,
                "input_spec": task.input_spec.describe(),
                "expert_ms_per_frame": task.meta.get("expert_ms_per_frame"),
                "expert_choice": "; ".join(
                    f"{c.get('label', c['expert'])} @ {InputSpec(**c['spec']).describe()}: "
                    + (f"{c['score']:.4f}" if c["status"] == "ok" else c["status"])
                    for c in task.meta["expert_choice"]
                ),
                "training_seconds": round(seconds, 2),
                "threshold": task.calibration.threshold,
                "implied_false_alarm_rate": task.calibration.implied_false_alarm_rate,
                "stored_bytes": entry.size_bytes,
                "num_fit_images": task.meta["num_fit_images"],
                "num_calibration_images": task.meta["num_calibration_images"],
                "image_decision": task.meta["image_decision"],
                "frame_budget_ms": training.expert_budget_ms,
            },
        )

    def _remove(self, command: RemoveCategory) -> None:
        version = self.store.remove(command.category, command_id=command.command_id)
        self._event(command, EventKind.FINISHED, f"{command.category!r} removed", store_version=version)

    def _rollback(self, command: RollbackCategory) -> None:
        version = self.store.rollback(command.category, command.task_version, command_id=command.command_id)
        entry = self.store.manifest().tasks[command.category]
        self._event(command, EventKind.FINISHED,
                    f"{command.category!r} serves task version {command.task_version} again, as store version {version}",
                    store_version=version, details={"expert": entry.expert, "restored_from": command.task_version})

    def _collect_garbage(self) -> None:
        """Old manifests' unreferenced blobs go, under the retention rule (never what a reader may load)."""
        try:
            report = self.store.collect_garbage(self.config.keep_versions, self.config.gc_grace_s)
        except StoreError as exc:
            log.warning("store garbage collection skipped: %s", exc)
            return
        if report.blobs_deleted or report.manifests_deleted:
            log.info("store garbage collection: %s", report)

    def _set_threshold(self, command: SetThreshold) -> None:
        calibration = self.store.load_task(self._entry(command.category)).calibration
        if command.threshold is not None:
            calibration = calibration.with_threshold(command.threshold)
        else:
            calibration = calibration.with_false_alarm_rate(command.false_alarm_rate)
        version = self.store.set_calibration(command.category, calibration, command_id=command.command_id)
        self._event(
            command, EventKind.FINISHED, f"threshold of {command.category!r} set to {calibration.threshold:.5g}",
            store_version=version,
            details={"threshold": calibration.threshold, "implied_false_alarm_rate": calibration.implied_false_alarm_rate},
        )

    def _entry(self, category: str):
        entry = self.store.manifest().tasks.get(category)
        if entry is None:
            raise CommandRejected(f"unknown category {category!r}")
        return entry

    # ------------------------------------------------------------------------------- outputs
    def _event(self, command: ControlCommand, kind: EventKind, message: str, **fields) -> None:
        """A final event waits to be committed with the command's offset; others go at once, each in a
        transaction of its own (an operator follows progress)."""
        log.info("%s %s: %s", command.category, kind.value, message)
        event = TrainingEvent(command_id=command.command_id, action=command.action, category=command.category,
                              kind=kind, message=message, **fields)
        if kind in _FINAL_KINDS:
            self._running.final.append((self.topics.events, event.to_record()))
            return
        try:
            self.slot.commit([(self.topics.events, event.to_record())])
        except TransactionFailed as exc:  # progress is information: the command goes on
            log.warning("%s event not sent (%s)", kind.value, exc)

    def _bad_command(self, consumer_record, record, detail: str) -> None:
        """Dead-letter a malformed command; its failed event names whatever of it can be read (its id above
        all, so an operator waiting for it gets the answer instead of a timeout)."""
        log.warning("bad control command at offset %d: %s", consumer_record.offset, detail)
        self.metrics.commands.labels("invalid", "rejected").inc()
        fields = command_fields_of(record.value)
        event = TrainingEvent(command_id=fields.get("command_id"), action=fields.get("action"),
                              category=fields.get("category"), kind=EventKind.FAILED, message=detail)
        letter = DeadLetter.of(record, self.topics.max_message_bytes, worker_id=self.worker_id,
                               source_topic=consumer_record.topic, partition=consumer_record.partition,
                               offset=consumer_record.offset, reason=DeadLetterReason.BAD_COMMAND, detail=detail[:2000])
        self._running.final += [(self.topics.events, event.to_record()), (self.topics.dead_letter, letter.to_record())]

    def _refresh_gauges(self) -> None:
        try:
            sizes = self.store.task_sizes()
        except Exception:
            log.exception("store unreachable")
            return
        self.metrics.tasks_known.set(len(sizes))
        memory = self.store.memory()
        self.metrics.store_used_bytes.set(memory.used_bytes)
        self.metrics.store_limit_bytes.set(memory.limit_bytes or 0)
        self.metrics.task_bytes.clear()
        for category, size in sizes.items():
            self.metrics.task_bytes.labels(category).set(size)
