"""Typed configuration of the stack, the workers and training. Defaults are the values the demo uses."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEAD_LETTER_FIELDS_BYTES = 64 * 1024  # a dead letter's key, headers, detail and names beside its value
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 12 MP PNG fits


class TopicsConfig(_Config):
    """Topic names and their explicit partitioning. Frames are sized for camera images."""

    frames: str = "inspection.frames"
    control: str = "inspection.control"
    results: str = "inspection.results"
    events: str = "inspection.events"
    dead_letter: str = "inspection.deadletter"
    frame_partitions: int = Field(default=4, ge=1, description="Upper bound on inference workers.")
    result_partitions: int = Field(default=4, ge=1)
    # larger records are refused by the broker; frames are held to less (whole_dead_letter_value_bytes)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024 * 1024)

    @property
    def whole_dead_letter_value_bytes(self) -> int:
        """The largest record value a dead letter keeps whole: a dead letter carries it base64-encoded
        (4 bytes per 3) beside up to DEAD_LETTER_FIELDS_BYTES of its other fields, in one record of
        `max_message_bytes`. Frames up to this size are accepted; a larger record's dead letter keeps
        its size and sha256 instead of its bytes."""
        return (self.max_message_bytes - DEAD_LETTER_FIELDS_BYTES) * 3 // 4

    def all_names(self) -> list[str]:
        return [self.frames, self.control, self.results, self.events, self.dead_letter]


ScramMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512"]


class SecurityConfig(_Config):
    """Whether the local stack authenticates clients. Off (the default): loopback PLAINTEXT, no users.

    On: Kafka takes SASL/SCRAM on its client port and authorises every request against per-role ACLs
    (workers/security.py); Redis admits only its ACL users. Each role's credentials are generated into
    `<state_dir>/credentials/<role>.json` (mode 0600), for the processes to read via the environment."""

    enabled: bool = Field(default=False, description="Kafka takes SASL/SCRAM with per-role ACLs and Redis admits "
                          "only its ACL users; each role's credentials file is written under state_dir/credentials/.")
    mechanism: ScramMechanism = "SCRAM-SHA-256"
    tls: bool = Field(default=False, description="Kafka's client port speaks SASL_SSL with a self-signed "
                      "certificate made under state_dir (the credential files name it as ssl_cafile).")


class Credentials(_Config):
    """One process' secrets: its Kafka user and, where it uses the store, its Redis user.

    Read from the environment or a credentials file (workers/security.py), never from the command line;
    SecretStr keeps the passwords out of reprs, logs and tracebacks."""

    username: str = Field(min_length=1)
    password: SecretStr
    mechanism: ScramMechanism = "SCRAM-SHA-256"
    security_protocol: Literal["SASL_PLAINTEXT", "SASL_SSL"] = "SASL_PLAINTEXT"
    ssl_cafile: Path | None = Field(default=None, description="CA bundle the broker's certificate is checked "
                                    "against (SASL_SSL); None: the system's CAs.")
    redis_username: str | None = None
    redis_password: SecretStr | None = None

    @model_validator(mode="after")
    def _redis_pair(self) -> "Credentials":
        if (self.redis_username is None) != (self.redis_password is None):
            raise ValueError("redis_username and redis_password go together")
        return self


class StackConfig(_Config):
    """Where the local servers listen (loopback only) and keep their data."""

    host: str = "127.0.0.1"
    kafka_port: int = Field(default=19092, description="Kafka's client port.")
    kafka_controller_port: int = Field(default=19093, description="Kafka's KRaft controller port.")
    redis_port: int = Field(default=16379, description="Redis' port.")
    prometheus_port: int = Field(default=19090, description="Prometheus' web port.")
    redis_maxmemory_mb: int = Field(default=4096, ge=16)
    state_dir: Path = Field(default=Path(".stack"), description="Folder of the servers' data, logs, pid files and "
                            "credentials.")
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"


class ModelConfig(_Config):
    """Backbone input, routing, and the settings the experts of a line share, for training and inference.

    The one source of these defaults: an expert's config declares the fields it takes from here with
    `pipeline.experts.base.model_setting`, and build_expert fills them."""

    image_size: int = Field(default=224, ge=64, description="Square side of routing's ViT key pass (and of "
                            "tasks stored before per-task input specs).")
    coreset_ratio: float = Field(default=0.02, gt=0, le=1, description="Share of PatchCore's fit patches kept "
                                 "in its memory bank (greedy coreset).")
    coreset_projection_dim: int = Field(default=64, ge=8, description="Dimensions of the random projection that "
                                        "only speeds up PatchCore's coreset selection.")
    max_coreset_size: int = Field(default=8000, ge=16, description="Most patches in PatchCore's memory bank.")
    num_neighbors: int = Field(default=3, ge=1, description="b in PatchCore's image-score re-weighting.")
    map_sigma: float = Field(default=4.0, ge=0, description="Gaussian smoothing of the map, input pixels.")
    num_keys: int = Field(default=32, ge=1, description="Task keys per category (farthest-point sampled).")
    unknown_slack: float = Field(
        default=1.15, ge=1.0, description="Unknown bound = slack x the task's highest held-out key distance "
        "(ViT keys: defective frames of a known task stay within 1.10, other products start at 1.18)."
    )
    routing_candidates: int = Field(
        default=2, ge=1, description="Tasks whose keys are searched exactly per frame: those with the nearest "
        "prototypes (mean key); with at most this many tasks the search is exhaustive. The runner-up of the "
        "margin is one of them, so keep it >= 2.")
    seed: int = Field(default=0, description="Seed of training's random choices (image sampling, coresets, "
                      "initial weights, synthetic anomalies).")


DEFAULT_FRAME_BUDGET_MS = 250.0  # the line's per-frame budget on this 2-core CPU
# Which candidates the offline benchmark runs on the test set: those an automatic choice kept, every one
# it fitted, or every one (pipeline.evaluation.benchmark)
BENCH_JUDGE_MODES = ("chosen", "fitted", "all")
DEFAULT_BENCH_JUDGE = "fitted"  # every fitted candidate tested: the validation-test Spearman by default


class TrainingConfig(_Config):
    """How a task's normal images are used, and what adding a task may cost.

    Every usable image is used (or at most `max_train_images`, a seeded sample, when an operator caps
    them). The held-out roles are dealt by fraction with floors, and the fit split takes the rest:
    validation (the automatic choice of expert, spec and image decision; early stopping), calibration
    (thresholds, the unknown bound: at least `min_calibration_images` for a 1% target), statistics
    (per-position normal statistics of the maps, only for aligned products: frames of one size) and
    audit (never used in training: kept for live monitoring). Whatever a cap leaves over is not read."""

    max_train_images: int | None = Field(default=None, ge=4, description="Optional cap on the images one "
                                         "task uses, all roles; unset: every usable image.")
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    min_validation_images: int = Field(default=30, ge=1)
    validation_anomalies_per_normal: int = Field(default=4, ge=1, le=4, description="Synthetic anomalies made of "
                                                 "each validation normal, each of another of the four families "
                                                 "(pipeline.data.validation_anomalies): more steady the choice's "
                                                 "scores and weigh every family alike; each costs validation time.")
    calibration_fraction: float = Field(default=0.2, gt=0, lt=1)
    min_calibration_images: int = Field(default=100, ge=1, description="A 1% false-alarm threshold needs "
                                        "about 100 held-out normals to be more than the highest score.")
    statistics_fraction: float = Field(default=0.1, ge=0, lt=1)
    min_statistics_images: int = Field(default=20, ge=0)
    audit_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_audit_images: int = Field(default=16, ge=0, description="The audit set keeps at most 16 normals "
                                  "(pipeline.core.audit); more would be normals that neither fit nor judge.")
    max_held_out_fraction: float = Field(default=0.5, gt=0, lt=1, description="The held-out roles never take "
                                         "more than this share of the images, floors included: fit keeps the rest.")
    batch_size: int = Field(default=16, ge=1)
    expert_budget_ms: float = Field(default=DEFAULT_FRAME_BUDGET_MS, gt=0, allow_inf_nan=False, description="The line's per-frame "
                                    "budget: most ms per frame a chosen expert may cost on this machine, its "
                                    "backbone included (estimated from its work, pipeline.core.cost).")
    add_budget_s: float = Field(default=180.0, gt=0, allow_inf_nan=False, description="Time to add a task at "
                                "the default frame budget; the automatic choice tries no further candidate once "
                                "the estimate would pass it. It scales with the frame budget (scaled_add_budget_s).")
    min_image_side: int = Field(default=32, ge=8, description="Training images smaller than this are skipped.")

    @model_validator(mode="after")
    def _fractions(self) -> "TrainingConfig":
        held = self.validation_fraction + self.calibration_fraction + self.statistics_fraction + self.audit_fraction
        if held > self.max_held_out_fraction:
            raise ValueError(f"validation + calibration + statistics + audit fractions ({held:g}) must leave the "
                             f"fit split at least 1 - max_held_out_fraction ({1 - self.max_held_out_fraction:g})")
        return self

    def at_frame_budget(self, frame_budget_ms: float) -> "TrainingConfig":
        """The same config at another per-frame budget (validated where it comes in: the add command)."""
        return self.model_copy(update={"expert_budget_ms": float(frame_budget_ms)})

    @property
    def scaled_add_budget_s(self) -> float:
        """The add budget at this frame budget: a line that can spend 10x the default per frame has hardware
        about 10x faster than this CPU's default, so the same add on it is worth 10x the work here."""
        return self.add_budget_s * max(1.0, self.expert_budget_ms / DEFAULT_FRAME_BUDGET_MS)


