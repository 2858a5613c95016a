"""Property-based fuzzing of what arrives from the network: frame records, image bytes, control commands.

Each untrusted-input parser has one contract: it returns a valid object or raises its own error type
(SchemaError, ImageDecodeError), never anything else, so a worker can dead-letter the record and go on.
Example counts stay modest so the file runs in seconds, and no example database is kept: a failure
prints its minimal example, which belongs in a unit test.
"""

from __future__ import annotations

import io
import json
import math
import re
from datetime import timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.features.imaging import ImageDecodeError, decode_image, encode_jpeg, encode_png
from schemas.messages import (
    CATEGORY_PATTERN,
    FRAME_SCHEMA,
    AddCategory,
    ChooseExpert,
    DeadLetterReason,
    Frame,
    Record,
    RemoveCategory,
    RollbackCategory,
    SchemaError,
    SetThreshold,
    command_fields_of,
    control_to_json,
    parse_control,
)

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COMMAND_TYPES = (AddCategory, RemoveCategory, SetThreshold, ChooseExpert, RollbackCategory)
DEAD_LETTER_REASONS = {reason.value for reason in DeadLetterReason}


# ------------------------------------------------------------------------------------------ frames
FRAME_HEADER_NAMES = ["schema", "schema_version", "frame_id", "captured_at", "content_type", "ground_truth"]
_plausible_header_values = st.sampled_from([
    FRAME_SCHEMA.encode(), b"inspection.result", b"1", b"2", b"", b"image/png", b"image/jpeg", b"image/gif",
    b"2024-05-06T07:08:09+02:00", b"2024-05-06T07:08:09", b"9999-12-31T23:59:59-23:59", b"f-1",
    b'{"category": "brick", "is_anomalous": true}', b'{"category": "x"}', b"{not json", b"null", b"[]",
    b"\xff\xfe\x00", "é".encode("utf-16"),
])
_header_values = st.one_of(st.none(), st.binary(max_size=64), _plausible_header_values,
                           st.text(max_size=40).map(str.encode))
_headers = st.lists(
    st.tuples(st.one_of(st.sampled_from(FRAME_HEADER_NAMES), st.text(max_size=12)), _header_values), max_size=10
)


def _valid_frame_headers() -> list[tuple[str, bytes]]:
    return [("schema", FRAME_SCHEMA.encode()), ("schema_version", b"1"), ("frame_id", b"f-1"),
            ("captured_at", b"2024-05-06T07:08:09+00:00"), ("content_type", b"image/png")]


_camera_keys = st.text(min_size=1, max_size=20).map(str.encode)
_any_keys = st.one_of(st.none(), st.binary(max_size=140), st.text(max_size=140).map(str.encode))
_unrelated_headers = st.lists(st.tuples(st.text(min_size=1, max_size=12).filter(lambda n: n not in FRAME_HEADER_NAMES),
                                        _header_values), max_size=3)


@FUZZ
@given(
    key=st.integers(0, 3).flatmap(lambda i: _camera_keys if i else _any_keys),
    value=st.one_of(st.none(), st.binary(max_size=256)),
    headers=st.integers(0, 2).flatmap(lambda i: _headers if i == 0 else _unrelated_headers),
    start_valid=st.integers(0, 3).map(bool),
)
def test_frame_from_record_returns_a_frame_or_raises_schema_error(key, value, headers, start_valid) -> None:
    # Starting from a valid header set reaches the field validation behind the schema checks.
    all_headers = (_valid_frame_headers() if start_valid else []) + headers
    try:
        frame = Frame.from_record(Record(key, value, all_headers))
    except SchemaError:
        event("refused")  # the share of each outcome shows with --hypothesis-show-statistics
        return
    event("parsed")
    assert isinstance(frame, Frame) and frame.captured_at.tzinfo is not None
    assert Frame.from_record(frame.to_record()) == frame


