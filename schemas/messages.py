"""Wire contracts of the pipeline: what travels on each Kafka topic.

Every message carries a schema name and version so a consumer can refuse what it does not understand
(dead-letter) instead of guessing. Frames put their metadata in Kafka headers and the encoded image
bytes, untouched, in the record value: a 200 KB JPEG is not inflated by base64. All other messages are
JSON documents.

A Kafka record is represented here as `Record(key, value, headers)` so this module needs no Kafka client.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Literal, NamedTuple, Union

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

FRAME_SCHEMA = "inspection.frame"
FRAME_SCHEMA_VERSION = 1
CATEGORY_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
_CATEGORY_RE = re.compile(CATEGORY_PATTERN)


def _valid_category(name: str) -> str:
    # fullmatch, not match: Python's `$` also matches before a trailing newline ("brick\n").
    if _CATEGORY_RE.fullmatch(name) is None:
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise PydanticCustomError(
            "category_name",
            "category {name} is not a valid name: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit",
            {"name": repr(shown)},
        )
    return name


# The check is a validator rather than Field(pattern=...) so the operator reads what a name may be, not
# a regular expression; the JSON schema still documents the pattern.
Category = Annotated[
    str,
    Field(description="Product category = task name.", json_schema_extra={"pattern": CATEGORY_PATTERN}),
    AfterValidator(_valid_category),
]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Record(NamedTuple):
    """A Kafka record without the client: key, value and headers as bytes."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class SchemaError(ValueError):
    """A record that does not follow the contract it claims (or claims none)."""


class _Message(BaseModel):
    # bytes fields travel as base64 in JSON but are raw bytes in Python.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


# --------------------------------------------------------------------------------------------- frames
class GroundTruth(_Message):
    """Labels a simulator may attach for evaluation only; the inference path never reads them."""

    category: str
    is_anomalous: bool
    defect: str = "good"
    source: str | None = None


class Frame(_Message):
    schema_version: Literal[1] = FRAME_SCHEMA_VERSION
    camera_id: str = Field(min_length=1, max_length=128)
    frame_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    captured_at: AwareDatetime = Field(default_factory=utc_now)
    content_type: Literal["image/jpeg", "image/png"]
    image: bytes = Field(repr=False)
    ground_truth: GroundTruth | None = None

    def to_record(self) -> Record:
        headers = [
            ("schema", FRAME_SCHEMA.encode()),
            ("schema_version", str(self.schema_version).encode()),
            ("frame_id", self.frame_id.encode()),
            ("captured_at", self.captured_at.isoformat().encode()),
            ("content_type", self.content_type.encode()),
        ]
        if self.ground_truth is not None:
            headers.append(("ground_truth", self.ground_truth.model_dump_json().encode()))
        return Record(self.camera_id.encode(), self.image, headers)

    @classmethod
    def from_record(cls, record: Record) -> "Frame":
        """Parse a frames-topic record; raises SchemaError with a human-readable reason."""
        headers = _header_dict(record.headers)
        if headers.get("schema") != FRAME_SCHEMA:
            raise SchemaError(f"not a frame: schema header is {headers.get('schema')!r}")
        if headers.get("schema_version") != str(FRAME_SCHEMA_VERSION):
            raise SchemaError(
                f"unsupported frame schema_version {headers.get('schema_version')!r}, "
                f"this worker reads {FRAME_SCHEMA_VERSION}"
            )
        try:
            truth = headers.get("ground_truth")
            return cls(
                camera_id=(record.key or b"").decode(),
                frame_id=headers.get("frame_id", ""),
                captured_at=headers.get("captured_at", ""),
                content_type=headers.get("content_type", ""),
                image=record.value or b"",
                ground_truth=GroundTruth.model_validate_json(truth) if truth else None,
            )
        except (ValidationError, UnicodeDecodeError) as exc:
            raise SchemaError(f"invalid frame: {_short(exc)}") from exc


def frame_id_of(record: Record) -> str | None:
    """Best-effort frame id of any record, for error reports about records that fail to parse."""
    try:
        return _header_dict(record.headers).get("frame_id")
    except SchemaError:
        return None