class InferenceConfig(_Config):
    group_id: str = "inspection-workers"
    max_batch_size: int = Field(default=8, ge=1, description="Most frames inferred together.")
    max_wait_ms: int = Field(default=50, ge=0, description="Longest a frame waits for its batch to fill.")
    decode_threads: int = Field(default=2, ge=1, le=64, description="Threads decoding the next batch while the "
                                "model computes the current one.")
    max_frame_bytes: int = Field(
        default=(DEFAULT_MAX_MESSAGE_BYTES - DEAD_LETTER_FIELDS_BYTES) * 3 // 4, ge=1024,
        description="Larger frames are dead-lettered as oversize. At most the topics' whole_dead_letter_value_bytes "
        "(checked when a worker starts), so the dead letter of any accepted frame keeps its bytes.")
    max_frame_pixels: int = Field(default=40_000_000, ge=1024, description="Decoded size limit.")
    store_poll_interval_s: float = Field(default=0.5, gt=0)
    metrics_port: int = Field(default=0, ge=0, description="Port of the Prometheus metrics endpoint; 0 = pick a "
                              "free port.")
    delivery: Literal["exactly_once", "at_least_once"] = Field(
        default="exactly_once", description="exactly_once: each batch's results, dead letters and offsets in one "
        "Kafka transaction. at_least_once: results first, then offsets (a crash may repeat a result).")
    transaction_timeout_ms: int = Field(
        default=10_000, ge=1000, le=60_000, description="How long a killed worker's open transaction can hold "
        "back read_committed readers before the broker aborts it (a replacement in the same slot aborts it at once).")
    stuck_after_s: float = Field(default=120.0, gt=0, description="No poll returned for this long: the consumer "
                                 "is stuck; the worker exits for its supervisor to restart it.")
    fault_sleep_after_first_commit_s: float = Field(
        default=0.0, ge=0, le=600, description="Fault injection for tests: the first transaction's commit step "
        "sleeps this long after the broker took it, so its bounded wait overruns. 0 (the default): off.")


