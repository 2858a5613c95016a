"""Control worker: operator commands -> train / remove / recalibrate one task -> store -> events.

Commands are handled one at a time, in order (the control topic has one partition). Each ends with a
`finished` or `failed` event that names the command; a malformed command is also dead-lettered. The
offset is committed after the command is handled, so a crash mid-training retrains on restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

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
    SchemaError,
    SetThreshold,
    TrainingEvent,
    parse_control,
)
from workers.kafka_io import make_consumer, make_producer, record_of, send_record
from workers.metrics import ControlMetrics

log = logging.getLogger(__name__)
# Training a task can take many minutes; the group must not evict the worker meanwhile.
_MAX_POLL_INTERVAL_MS = 3 * 60 * 60 * 1000


class CommandRejected(Exception):
    """A well-formed command that cannot be carried out (unknown category, missing folder, ...)."""


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
    ):
        self.topics = topics
        self.model = model
        self.training = training
        self.backbones = backbones
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, config.group_id, [topics.control], topics, client_id=worker_id,
            max_poll_records=1, max_poll_interval_ms=_MAX_POLL_INTERVAL_MS,
        )
        self.producer: KafkaProducer = make_producer(bootstrap, topics, client_id=worker_id)
        self._handlers: dict[type, Callable] = {
            AddCategory: self._add,
            RemoveCategory: self._remove,
            SetThreshold: self._set_threshold,
            ChooseExpert: self._choose_expert,
        }

    def run(self, stop: threading.Event) -> None:
        log.info("control worker %s consuming %s", self.worker_id, self.topics.control)
        self._refresh_gauges()
        try:
            while not stop.is_set():
                for records in self.consumer.poll(timeout_ms=200).values():
                    for consumer_record in records:
                        self.handle(consumer_record)
                        self.consumer.commit()
        finally:
            self.consumer.close()
            self.producer.close()

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

    def _add(self, command: AddCategory) -> None:
        if command.category in self.store.manifest().tasks and not command.replace:
            raise CommandRejected(f"category {command.category!r} exists; send replace=true to retrain it")
        self._train(command, Path(command.train_dir), command.expert, command.false_alarm_rate, command.max_train_images)

    def _choose_expert(self, command: ChooseExpert) -> None:
        entry = self._entry(command.category)
        artifacts = self.store.load_task(entry)
        self._train(command, Path(artifacts.meta["train_dir"]), command.expert,
                    artifacts.calibration.false_alarm_rate, artifacts.meta.get("max_train_images"))

    def _train(self, command: ControlCommand, train_dir: Path, expert: str | None, far: float, limit: int | None) -> None:
        """Train and publish one task; `expert` None = automatic choice among all experts."""
        if not train_dir.is_dir():
            raise CommandRejected(f"train_dir {str(train_dir)!r} is not a readable folder")
        how = expert or "an automatically chosen expert"
        self._event(command, EventKind.STARTED, f"training {command.category!r} with {how} from {train_dir}",
                    progress=0.0, details={"expert": expert or "auto"})
        started = time.perf_counter()
        task = train_task(
            command.category, train_dir, expert, self.backbones, self.model, self.training, far, limit,
            on_progress=lambda fraction, message: self._event(command, EventKind.PROGRESS, message, progress=fraction),
        )
        version = self.store.publish(task)
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
                    f"{c['expert']} @ {InputSpec(**c['spec']).describe()}: "
                    + (f"{c['score']:.4f}" if c["status"] == "ok" else c["status"])
                    for c in task.meta["expert_choice"]
                ),
                "training_seconds": round(seconds, 2),
                "threshold": task.calibration.threshold,
                "implied_false_alarm_rate": task.calibration.implied_false_alarm_rate,
                "stored_bytes": entry.size_bytes,
                "num_fit_images": task.meta["num_fit_images"],
                "num_calibration_images": task.meta["num_calibration_images"],
            },
        )

    def _remove(self, command: RemoveCategory) -> None:
        version = self.store.remove(command.category)
        self._event(command, EventKind.FINISHED, f"{command.category!r} removed", store_version=version)

    def _set_threshold(self, command: SetThreshold) -> None:
        calibration = self.store.load_task(self._entry(command.category)).calibration
        if command.threshold is not None:
            calibration = calibration.with_threshold(command.threshold)
        else:
            calibration = calibration.with_false_alarm_rate(command.false_alarm_rate)
        version = self.store.set_calibration(command.category, calibration)
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
        log.info("%s %s: %s", command.category, kind.value, message)
        event = TrainingEvent(command_id=command.command_id, action=command.action, category=command.category,
                              kind=kind, message=message, **fields)
        send_record(self.producer, self.topics.events, event.to_record())
        self.producer.flush()

    def _bad_command(self, consumer_record, record, detail: str) -> None:
        log.warning("bad control command at offset %d: %s", consumer_record.offset, detail)
        self.metrics.commands.labels("invalid", "rejected").inc()
        event = TrainingEvent(command_id=None, action=None, category=None, kind=EventKind.FAILED, message=detail)
        letter = DeadLetter(
            worker_id=self.worker_id, source_topic=consumer_record.topic, partition=consumer_record.partition,
            offset=consumer_record.offset, reason=DeadLetterReason.BAD_COMMAND, detail=detail,
            key=record.key, value=record.value, headers=record.headers,
        )
        send_record(self.producer, self.topics.events, event.to_record())
        send_record(self.producer, self.topics.dead_letter, letter.to_record())
        self.producer.flush()

    def _refresh_gauges(self) -> None:
        try:
            sizes = self.store.task_sizes()
        except Exception:
            log.exception("store unreachable")
            return
        self.metrics.tasks_known.set(len(sizes))
        self.metrics.task_bytes.clear()
        for category, size in sizes.items():
            self.metrics.task_bytes.labels(category).set(size)