def _header_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    try:
        return {k: v.decode() for k, v in (headers or []) if v is not None}
    except UnicodeDecodeError as exc:
        raise SchemaError("frame headers are not UTF-8") from exc


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(exc).replace("\n", "; ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- control
ExpertName = Literal["patchcore", "reverse_distillation", "fcdd", "ucad", "dinov2", "panda", "simplenet"]
"""Experts a category can be served by. Later issues add more; validation rejects unknown names."""


class _Command(_Message):
    # No inf or NaN in any float of a command: JSON `1e309` parses to inf and `NaN` is accepted by the
    # parser, and a model holding NaN would serialise it to null (a command the worker then refuses).
    model_config = ConfigDict(allow_inf_nan=False)

    schema_version: Literal[1] = 1
    command_id: str = Field(default_factory=new_id)
    issued_at: AwareDatetime = Field(default_factory=utc_now)
    category: Category


class AddCategory(_Command):
    """Train one new task from a folder of normal (defect-free) images and publish it."""

    action: Literal["add_category"] = "add_category"
    train_dir: str = Field(description="Folder of normal images, readable by the control worker.")
    expert: ExpertName | None = Field(
        default=None, description="None: fit every expert and keep the best on held-out normal + synthetic anomalies."
    )
    max_train_images: int | None = Field(default=None, ge=4, description="Optional cap; None: every usable image.")
    frame_budget_ms: float | None = Field(
        default=None, gt=0, le=60_000, description="The line's per-frame budget for this category's expert, ms "
        "(finite, > 0); None: the control worker's default (TrainingConfig.expert_budget_ms). The add budget "
        "scales with it.")
    false_alarm_rate: float = Field(default=0.01, gt=0, lt=0.5)
    replace: bool = Field(default=False, description="Allow retraining a category that exists.")


class RemoveCategory(_Command):
    action: Literal["remove_category"] = "remove_category"


class SetThreshold(_Command):
    """Set a category's decision threshold: an explicit raw score, or a target false-alarm rate
    re-derived from the held-out normal scores kept in its calibration."""

    action: Literal["set_threshold"] = "set_threshold"
    # Every expert's raw score is a non-negative distance (PatchCore/UCAD/DINOv2/PANDA nearest-neighbour
    # distances, reverse distillation's 1 - cosine, FCDD's pseudo-Huber), so a threshold of 0 or below
    # flags every frame. The upper end depends on the category's scores: the calibration checks it.
    threshold: float | None = Field(default=None, gt=0, description="Raw image score; positive and finite.")
    false_alarm_rate: float | None = Field(default=None, gt=0, lt=0.5)

    def model_post_init(self, _context: object) -> None:
        if (self.threshold is None) == (self.false_alarm_rate is None):
            raise ValueError("give exactly one of threshold or false_alarm_rate")


class ChooseExpert(_Command):
    """Retrain a category with another expert from the normal images it was added with."""

    action: Literal["choose_expert"] = "choose_expert"
    expert: ExpertName


class RollbackCategory(_Command):
    """Serve a category's earlier task version again (its blobs as they were)."""

    action: Literal["rollback_category"] = "rollback_category"
    task_version: int = Field(ge=1)


ControlCommand = Annotated[
    Union[AddCategory, RemoveCategory, SetThreshold, ChooseExpert, RollbackCategory], Field(discriminator="action")
]
CONTROL_ADAPTER: TypeAdapter[ControlCommand] = TypeAdapter(ControlCommand)


def parse_control(value: bytes | None) -> ControlCommand:
    """Parse a control-topic value; raises SchemaError with the reason."""
    try:
        return CONTROL_ADAPTER.validate_json(value or b"")
    except ValidationError as exc:
        raise SchemaError(f"invalid control command: {_short(_reasons(exc))}") from exc
    except ValueError as exc:  # defensive: a check pydantic would let through unwrapped
        raise SchemaError(f"invalid control command: {_short(exc)}") from exc


def _reasons(exc: ValidationError) -> str:
    """'field: reason (got value)' per error: pydantic's own text spends the length limit on its
    banner and URLs before the operator reads which field is wrong."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "command"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        # A missing field has no value to show, a bad name is quoted by its own message.
        quiet = isinstance(value, (dict, list)) or error["type"] in ("missing", "category_name")
        parts.append(f"{where}: {message}" + ("" if quiet else f" (got {shown})"))
    return "; ".join(parts)


def control_to_json(command: ControlCommand) -> bytes:
    return CONTROL_ADAPTER.dump_json(command)


_NAMING_FIELDS = ("command_id", "action", "category")
_MAX_NAMING_CHARS = 256  # an event names the command; the dead letter keeps the whole value


def command_fields_of(value: bytes | None) -> dict[str, str]:
    """Best-effort command_id, action and category of a control value that fails validation, so the
    `failed` event can name the command its sender waits for. Each is kept only if it is a string (and
    not absurdly long); never raises."""
    try:
        # Python's json reads NaN / Infinity literals and 1e309: exactly the documents that fail.
        document = json.loads(value or b"")
    except Exception:  # noqa: BLE001 - bad UTF-8, bad JSON, huge ints, deep nesting: nothing to report
        return {}
    if not isinstance(document, dict):
        return {}
    return {
        name: document[name]
        for name in _NAMING_FIELDS
        if isinstance(document.get(name), str) and len(document[name]) <= _MAX_NAMING_CHARS
    }


# ------------------------------------------------------------------------------------------- results
class Box(_Message):
    """An anomalous region in frame pixel coordinates (x1, y1 exclusive) with its peak raw score."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak_score: float


class StageLatency(_Message):
    """Milliseconds per stage as this frame lived them: batched stages (features, task id, expert) are
    the whole batch's wall time, since the frame waited for all of it."""

    decode_ms: float
    features_ms: float = Field(description="The shared backbone pass (resize + CNN) of the batch.")
    task_id_ms: float
    expert_ms: float
    encode_ms: float
    end_to_end_ms: float = Field(description="From the frame's captured_at to the result being built.")


class Decision(str, Enum):
    OK = "ok"
    DEFECTIVE = "defective"
    UNKNOWN = "unknown"


class InspectionResult(_Message):
    schema_version: Literal[1] = 1
    frame_id: str
    camera_id: str
    captured_at: AwareDatetime
    processed_at: AwareDatetime = Field(default_factory=utc_now)
    worker_id: str
    category: str | None = Field(description="Predicted task; None when the frame matches no known task.")
    task_confidence: float = Field(description="Relative margin between the best and second-best task.")
    task_distance: float | None = Field(description="Distance to the nearest task's keys; None when no task is "
                                        "known (JSON has no infinity).")
    expert: str | None = None
    score_raw: float | None = None
    score: float | None = Field(
        default=None, description="Calibrated score: 0 = median normal, 1 = the decision threshold."
    )
    threshold: float | None = Field(default=None, description="Decision threshold on score_raw.")
    decision: Decision
    anomaly_map_png: bytes | None = Field(
        default=None, repr=False, description="8-bit PNG at the frame's resolution."
    )
    map_max_score: float | None = Field(
        default=None, description="Raw pixel score that maps to 255 in anomaly_map_png (linear from 0)."
    )
    boxes: list[Box] = Field(default_factory=list)
    latency: StageLatency
    store_version: int
    task_version: int | None = None
    ground_truth: GroundTruth | None = Field(default=None, description="Echoed from the frame, if any.")

    def to_record(self) -> Record:
        return Record(self.frame_id.encode(), self.model_dump_json().encode(), [])


# -------------------------------------------------------------------------------------------- events
class EventKind(str, Enum):
    STARTED = "started"
    PROGRESS = "progress"
    FINISHED = "finished"
    FAILED = "failed"


class TrainingEvent(_Message):
    """What the control worker did with a command: started / progress / finished / failed."""

    schema_version: Literal[1] = 1
    event_id: str = Field(default_factory=new_id)
    at: AwareDatetime = Field(default_factory=utc_now)
    command_id: str | None
    action: str | None
    category: str | None
    kind: EventKind
    message: str
    progress: float | None = Field(default=None, ge=0, le=1)
    store_version: int | None = None
    details: dict[str, float | int | str | bool | None] = Field(default_factory=dict)

    def to_record(self) -> Record:
        return Record((self.category or "").encode(), self.model_dump_json().encode(), [])


# ------------------------------------------------------------------------------------------ dead letter
class DeadLetterReason(str, Enum):
    CORRUPT_IMAGE = "corrupt_image"
    NOT_AN_IMAGE = "not_an_image"
    WRONG_SCHEMA = "wrong_schema"
    OVERSIZE = "oversize"
    BAD_COMMAND = "bad_command"
    PROCESSING_ERROR = "processing_error"


RECORD_FRAMING_BYTES = 4096  # a record batch's own header and the record's beside its key, value and headers


class DeadLetter(_Message):
    """A record the pipeline could not process, kept whole so it can be inspected and replayed.

    Whole unless that would not fit the dead-letter topic (`fitted`): then the value goes first, then the
    headers, then the key, and `dropped` names what went; `value_bytes` and `value_sha256` always
    describe the original value, so a dropped frame can still be matched to its camera's copy."""

    schema_version: Literal[1] = 1
    at: AwareDatetime = Field(default_factory=utc_now)
    worker_id: str
    source_topic: str
    partition: int
    offset: int
    reason: DeadLetterReason
    detail: str
    frame_id: str | None = None
    key: bytes | None = Field(default=None, repr=False)
    value: bytes | None = Field(default=None, repr=False)
    headers: list[tuple[str, bytes]] = Field(default_factory=list, repr=False)
    value_bytes: int | None = None
    value_sha256: str | None = None
    dropped: list[Literal["value", "headers", "key"]] = Field(default_factory=list)

    @classmethod
    def of(cls, record: Record, max_record_bytes: int, **fields) -> "DeadLetter":
        """The dead letter of `record`, as whole as fits in a record of `max_record_bytes`."""
        value = record.value
        letter = cls(key=record.key, value=value, headers=record.headers, **fields,
                     value_bytes=None if value is None else len(value),
                     value_sha256=None if value is None else hashlib.sha256(value).hexdigest())
        return letter.fitted(max_record_bytes)

    def fitted(self, max_record_bytes: int) -> "DeadLetter":
        letter, limit = self, max_record_bytes - RECORD_FRAMING_BYTES
        for part in ("value", "headers", "key"):
            if letter._record_bytes() <= limit:
                break
            letter = letter.model_copy(update={part: None if part != "headers" else [], "dropped": [*letter.dropped, part]})
        return letter

    def _record_bytes(self) -> int:
        return len(self.key or b"") + len(self.model_dump_json())

    def to_record(self) -> Record:
        return Record(self.key, self.model_dump_json().encode(), [("reason", self.reason.value.encode())])