class ControlConfig(_Config):
    group_id: str = "inspection-control"
    training_root: Path | None = Field(default=None, description="Adds train only on folders under this one (links "
                                       "resolved first). Unset: every add is refused, with that reason.")
    metrics_port: int = Field(default=0, ge=0, description="As InferenceConfig.metrics_port.")
    stuck_after_s: float = Field(default=60.0, gt=0, description="See InferenceConfig.stuck_after_s; commands "
                                 "run off the poll loop, so even training never delays a poll.")
    keep_versions: int = Field(default=20, ge=1, description="Store manifests kept for rollback, newest first.")
    store_fill_limit: float = Field(default=0.9, gt=0, le=1, description="An add is refused, with that reason, "
                                    "when the store would pass this share of Redis' maxmemory (checked before "
                                    "training and again with the trained task's size before publishing).")
    gc_grace_s: float = Field(default=300.0, ge=0, description="A superseded manifest is kept at least this long, "
                              "so a worker loading it never finds a blob gone.")
    transaction_timeout_ms: int = Field(
        default=10_000, ge=1000, le=60_000, description="How long a killed control worker's open transaction (a "
        "command's final event and offset) can hold back read_committed readers before the broker aborts it.")
    command_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400, description="A command running longer is answered failed and the worker "
        "restarts; a command that trains gets this plus three times its add budget.")
    fault_hang_category: str | None = Field(
        default=None, description="Fault injection for tests: commands naming this category hang. None: off.")
    fault_exit_before_commit_category: str | None = Field(
        default=None, description="Fault injection for tests: the first process of a supervised worker exits with "
        "the final event of a command naming this category sent but not committed. None: off.")
