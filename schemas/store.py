"""The Redis key-prompt-knowledge store's manifest: which tasks exist and which blobs make each one.

Blobs are content-addressed (`<namespace>:blob:<sha256>`), immutable once written. A manifest version
is one atomic publish; a task entry changes only when that task is (re)trained or recalibrated.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

BLOB_KINDS = ("keys", "expert", "calibration", "meta", "spec")  # "spec": absent in tasks stored before it


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

    @property
    def size_bytes(self) -> int:
        return sum(self.blob_sizes.values())


class StoreManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    version: int = Field(default=0, ge=0)
    tasks: dict[str, TaskEntry] = Field(default_factory=dict)
