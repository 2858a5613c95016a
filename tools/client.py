"""Operator-side helpers: send control commands, wait for their outcome, collect results by frame id."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ValidationError

from schemas.config import TopicsConfig
from schemas.messages import (
    CONTROL_ADAPTER,
    ControlCommand,
    DeadLetter,
    EventKind,
    InspectionResult,
    TrainingEvent,
    control_to_json,
)
from kafka import TopicPartition

from workers.kafka_io import make_consumer, make_producer, read_topic

_FINAL = {EventKind.FINISHED, EventKind.FAILED}
log = logging.getLogger(__name__)


def parse_all(model: type[BaseModel], records) -> list:
    """Records that parse as `model`; anything else on the topic is skipped (and logged), not fatal."""
    parsed = []
    for record in records:
        try:
            parsed.append(model.model_validate_json(record.value or b""))
        except ValidationError:
            log.debug("skipping a record at %s:%d@%d that is no %s", record.topic, record.partition,
                      record.offset, model.__name__)
    return parsed


def send_commands(bootstrap: str, topics: TopicsConfig, commands: Iterable[ControlCommand]) -> list[str]:
    """Publish commands in order (one partition: handled in order); returns their command ids."""
    producer = make_producer(bootstrap, topics, client_id="inspection-operator")
    try:
        ids = []
        for command in commands:
            CONTROL_ADAPTER.validate_python(command)
            producer.send(topics.control, key=command.category.encode(), value=control_to_json(command)).get(timeout=30)
            ids.append(command.command_id)
        return ids
    finally:
        producer.close()


def read_events(bootstrap: str, topics: TopicsConfig, timeout_s: float, until=None) -> list[TrainingEvent]:
    def parsed(records) -> list[TrainingEvent]:
        return parse_all(TrainingEvent, records)

    stop = (lambda records: until(parsed(records))) if until else None
    return parsed(read_topic(bootstrap, topics.events, topics, timeout_s, stop))


def wait_for_outcomes(bootstrap: str, topics: TopicsConfig, command_ids: list[str], timeout_s: float,
                      on_event: Callable[[TrainingEvent], None] | None = None) -> dict[str, TrainingEvent]:
    """The final event (finished or failed) of each command; raises TimeoutError if one never comes.
    `on_event` sees each event of these commands once, as it arrives (progress bars)."""
    wanted = set(command_ids)
    seen: set[str] = set()

    def final(events: list[TrainingEvent]) -> dict[str, TrainingEvent]:
        if on_event is not None:
            for event in events:
                if event.command_id in wanted and event.event_id not in seen:
                    seen.add(event.event_id)
                    on_event(event)
        return {e.command_id: e for e in events if e.command_id in wanted and e.kind in _FINAL}

    outcomes = final(read_events(bootstrap, topics, timeout_s, until=lambda events: len(final(events)) == len(wanted)))
    missing = wanted - set(outcomes)
    if missing:
        raise TimeoutError(f"no outcome after {timeout_s:.0f}s for commands {sorted(missing)}")
    return outcomes


def collect_results(
    bootstrap: str, topics: TopicsConfig, frame_ids: Iterable[str], timeout_s: float
) -> tuple[dict[str, InspectionResult], int]:
    """First result per frame id (duplicates from redelivery are counted, not double-counted)."""
    wanted = set(frame_ids)

    def seen(records) -> set[bytes]:
        return {r.key for r in records}

    keys = {f.encode() for f in wanted}
    records = read_topic(bootstrap, topics.results, topics, timeout_s, until=lambda rs: keys <= seen(rs))
    results: dict[str, InspectionResult] = {}
    duplicates = 0
    for record in (r for r in records if r.key in keys):
        frame_id = record.key.decode()
        if frame_id in results:
            duplicates += 1
            continue
        results[frame_id] = InspectionResult.model_validate_json(record.value)
    return results, duplicates


def read_dead_letters(bootstrap: str, topics: TopicsConfig, timeout_s: float, until=None) -> list[DeadLetter]:
    def parsed(records) -> list[DeadLetter]:
        return parse_all(DeadLetter, records)

    stop = (lambda records: until(parsed(records))) if until else None
    return parsed(read_topic(bootstrap, topics.dead_letter, topics, timeout_s, stop))


def seconds_to_next_result(bootstrap: str, topics: TopicsConfig, timeout_s: float) -> float:
    """Seconds from now until the next result is committed (read_committed, from the current end)."""
    started = time.monotonic()
    consumer = make_consumer(bootstrap, None, [], topics, client_id="inspection-resume-timer")
    try:
        partitions = [TopicPartition(topics.results, p) for p in range(topics.result_partitions)]
        consumer.assign(partitions)
        consumer.seek_to_end(*partitions)
        for partition in partitions:
            consumer.position(partition)  # resolve "end" now, not at the first fetch
        while time.monotonic() - started < timeout_s:
            if any(consumer.poll(timeout_ms=100).values()):
                return time.monotonic() - started
    finally:
        consumer.close()
    raise TimeoutError(f"no result committed within {timeout_s:.0f}s")
