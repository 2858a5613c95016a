"""The Redis key-prompt-knowledge store's manifest: which tasks exist and which blobs make each one.

Blobs are content-addressed (`<namespace>:blob:<sha256>`), immutable once written. A manifest version
is one atomic publish; a task entry changes only when that task is (re)trained, recalibrated or rolled back.
Fields added after the first stored manifests (`command_id`, `restored_from`, `published_at` of the
manifest) default to None, so manifests written before them still parse.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

BLOB_KINDS = ("keys", "expert", "calibration", "meta", "spec", "audit", "decision")  # the last three: absent in tasks stored before them

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str
    task_version: int = Field(ge=1, description="Store version at which this entry was last written.")
    expert: str
    blobs: dict[str, str] = Field(description="Blob kind -> sha256 hex digest.")
    blob_sizes: dict[str, int]
    parts: dict[str, int] = Field(
        default_factory=dict, description="Bytes per part: keys, calibration, meta and each array of the expert "
        "state (expert.prompt, expert.knowledge, expert.bank ...).")
    published_at: AwareDatetime
    command_id: str | None = Field(default=None, description="The command that wrote this entry, if any.")
    restored_from: int | None = Field(
        default=None, ge=1, description="Set by a rollback: the task version whose blobs this entry restores.")

    @property
    def size_bytes(self) -> int:
        return sum(self.blob_sizes.values())


class StoreManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    version: int = Field(default=0, ge=0)
    tasks: dict[str, TaskEntry] = Field(default_factory=dict)
    command_id: str | None = Field(default=None, description="The command that produced this version, if any.")
    published_at: AwareDatetime | None = Field(
        default=None, description="When this version was committed (Redis server clock); None before it was kept.")

    def written_at(self) -> datetime:
        """Commit time, for garbage collection's grace period. Manifests stored before `published_at`
        existed fall back to their newest entry (written in that same publish unless the publish was a
        removal, then a lower bound), and to the epoch when they hold no task at all."""
        if self.published_at is not None:
            return self.published_at
        return max((e.published_at for e in self.tasks.values()), default=EPOCH)


class GarbageReport(BaseModel):
    """What one `KnowledgeStore.collect_garbage` run deleted and which manifest versions it kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifests_deleted: int = Field(ge=0)
    blobs_deleted: int = Field(ge=0)
    bytes_freed: int = Field(ge=0)
    kept_versions: list[int] = Field(description="Manifest versions still stored after the run, oldest first.")
