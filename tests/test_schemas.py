"""Wire contracts: frames in Kafka records, control commands, results and dead letters as JSON."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas.config import InferenceConfig, TopicsConfig
from schemas.messages import (
    FRAME_SCHEMA,
    AddCategory,
    Box,
    ChooseExpert,
    DeadLetter,
    DeadLetterReason,
    Decision,
    Frame,
    GroundTruth,
    InspectionResult,
    Record,
    RemoveCategory,
    RollbackCategory,
    SchemaError,
    SetThreshold,
    StageLatency,
    command_fields_of,
    control_to_json,
    frame_id_of,
    parse_control,
)

# Not valid UTF-8 anywhere, and containing NUL and high bytes: JSON must carry it as base64.
RAW = bytes(range(256)) + b"\xff\xfe\x00\x80"


def _frame(**overrides) -> Frame:
    fields = dict(
        camera_id="cam-7",
        frame_id="f-0001",
        captured_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        content_type="image/png",
        image=b"\x89PNG\r\n\x1a\n" + RAW,
        ground_truth=GroundTruth(category="brick", is_anomalous=True, defect="scratch", source="sim"),
    )
    fields.update(overrides)
    return Frame(**fields)


def _replace_header(record: Record, name: str, value: bytes | None) -> Record:
    """The record with header `name` set to `value` (removed when value is None)."""
    headers = [(k, v) for k, v in record.headers if k != name]
    if value is not None:
        headers.append((name, value))
    return record._replace(headers=headers)


# ------------------------------------------------------------------------------------------ frames
@pytest.mark.parametrize("with_truth", [True, False])
@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg"])
def test_frame_record_round_trip(with_truth: bool, content_type: str) -> None:
    frame = _frame(content_type=content_type, ground_truth=_frame().ground_truth if with_truth else None)
    record = frame.to_record()

    assert record.key == b"cam-7"
    assert record.value is frame.image or record.value == frame.image  # image bytes untouched, no base64
    headers = dict(record.headers)
    assert headers["schema"] == FRAME_SCHEMA.encode()
    assert ("ground_truth" in headers) is with_truth

    back = Frame.from_record(record)
    assert back == frame
    assert back.captured_at == frame.captured_at and back.captured_at.utcoffset() == timedelta(hours=2)
    assert back.image == frame.image
    assert back.ground_truth == frame.ground_truth
    assert frame_id_of(record) == "f-0001"


def test_frame_defaults_make_a_valid_record() -> None:
    frame = Frame(camera_id="c", content_type="image/jpeg", image=b"\xff\xd8\xff")
    assert frame.captured_at.tzinfo is not None and len(frame.frame_id) > 0
    assert Frame.from_record(frame.to_record()) == frame


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("schema", b"inspection.result", "not a frame"),
        ("schema", None, "not a frame"),
        ("schema_version", b"2", "schema_version"),
        ("schema_version", b"", "schema_version"),
        ("schema_version", None, "schema_version"),
        ("frame_id", None, "invalid frame"),
        ("captured_at", None, "invalid frame"),
        ("captured_at", b"yesterday", "invalid frame"),
        ("captured_at", b"2024-05-06T07:08:09", "invalid frame"),  # naive: no timezone
        ("content_type", None, "invalid frame"),
        ("content_type", b"image/gif", "invalid frame"),
        ("ground_truth", b"{not json", "invalid frame"),
        ("ground_truth", b'{"category": "x"}', "invalid frame"),
    ],
)
def test_frame_bad_headers_raise_schema_error(name: str, value: bytes | None, match: str) -> None:
    record = _replace_header(_frame().to_record(), name, value)
    with pytest.raises(SchemaError, match=match):
        Frame.from_record(record)


def test_frame_without_any_header_or_key() -> None:
    good = _frame().to_record()
    for record in (good._replace(headers=[]), good._replace(headers=None), Record(None, b"x", [])):
        with pytest.raises(SchemaError, match="not a frame"):
            Frame.from_record(record)
    with pytest.raises(SchemaError, match="invalid frame"):  # empty camera id (no key)
        Frame.from_record(good._replace(key=None))


@pytest.mark.parametrize("name", ["schema", "frame_id", "content_type"])
def test_non_utf8_header_raises_schema_error(name: str) -> None:
    record = _replace_header(_frame().to_record(), name, b"\xff\xfe\xfa")
    with pytest.raises(SchemaError, match="UTF-8"):
        Frame.from_record(record)
    assert frame_id_of(record) is None  # best effort: any undecodable header makes the id unknown


def test_non_utf8_key_raises_schema_error() -> None:
    with pytest.raises(SchemaError):
        Frame.from_record(_frame().to_record()._replace(key=b"\xff\xfe"))


def test_frame_fields_are_validated() -> None:
    with pytest.raises(ValidationError):
        _frame(captured_at=datetime(2024, 1, 1))  # naive datetime
    with pytest.raises(ValidationError):
        _frame(camera_id="")
    with pytest.raises(ValidationError):
        _frame(unexpected="field")


# ----------------------------------------------------------------------------------------- control
@pytest.mark.parametrize(
    "document, kind",
    [
        (b'{"action": "add_category", "category": "brick", "train_dir": "/data/brick"}', AddCategory),
        (b'{"action": "remove_category", "category": "brick"}', RemoveCategory),
        (b'{"action": "set_threshold", "category": "brick", "threshold": 3.5}', SetThreshold),
        (b'{"action": "set_threshold", "category": "brick", "false_alarm_rate": 0.02}', SetThreshold),
        (b'{"action": "choose_expert", "category": "brick", "expert": "patchcore"}', ChooseExpert),
        (b'{"action": "rollback_category", "category": "brick", "task_version": 2}', RollbackCategory),
    ],
)
def test_control_commands_parse_by_action(document: bytes, kind: type) -> None:
    command = parse_control(document)
    assert type(command) is kind
    assert command.category == "brick"
    assert parse_control(control_to_json(command)) == command


def test_add_category_defaults() -> None:
    command = parse_control(b'{"action": "add_category", "category": "brick", "train_dir": "/d"}')
    assert isinstance(command, AddCategory)
    assert command.expert is None and command.replace is False and command.false_alarm_rate == 0.01
    assert command.issued_at.tzinfo is not None and command.command_id


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"not json",
        b"[]",
        b'{"category": "brick"}',  # no action
        b'{"action": "explode", "category": "brick"}',
        b'{"action": "remove_category"}',  # no category
        b'{"action": "remove_category", "category": "brick", "extra": 1}',
        b'{"action": "add_category", "category": "brick"}',  # no train_dir
        b'{"action": "add_category", "category": "brick", "train_dir": "/d", "max_train_images": 3}',
        b'{"action": "add_category", "category": "brick", "train_dir": "/d", "frame_budget_ms": "fast"}',
        b'{"action": "add_category", "category": "brick", "train_dir": "/d", "frame_budget_ms": 1e6}',
        b'{"action": "add_category", "category": "brick", "train_dir": "/d", "false_alarm_rate": 0.5}',
        b'{"action": "add_category", "category": "brick", "train_dir": "/d", "expert": "magic"}',
        b'{"action": "choose_expert", "category": "brick", "expert": "magic"}',
        b'{"action": "set_threshold", "category": "brick"}',  # neither
        b'{"action": "set_threshold", "category": "brick", "threshold": 1.0, "false_alarm_rate": 0.1}',
        b'{"action": "set_threshold", "category": "brick", "false_alarm_rate": 0}',
        b'{"action": "rollback_category", "category": "brick"}',  # no task_version
        b'{"action": "rollback_category", "category": "brick", "task_version": 0}',
        b'{"action": "rollback_category", "category": "brick", "task_version": 1.5}',
    ],
)
def test_bad_control_commands_raise_schema_error(document: bytes) -> None:
    with pytest.raises(SchemaError, match="invalid control command"):
        parse_control(document)


# Each is a document an operator (or a buggy client) could send; Python's json.dumps writes these literals.
NON_FINITE = [
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": 1e309}', "finite"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": Infinity}', "finite"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": -Infinity}', "finite"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": NaN}', "finite"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": -0.5}', "greater than 0"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "threshold": 0}', "greater than 0"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "false_alarm_rate": NaN}', "finite"),
    (b'{"action": "set_threshold", "category": "brick", "command_id": "c-1", "false_alarm_rate": 1e309}', "finite"),
    (b'{"action": "add_category", "category": "brick", "command_id": "c-1", "train_dir": "/d", '
     b'"false_alarm_rate": NaN}', "finite"),
    (b'{"action": "add_category", "category": "brick", "command_id": "c-1", "train_dir": "/d", '
     b'"frame_budget_ms": Infinity}', "finite"),
    (b'{"action": "add_category", "category": "brick", "command_id": "c-1", "train_dir": "/d", '
     b'"frame_budget_ms": NaN}', "finite"),
    (b'{"action": "add_category", "category": "brick", "command_id": "c-1", "train_dir": "/d", '
     b'"frame_budget_ms": 0}', "greater than 0"),
    (b'{"action": "add_category", "category": "brick", "command_id": "c-1", "train_dir": "/d", '
     b'"frame_budget_ms": -250}', "greater than 0"),
]


@pytest.mark.parametrize("document, reason", NON_FINITE)
def test_non_finite_or_negative_numbers_are_refused_naming_the_field(document: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason) as caught:
        parse_control(document)
    field = next(f for f in ("threshold", "frame_budget_ms", "false_alarm_rate") if f'"{f}"'.encode() in document)
    assert f".{field}:" in str(caught.value)  # says which field, not only pydantic's banner


@pytest.mark.parametrize("document", [d for d, _ in NON_FINITE])
def test_command_fields_of_names_a_refused_command(document: bytes) -> None:
    fields = command_fields_of(document)
    assert fields["command_id"] == "c-1" and fields["category"] == "brick"
    assert fields["action"] in ("set_threshold", "add_category")


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, {}),
        (b"", {}),
        (b"not json", {}),
        (b"\xff\xfe\x00", {}),
        (b"[1, 2]", {}),
        (b'"a string"', {}),
        (b"[" * 100_000, {}),  # deeper than the parser's recursion limit
        (b"1" * 10_000, {}),  # an int longer than Python converts by default
        (b'{"command_id": 7, "action": null, "category": ["x"]}', {}),  # only strings are kept
        (b'{"command_id": "c", "category": "Not Valid"}', {"command_id": "c", "category": "Not Valid"}),
        (b'{"command_id": "' + b"x" * 1000 + b'", "action": "set_threshold"}', {"action": "set_threshold"}),
    ],
)
def test_command_fields_of_is_best_effort(value: bytes | None, expected: dict) -> None:
    assert command_fields_of(value) == expected


def test_commands_with_non_finite_floats_cannot_be_built() -> None:
    # Built in Python, NaN would serialise to null and the worker would refuse a command it cannot name.
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValidationError, match="finite"):
            SetThreshold(category="a", threshold=bad)
        with pytest.raises(ValidationError, match="finite"):
            SetThreshold(category="a", false_alarm_rate=bad)
        with pytest.raises(ValidationError, match="finite"):
            AddCategory(category="a", train_dir="/d", false_alarm_rate=bad)
    for bad in (0.0, -1e-9, -3.0):
        with pytest.raises(ValidationError, match="greater than 0"):
            SetThreshold(category="a", threshold=bad)
    command = SetThreshold(category="a", threshold=1e300)  # finite and positive: the calibration judges the scale
    assert parse_control(control_to_json(command)) == command


def test_rollback_category() -> None:
    command = RollbackCategory(category="brick", task_version=3)
    assert command.action == "rollback_category" and command.task_version == 3
    assert parse_control(control_to_json(command)) == command
    with pytest.raises(ValidationError):
        RollbackCategory(category="brick", task_version=0)


def test_set_threshold_needs_exactly_one() -> None:
    assert SetThreshold(category="a", threshold=0.5).threshold == 0.5
    assert SetThreshold(category="a", false_alarm_rate=0.1).false_alarm_rate == 0.1
    with pytest.raises(ValueError, match="exactly one"):
        SetThreshold(category="a")
    with pytest.raises(ValueError, match="exactly one"):
        SetThreshold(category="a", threshold=1.0, false_alarm_rate=0.1)


@pytest.mark.parametrize(
    "name", ["", "Brick", "bad name", "-lead", "_lead", "a/b", "a.b", "ümlaut", "a" * 65, "brick\n"]
)
def test_bad_category_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="is not a valid name: use 1-64 lowercase letters"):
        RemoveCategory(category=name)
    document = RemoveCategory(category="ok").model_dump_json().replace('"ok"', json.dumps(name)).encode()
    with pytest.raises(SchemaError, match="category: category .* is not a valid name"):
        parse_control(document)


def test_bad_category_message_quotes_the_name() -> None:
    with pytest.raises(SchemaError) as caught:
        parse_control(b'{"action": "remove_category", "category": "Foo Bar"}')
    assert ("category 'Foo Bar' is not a valid name: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit") in str(caught.value)
    with pytest.raises(SchemaError) as caught:
        parse_control(b'{"action": "remove_category", "category": "' + b"x" * 5000 + b'"}')
    assert len(str(caught.value)) < 400  # a huge name is cut, not echoed whole


@pytest.mark.parametrize("name", ["a", "brick", "0-metal_nut", "a" * 64])
def test_good_category_names_accepted(name: str) -> None:
    assert RemoveCategory(category=name).category == name


# ------------------------------------------------------------------------------ results, dead letters
def _result(**overrides) -> InspectionResult:
    fields = dict(
        frame_id="f-1",
        camera_id="cam",
        captured_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        worker_id="w-1",
        category="brick",
        task_confidence=0.75,
        task_distance=12.5,
        expert="patchcore",
        score_raw=3.25,
        score=1.5,
        threshold=2.0,
        decision=Decision.DEFECTIVE,
        anomaly_map_png=b"\x89PNG\r\n\x1a\n" + RAW,
        map_max_score=4.0,
        boxes=[Box(x0=1, y0=2, x1=30, y1=40, area=500, peak_score=3.5)],
        latency=StageLatency(decode_ms=1, features_ms=2, task_id_ms=0.5, expert_ms=3, encode_ms=1, end_to_end_ms=9),
        store_version=7,
        task_version=3,
        ground_truth=GroundTruth(category="brick", is_anomalous=True),
    )
    fields.update(overrides)
    return InspectionResult(**fields)


def test_inspection_result_json_round_trip_keeps_bytes() -> None:
    result = _result()
    record = result.to_record()
    assert record.key == b"f-1"
    record.value.decode("utf-8")  # pure JSON text: the PNG travels as base64
    back = InspectionResult.model_validate_json(record.value)
    assert back == result
    assert back.anomaly_map_png == result.anomaly_map_png
    assert back.decision is Decision.DEFECTIVE and back.boxes[0].area == 500


def test_unknown_result_round_trip() -> None:
    result = _result(category=None, expert=None, score_raw=None, score=None, threshold=None,
                     decision=Decision.UNKNOWN, anomaly_map_png=None, map_max_score=None, boxes=[])
    assert InspectionResult.model_validate_json(result.model_dump_json()) == result


def test_dead_letter_json_round_trip_keeps_raw_record() -> None:
    letter = DeadLetter(
        worker_id="w",
        source_topic="inspection.frames",
        partition=3,
        offset=123456789,
        reason=DeadLetterReason.CORRUPT_IMAGE,
        detail="PNG: broken data stream",
        frame_id=None,
        key=b"\xff\x00cam",
        value=RAW,
        headers=[("schema", b"inspection.frame"), ("odd", b"\xff\xfe\x00")],
    )
    record = letter.to_record()
    assert record.key == letter.key
    assert dict(record.headers) == {"reason": b"corrupt_image"}
    back = DeadLetter.model_validate_json(record.value)
    assert back == letter
    assert back.value == RAW and back.key == b"\xff\x00cam"
    assert [tuple(h) for h in back.headers] == letter.headers


def test_dead_letter_rejects_unknown_reason() -> None:
    with pytest.raises(ValidationError):
        DeadLetter(worker_id="w", source_topic="t", partition=0, offset=0, reason="bored", detail="")


def test_a_dead_letter_keeps_what_fits_its_topic_and_names_what_it_dropped() -> None:
    topics = TopicsConfig()
    fields = dict(worker_id="w", source_topic="inspection.frames", partition=0, offset=7,
                  reason=DeadLetterReason.OVERSIZE, detail="too big", frame_id="f")
    limit = topics.whole_dead_letter_value_bytes
    assert InferenceConfig().max_frame_bytes <= limit  # every accepted frame's dead letter keeps its bytes
    at_limit = os.urandom(limit)
    whole = DeadLetter.of(Record(b"cam", at_limit, [("frame_id", b"f")]), topics.max_message_bytes, **fields)
    assert whole.value == at_limit and whole.dropped == [] and len(whole.to_record().value) < topics.max_message_bytes

    huge = os.urandom(15_000_000)
    letter = DeadLetter.of(Record(b"cam", huge, [("frame_id", b"f")]), topics.max_message_bytes, **fields)
    record = letter.to_record()
    assert letter.value is None and letter.dropped == ["value"] and letter.headers == [("frame_id", b"f")]
    assert letter.value_bytes == len(huge) and letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert len(record.key) + len(record.value) <= topics.max_message_bytes
    assert DeadLetter.model_validate_json(record.value) == letter

    huge_headers = [("junk", os.urandom(14_000_000))]
    letter = DeadLetter.of(Record(b"cam", b"x", huge_headers), topics.max_message_bytes, **fields)
    assert letter.dropped == ["value", "headers"] and letter.key == b"cam" and letter.value_bytes == 1