# ----------------------------------------------------------------------------------------- images
def _samples() -> list[bytes]:
    """Small valid files in the modes cameras and datasets produce: the seeds of the mutations."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)  # big enough that pixels outweigh the headers
    out = [encode_png(rgb), encode_png(rgb[:, :, 0]), encode_jpeg(rgb), encode_jpeg(rgb[:, :, 0])]
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "PNG"), ("CMYK", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


SAMPLES = _samples()
MAX_PIXELS = st.sampled_from([1_000_000, 4096, 100])  # 100: below the samples' 560 pixels


@st.composite
def _mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        # Flips weigh most: a JPEG has no checksum, so many flipped files still decode (to odd pixels).
        kind = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete"]))
        # Mostly past the magic number: damage the decoder sees, not only the sniffing before it.
        start = 0 if draw(st.integers(0, 4)) == 0 else min(8, len(data) - 1)
        at = draw(st.integers(max(0, start), max(0, len(data) - 1)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def _check_decoded_or_refused(data: bytes, max_pixels: int) -> None:
    try:
        image = decode_image(data, max_pixels)
    except ImageDecodeError as error:
        assert error.reason in DEAD_LETTER_REASONS
        event(f"refused: {error.reason}")
        return
    event("decoded")
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] * image.shape[1] <= max_pixels


@pytest.mark.parametrize("data", SAMPLES)
def test_every_sample_decodes(data: bytes) -> None:
    image = decode_image(data, 10_000)
    assert image.shape == (20, 28, 3) and image.dtype == np.uint8


@FUZZ
@given(data=st.one_of(st.binary(max_size=512),
                      st.binary(max_size=512).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                      st.binary(max_size=512).map(lambda b: b"\xff\xd8\xff" + b)),
       max_pixels=MAX_PIXELS)
def test_decode_image_on_arbitrary_bytes(data: bytes, max_pixels: int) -> None:
    _check_decoded_or_refused(data, max_pixels)


@FUZZ
@given(data=_mutated(), max_pixels=MAX_PIXELS)
def test_decode_image_on_mutated_png_and_jpeg(data: bytes, max_pixels: int) -> None:
    _check_decoded_or_refused(data, max_pixels)


# ---------------------------------------------------------------------------------------- control
ACTIONS = ["add_category", "remove_category", "set_threshold", "choose_expert", "rollback_category"]
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, -1, 1e-320, 0.49999, 0.5, 1e308, float("nan"), float("inf"), -float("inf")]),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([10**400, -(10**400)]),  # written as huge JSON integers
)
_strings = st.one_of(st.text(max_size=80), st.text(min_size=257, max_size=400),
                     st.sampled_from(["brick", "0-metal_nut", "a" * 64, "a" * 65, "Brick", "ümlaut", "brick\n"]))
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _strings)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_timestamps = st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())
# Per field: values a valid command may hold, then anything else (numbers out of range, NaN, inf, huge
# integers, wrong types, long and unicode strings).
_GOOD_AND_BAD = {
    "action": (st.sampled_from(ACTIONS), _values),
    "category": (st.from_regex(CATEGORY_PATTERN, fullmatch=True), st.one_of(_strings, _values)),
    "command_id": (st.text(max_size=40), _values),
    "issued_at": (_timestamps, _values),
    "schema_version": (st.just(1), _values),
    "threshold": (st.floats(min_value=0, exclude_min=True, allow_infinity=False), st.one_of(_numbers, _values)),
    "false_alarm_rate": (st.floats(min_value=0, max_value=0.5, exclude_min=True, exclude_max=True),
                         st.one_of(_numbers, _values)),
    "train_dir": (st.text(max_size=40), _values),
    "expert": (st.sampled_from(["patchcore", "dinov2", "panda"]), st.one_of(st.just("magic"), _values)),
    "max_train_images": (st.integers(4, 10**6), st.one_of(_numbers, _values)),
    "frame_budget_ms": (st.floats(min_value=0, max_value=60_000, exclude_min=True), st.one_of(_numbers, _values)),
    "replace": (st.booleans(), _values),
    "task_version": (st.integers(1, 10**9), st.one_of(_numbers, _values)),
}


@st.composite
def _field_value(draw, name: str):
    good, bad = _GOOD_AND_BAD[name]
    return draw(good) if draw(st.integers(0, 9)) < 8 else draw(bad)


_field_values = {name: _field_value(name) for name in _GOOD_AND_BAD}


_FIELDS_OF = {kind.model_fields["action"].default: kind.model_fields for kind in COMMAND_TYPES}
_ONE_OF = ("threshold", "false_alarm_rate")  # set_threshold takes exactly one


@st.composite
def _command_documents(draw) -> bytes:
    """JSON objects shaped like commands, written with Python's json (NaN / Infinity literals). Mostly
    the fields the action has, its required ones always, so that a fair share is valid and the rest
    fails on one value or one field."""
    action = draw(_field_values["action"])
    if isinstance(action, str) and action in _FIELDS_OF and draw(st.integers(0, 3)) > 0:
        fields = _FIELDS_OF[action]
        required = [n for n, f in fields.items() if f.is_required() and n != "category"]
        optional = sorted(n for n, f in fields.items() if not f.is_required() and n != "action")
        names = required + draw(st.lists(st.sampled_from(optional), unique=True, max_size=3))
        if action == "set_threshold" and draw(st.integers(0, 3)) > 0:
            names = [n for n in names if n not in _ONE_OF] + [draw(st.sampled_from(_ONE_OF))]
    else:
        names = draw(st.lists(st.sampled_from(sorted(_field_values)), unique=True, max_size=6))
    document = {name: draw(_field_values[name]) for name in names}
    document["action"] = action
    document["category"] = draw(_field_values["category"])
    if draw(st.integers(0, 7)) == 0:
        document[draw(st.text(max_size=8))] = draw(_values)  # an extra field
    return json.dumps(document, allow_nan=True).encode()


def _check_command(command) -> None:
    """What any parsed command guarantees to the control worker."""
    assert isinstance(command, COMMAND_TYPES)
    assert re.fullmatch(CATEGORY_PATTERN, command.category)
    for name in ("threshold", "false_alarm_rate", "frame_budget_ms"):
        value = getattr(command, name, None)
        assert value is None or (math.isfinite(value) and value > 0)
    if isinstance(command, SetThreshold):
        assert (command.threshold is None) != (command.false_alarm_rate is None)
    if getattr(command, "false_alarm_rate", None) is not None:
        assert command.false_alarm_rate < 0.5
    assert parse_control(control_to_json(command)) == command


def _check_parse(value: bytes | None) -> None:
    fields = command_fields_of(value)  # never raises, whatever the value
    assert set(fields) <= {"command_id", "action", "category"} and all(isinstance(v, str) for v in fields.values())
    try:
        command = parse_control(value)
    except SchemaError:
        event("refused")
        return
    event(f"parsed: {command.action}")
    _check_command(command)
    # A command that parses also names itself (its id when the document carries one).
    assert fields["action"] == command.action and fields["category"] == command.category
    assert fields.get("command_id", command.command_id) == command.command_id


@FUZZ
@given(value=st.one_of(st.none(), st.binary(max_size=512), st.text(max_size=200).map(str.encode)))
def test_parse_control_on_arbitrary_bytes(value) -> None:
    _check_parse(value)


@FUZZ
@given(document=_command_documents())
def test_parse_control_on_random_command_documents(document: bytes) -> None:
    _check_parse(document)


@FUZZ
@given(
    document=_command_documents(),
    cut=st.integers(min_value=0, max_value=400),
    junk=st.binary(max_size=8),
)
def test_parse_control_on_damaged_documents(document: bytes, cut: int, junk: bytes) -> None:
    _check_parse(document[:cut] + junk + document[cut:])


@FUZZ
@given(
    category=st.from_regex(CATEGORY_PATTERN, fullmatch=True),
    threshold=st.floats(min_value=0, exclude_min=True, allow_infinity=False),
    far=st.floats(min_value=0, max_value=0.5, exclude_min=True, exclude_max=True),
    use_threshold=st.booleans(),
)
def test_valid_set_threshold_commands_round_trip(category: str, threshold: float, far: float,
                                                 use_threshold: bool) -> None:
    command = (SetThreshold(category=category, threshold=threshold) if use_threshold
               else SetThreshold(category=category, false_alarm_rate=far))
    _check_command(command)
    assert command_fields_of(control_to_json(command))["command_id"] == command.command_id
