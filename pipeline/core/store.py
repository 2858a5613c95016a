"""The key-prompt-knowledge store in Redis: versioned manifest + immutable, content-addressed blobs.

Publishing a task is one MULTI/EXEC transaction guarded by WATCH on the version key: blobs, manifest,
a copy of the manifest under its version number and the version counter change together or not at all,
and concurrent publishers retry instead of overwriting each other. Blobs are addressed by their SHA-256,
so publishing task B never rewrites a byte of task A, and readers verify every blob on load.
"""

from __future__ import annotations

import hashlib

import redis

from pipeline.core.calibration import Calibration
from pipeline.core.task import TaskArtifacts
from schemas.messages import utc_now
from schemas.store import StoreManifest, TaskEntry


class StoreError(RuntimeError):
    pass


class KnowledgeStore:
    def __init__(self, client: redis.Redis, namespace: str = "kpk"):
        self.client = client
        self.namespace = namespace
        self._version_key = f"{namespace}:version"
        self._manifest_key = f"{namespace}:manifest"
        self.updates_channel = f"{namespace}:updates"

    @classmethod
    def from_url(cls, url: str, namespace: str = "kpk") -> "KnowledgeStore":
        return cls(redis.Redis.from_url(url), namespace)

    def _blob_key(self, digest: str) -> str:
        return f"{self.namespace}:blob:{digest}"

    # ------------------------------------------------------------------------------------ reads
    def version(self) -> int:
        """Cheap change detection for workers: one GET."""
        return int(self.client.get(self._version_key) or 0)

    def manifest(self) -> StoreManifest:
        raw = self.client.get(self._manifest_key)
        return StoreManifest.model_validate_json(raw) if raw else StoreManifest()

    def manifest_at(self, version: int) -> StoreManifest:
        raw = self.client.get(f"{self._manifest_key}:{version}")
        if raw is None:
            raise StoreError(f"no manifest version {version}")
        return StoreManifest.model_validate_json(raw)

    def blob(self, digest: str) -> bytes:
        data = self.client.get(self._blob_key(digest))
        if data is None:
            raise StoreError(f"blob {digest} is missing")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"blob {digest} is corrupt (hash mismatch)")
        return data

    def load_task(self, entry: TaskEntry) -> TaskArtifacts:
        blobs = {kind: self.blob(digest) for kind, digest in entry.blobs.items()}
        return TaskArtifacts.from_blobs(entry.category, entry.expert, blobs)

    def task_sizes(self) -> dict[str, int]:
        return {name: entry.size_bytes for name, entry in self.manifest().tasks.items()}

    def size_report(self) -> dict[str, dict[str, int]]:
        """Per task: total bytes and bytes per part (keys, prompt, knowledge, expert arrays, calibration)."""
        return {name: {"total": e.size_bytes} | e.parts for name, e in self.manifest().tasks.items()}

    # ----------------------------------------------------------------------------------- writes
    def publish(self, task: TaskArtifacts) -> int:
        """Add or replace one task; returns the new store version."""
        blobs = task.blobs()
        digests = {kind: hashlib.sha256(data).hexdigest() for kind, data in blobs.items()}

        def change(manifest: StoreManifest, version: int, pipe) -> dict[str, TaskEntry]:
            for kind, data in blobs.items():
                pipe.set(self._blob_key(digests[kind]), data, nx=True)
            entry = TaskEntry(
                category=task.category,
                task_version=version,
                expert=task.expert_name,
                blobs=digests,
                blob_sizes={kind: len(data) for kind, data in blobs.items()},
                parts=task.parts(),
                published_at=utc_now(),
            )
            return {**manifest.tasks, task.category: entry}

        return self._transact(change)

    def remove(self, category: str) -> int:
        def change(manifest: StoreManifest, version: int, pipe) -> dict[str, TaskEntry]:
            if category not in manifest.tasks:
                raise StoreError(f"unknown category {category!r}")
            return {name: e for name, e in manifest.tasks.items() if name != category}

        return self._transact(change)

    def set_calibration(self, category: str, calibration: Calibration) -> int:
        """Replace one task's calibration blob (thresholds); its keys and expert stay as they are."""
        data = calibration.to_bytes()
        digest = hashlib.sha256(data).hexdigest()

        def change(manifest: StoreManifest, version: int, pipe) -> dict[str, TaskEntry]:
            entry = manifest.tasks.get(category)
            if entry is None:
                raise StoreError(f"unknown category {category!r}")
            pipe.set(self._blob_key(digest), data, nx=True)
            updated = entry.model_copy(
                update={
                    "task_version": version,
                    "blobs": {**entry.blobs, "calibration": digest},
                    "blob_sizes": {**entry.blob_sizes, "calibration": len(data)},
                    "parts": {**entry.parts, "calibration": len(data)},
                    "published_at": utc_now(),
                }
            )
            return {**manifest.tasks, category: updated}

        return self._transact(change)

    def _transact(self, change) -> int:
        """Optimistic transaction: re-read and retry if another publisher got in between."""
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._version_key)
                    version = int(pipe.get(self._version_key) or 0) + 1
                    raw = pipe.get(self._manifest_key)
                    manifest = StoreManifest.model_validate_json(raw) if raw else StoreManifest()
                    pipe.multi()
                    tasks = change(manifest, version, pipe)
                    new = StoreManifest(version=version, tasks=tasks).model_dump_json()
                    pipe.set(self._manifest_key, new)
                    pipe.set(f"{self._manifest_key}:{version}", new)
                    pipe.set(self._version_key, version)
                    pipe.publish(self.updates_channel, version)
                    pipe.execute()
                    return version
                except redis.WatchError:
                    continue
