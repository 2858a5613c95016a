"""The key-prompt-knowledge store in Redis: versioned manifest + immutable, content-addressed blobs.

Every change (publish, remove, recalibrate, roll back) is one MULTI/EXEC transaction guarded by WATCH on
the version key: blobs, manifest, a copy of the manifest under its version number, the version counter
and the command that caused it change together or not at all, and concurrent publishers retry instead of
overwriting each other. Blobs are addressed by their SHA-256, so publishing task B never rewrites a byte
of task A, and readers verify every blob on load.

Redis keys, all under `<namespace>:`
    version           the current store version (int)
    manifest          the current manifest (JSON); `manifest:<N>` the manifest of version N
    blob:<sha256>     one immutable blob
    commands          hash: command id -> the store version it produced (never collected)
    oldest_version    the lowest version whose manifest garbage collection kept (absent: 1)
    updates           pub/sub channel announcing each new version

`KnowledgeStore.dump(folder)` copies the current manifest and the blobs it references out of Redis byte
for byte; `DumpedStore(folder)` reads such a copy with the same read interface inspection uses (manifest,
verified blobs, tasks) and no Redis: how the GPU check (deploy/gpu) carries a store to a machine without one.

    <folder>/dump.json         namespace, version, the manifest's SHA-256, every blob's size
    <folder>/manifest          the bytes of `<namespace>:manifest`
    <folder>/blobs/<sha256>    the bytes of `<namespace>:blob:<sha256>`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.calibration import Calibration
from pipeline.core.task import TaskArtifacts
from schemas.store import GarbageReport, StoreManifest, TaskEntry

if TYPE_CHECKING:
    import redis

MGET_CHUNK = 500  # manifest keys per MGET when reading the retained versions
DUMP_INDEX, DUMP_MANIFEST, DUMP_BLOBS = "dump.json", "manifest", "blobs"  # a dump's files (KnowledgeStore.dump)


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class _GarbagePlan:
    """What one collection pass read: delete `versions` and `digests`, keep versions >= `keep_from`."""

    keep_from: int
    versions: list[int]
    digests: list[str]
    bytes_freed: int
    kept_versions: list[int]


@dataclass(frozen=True)
class StoreMemory:
    used_bytes: int
    limit_bytes: int | None  # Redis' maxmemory; None: unbounded

    def fits(self, more_bytes: int, fraction: float) -> bool:
        """Whether `more_bytes` can be added while staying within `fraction` of the limit."""
        return self.limit_bytes is None or self.used_bytes + more_bytes <= fraction * self.limit_bytes


class StoreReader:
    """What inspection reads from a store (Inspector.sync / prepare): the version, the current manifest,
    checksum-verified blobs and the tasks they make. Subclasses say where the bytes come from."""

    def version(self) -> int:
        raise NotImplementedError

    def manifest(self) -> StoreManifest:
        raise NotImplementedError

    def _raw_blob(self, digest: str) -> bytes | None:
        raise NotImplementedError

    def blob(self, digest: str) -> bytes:
        data = self._raw_blob(digest)
        if data is None:
            raise StoreError(f"blob {digest} is missing")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"blob {digest} is corrupt (hash mismatch)")
        return data

    def load_task(self, entry: TaskEntry) -> TaskArtifacts:
        blobs = {kind: self.blob(digest) for kind, digest in entry.blobs.items()}
        return TaskArtifacts.from_blobs(entry.category, entry.expert, blobs)


class KnowledgeStore(StoreReader):
    def __init__(self, client: redis.Redis, namespace: str = "kpk"):
        self.client = client
        self.namespace = namespace
        self._version_key = f"{namespace}:version"
        self._manifest_key = f"{namespace}:manifest"
        self._commands_key = f"{namespace}:commands"
        self._oldest_key = f"{namespace}:oldest_version"
        self.updates_channel = f"{namespace}:updates"

    @classmethod
    def from_url(cls, url: str, namespace: str = "kpk", **client_options) -> "KnowledgeStore":
        """`client_options`: redis-py keywords, e.g. the username and password of an ACL user."""
        import redis  # here, not at the top: pure evaluation imports this module without a Redis client

        return cls(redis.Redis.from_url(url, **client_options), namespace)

    def _blob_key(self, digest: str) -> str:
        return f"{self.namespace}:blob:{digest}"

    def _versioned_key(self, version: int) -> str:
        return f"{self._manifest_key}:{version}"

    # ------------------------------------------------------------------------------------ reads
    def version(self) -> int:
        """Cheap change detection for workers: one GET."""
        return int(self.client.get(self._version_key) or 0)

    def manifest(self) -> StoreManifest:
        raw = self.client.get(self._manifest_key)
        return StoreManifest.model_validate_json(raw) if raw else StoreManifest()

    def manifest_at(self, version: int) -> StoreManifest:
        raw = self.client.get(self._versioned_key(version))
        if raw is None:
            if 1 <= version < self._oldest(self.client):
                raise StoreError(f"manifest version {version} was garbage-collected")
            raise StoreError(f"no manifest version {version}")
        return StoreManifest.model_validate_json(raw)

    def applied(self, command_id: str) -> int | None:
        """The store version `command_id` produced, or None if no change carried that command id."""
        version = self.client.hget(self._commands_key, command_id)
        return None if version is None else int(version)

    def versions_by_command(self) -> dict[str, list[int]]:
        """Command id -> the kept store versions whose change it caused (one each, unless a command was
        carried out twice). Versions collected by the garbage collector are not listed."""
        manifests = self._stored_manifests(self.client, self.version())
        versions: dict[str, list[int]] = {}
        for version, manifest in sorted(manifests.items()):
            if manifest.command_id is not None:
                versions.setdefault(manifest.command_id, []).append(version)
        return versions

    def history(self, category: str) -> list[TaskEntry]:
        """The distinct entries (by task_version) `category` has had in the manifests still stored,
        oldest first; the current one last unless the category has since been removed."""
        return self._history(self._stored_manifests(self.client, self.version()), category)

    def _raw_blob(self, digest: str) -> bytes | None:
        return self.client.get(self._blob_key(digest))

    def dump(self, folder: Path) -> dict:
        """Copy the current manifest and every blob it references into `folder` (see the module's
        docstring), exactly the bytes Redis holds; returns what dump.json records. Blobs are read after the
        manifest and verified: garbage collection keeps a superseded version's blobs for its grace period."""
        raw = self.client.get(self._manifest_key)
        if raw is None:
            raise StoreError(f"nothing to dump: {self._manifest_key} is not set")
        manifest = StoreManifest.model_validate_json(raw)
        digests = sorted({d for entry in manifest.tasks.values() for d in entry.blobs.values()})
        folder = Path(folder)
        (folder / DUMP_BLOBS).mkdir(parents=True, exist_ok=True)
        (folder / DUMP_MANIFEST).write_bytes(raw)
        for digest in digests:
            (folder / DUMP_BLOBS / digest).write_bytes(self.blob(digest))
        index = {"format": 1, "namespace": self.namespace, "version": manifest.version,
                 "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                 "blobs": {d: (folder / DUMP_BLOBS / d).stat().st_size for d in digests}}
        (folder / DUMP_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def memory(self) -> StoreMemory:
        """Redis' used memory and its `maxmemory` (None when unbounded)."""
        info = self.client.info("memory")
        return StoreMemory(int(info["used_memory"]), int(info.get("maxmemory", 0)) or None)

    def task_sizes(self) -> dict[str, int]:
        return {name: entry.size_bytes for name, entry in self.manifest().tasks.items()}

    def size_report(self) -> dict[str, dict[str, int]]:
        """Per task: total bytes and bytes per part (keys, prompt, knowledge, expert arrays, calibration)."""
        return {name: {"total": e.size_bytes} | e.parts for name, e in self.manifest().tasks.items()}

    def _oldest(self, conn) -> int:
        return int(conn.get(self._oldest_key) or 1)

    def _stored_manifests(self, conn, current: int) -> dict[int, StoreManifest]:
        """Version -> manifest for every version from the oldest kept one to `current`."""
        versions = list(range(self._oldest(conn), current + 1))
        manifests: dict[int, StoreManifest] = {}
        for start in range(0, len(versions), MGET_CHUNK):
            chunk = versions[start:start + MGET_CHUNK]
            for version, raw in zip(chunk, conn.mget([self._versioned_key(v) for v in chunk])):
                if raw is not None:  # collected by a garbage collection that ran meanwhile
                    manifests[version] = StoreManifest.model_validate_json(raw)
        return manifests

    @staticmethod
    def _history(manifests: dict[int, StoreManifest], category: str) -> list[TaskEntry]:
        # An unchanged entry is carried by every later manifest; its task_version identifies it.
        entries: dict[int, TaskEntry] = {}
        for version in sorted(manifests):
            entry = manifests[version].tasks.get(category)
            if entry is not None:
                entries.setdefault(entry.task_version, entry)
        return [entries[v] for v in sorted(entries)]

    @staticmethod
    def _server_time(conn) -> datetime:
        """Redis's clock, so publishers on different hosts and the collector agree on "how long ago"."""
        seconds, micros = conn.time()
        return datetime.fromtimestamp(seconds + micros / 1e6, timezone.utc)

    # ----------------------------------------------------------------------------------- writes
    # `command_id`: the command causing the change. A command id already applied changes nothing and
    # returns the version it produced then, checked inside the transaction so two redeliveries racing
    # each other cannot both apply.
    def publish(self, task: TaskArtifacts, command_id: str | None = None) -> int:
        """Add or replace one task; returns the new store version."""
        blobs = task.blobs()
        digests = {kind: hashlib.sha256(data).hexdigest() for kind, data in blobs.items()}

        def change(manifest: StoreManifest, version: int, now: datetime, pipe):
            entry = TaskEntry(
                category=task.category,
                task_version=version,
                expert=task.expert_name,
                blobs=digests,
                blob_sizes={kind: len(data) for kind, data in blobs.items()},
                parts=task.parts(),
                published_at=now,
                command_id=command_id,
            )
            new_blobs = {digests[kind]: data for kind, data in blobs.items()}
            return {**manifest.tasks, task.category: entry}, new_blobs

        return self._transact(change, command_id)

    def remove(self, category: str, command_id: str | None = None) -> int:
        def change(manifest: StoreManifest, version: int, now: datetime, pipe):
            if category not in manifest.tasks:
                raise StoreError(f"unknown category {category!r}")
            return {name: e for name, e in manifest.tasks.items() if name != category}, {}

        return self._transact(change, command_id)

    def set_calibration(self, category: str, calibration: Calibration, command_id: str | None = None) -> int:
        """Replace one task's calibration blob (thresholds); its keys and expert stay as they are."""
        data = calibration.to_bytes()
        digest = hashlib.sha256(data).hexdigest()

        def change(manifest: StoreManifest, version: int, now: datetime, pipe):
            entry = manifest.tasks.get(category)
            if entry is None:
                raise StoreError(f"unknown category {category!r}")
            updated = entry.model_copy(
                update={
                    "task_version": version,
                    "blobs": {**entry.blobs, "calibration": digest},
                    "blob_sizes": {**entry.blob_sizes, "calibration": len(data)},
                    "parts": {**entry.parts, "calibration": len(data)},
                    "published_at": now,
                    "command_id": command_id,
                    "restored_from": None,  # new thresholds: no longer a copy of the version restored
                }
            )
            return {**manifest.tasks, category: updated}, {digest: data}

        return self._transact(change, command_id)

    def rollback(self, category: str, task_version: int, command_id: str | None = None) -> int:
        """Make `category`'s entry the one it had at `task_version` again: the same blobs, so the model
        is byte-identical, under a new task version (= the new store version) with `restored_from` set.
        Restores a category removed since. Raises StoreError, changing nothing, when that task version is
        unknown, its manifests were garbage-collected, or one of its blobs is gone."""

        def change(manifest: StoreManifest, version: int, now: datetime, pipe):
            entry = self._entry_at(pipe, category, task_version, version - 1)
            self._require_blobs(pipe, entry)
            restored = entry.model_copy(
                update={"task_version": version, "published_at": now, "command_id": command_id,
                        "restored_from": task_version}
            )
            return {**manifest.tasks, category: restored}, {}

        return self._transact(change, command_id)

    def _entry_at(self, pipe, category: str, task_version: int, current: int) -> TaskEntry:
        manifests = self._stored_manifests(pipe, current)
        history = {e.task_version: e for e in self._history(manifests, category)}
        if task_version in history:
            return history[task_version]
        what = f"cannot roll back {category!r} to task version {task_version}"
        if 1 <= task_version < self._oldest(pipe):
            raise StoreError(f"{what}: manifest version {task_version} was garbage-collected")
        raise StoreError(f"{what}: no such version of it is stored (stored: {sorted(history)})")

    def _require_blobs(self, pipe, entry: TaskEntry) -> None:
        """Rollback re-references blobs without rewriting them: watching them makes a garbage collection
        that deletes one before our EXEC abort this transaction (the retry then reports it gone)."""
        keys = {kind: self._blob_key(digest) for kind, digest in entry.blobs.items()}
        pipe.watch(*keys.values())
        for kind, key in keys.items():
            if not pipe.exists(key):
                raise StoreError(
                    f"cannot roll back {entry.category!r} to task version {entry.task_version}: "
                    f"its {kind} blob {entry.blobs[kind]} is gone"
                )

    def _transact(self, change, command_id: str | None = None) -> int:
        """Optimistic transaction: re-read and retry if another publisher got in between.

        `change(manifest, version, now, pipe)` runs before MULTI (it may read and WATCH through `pipe`)
        and returns the new tasks and the blobs to write (digest -> bytes, SET NX)."""
        from redis import WatchError  # the client's own library: a store always has one by now

        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._version_key)
                    if command_id is not None:
                        done = pipe.hget(self._commands_key, command_id)
                        if done is not None:
                            return int(done)
                    version = int(pipe.get(self._version_key) or 0) + 1
                    raw = pipe.get(self._manifest_key)
                    manifest = StoreManifest.model_validate_json(raw) if raw else StoreManifest()
                    now = self._server_time(pipe)
                    tasks, blobs = change(manifest, version, now, pipe)
                    new = StoreManifest(
                        version=version, tasks=tasks, command_id=command_id, published_at=now
                    ).model_dump_json()
                    pipe.multi()
                    for digest, data in blobs.items():
                        pipe.set(self._blob_key(digest), data, nx=True)
                    pipe.set(self._manifest_key, new)
                    pipe.set(self._versioned_key(version), new)
                    pipe.set(self._version_key, version)
                    if command_id is not None:
                        pipe.hset(self._commands_key, command_id, version)
                    pipe.publish(self.updates_channel, version)
                    pipe.execute()
                    return version
                except WatchError:
                    continue

    # --------------------------------------------------------------------------- garbage collection
    def collect_garbage(
        self, keep_versions: int = 20, grace_s: float = 300.0, now: datetime | None = None
    ) -> GarbageReport:
        """Delete old manifest versions and the blobs no retained version references.

        Kept: the current version, the newest `keep_versions` versions, and every version superseded
        less than `grace_s` seconds before `now` (its successor's commit time; default `now`: Redis's
        clock). Only the versions below the oldest kept one are collected, so a clock step between
        publishers can only keep more. Readers never miss a blob of a kept version: a worker that read
        the current manifest has at least `grace_s` seconds after it is superseded to load its blobs.
        A reader asking for a collected version gets StoreError "manifest version N was
        garbage-collected" from `manifest_at`; one still loading the entries of a manifest it read
        longer than `grace_s` before that manifest was superseded may get StoreError "blob ... is missing".

        The deletions run in one MULTI under WATCH on the version key (and on `oldest_version`, so two
        collectors do not interleave), retried if any change commits
        meanwhile, so a publish that re-references a blob (SET NX on a blob that exists writes nothing)
        is either seen by the plan or commits after the deletion and writes the blob again. Rollback,
        which re-references blobs without their bytes, WATCHes them instead. Command ids in
        `<ns>:commands` are kept (a few bytes each) so a redelivered old command is still recognised.
        """
        if keep_versions < 0 or grace_s < 0:
            raise ValueError("keep_versions and grace_s must be >= 0")
        from redis import WatchError

        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._version_key, self._oldest_key)  # also: one collector at a time
                    plan = self._plan_garbage(pipe, keep_versions, grace_s, now)
                    if not plan.versions:
                        return GarbageReport(manifests_deleted=0, blobs_deleted=0, bytes_freed=0,
                                             kept_versions=plan.kept_versions)
                    pipe.multi()
                    pipe.set(self._oldest_key, plan.keep_from)
                    pipe.delete(*[self._versioned_key(v) for v in plan.versions])
                    if plan.digests:
                        pipe.delete(*[self._blob_key(d) for d in plan.digests])
                    _, manifests_deleted, *blobs_deleted = pipe.execute()
                    return GarbageReport(manifests_deleted=manifests_deleted, blobs_deleted=sum(blobs_deleted),
                                         bytes_freed=plan.bytes_freed, kept_versions=plan.kept_versions)
                except WatchError:
                    continue

    def _plan_garbage(self, pipe, keep_versions: int, grace_s: float, now: datetime | None) -> _GarbagePlan:
        """The read half of a collection, on the watching `pipe` (immediate mode): what to delete."""
        current = int(pipe.get(self._version_key) or 0)
        manifests = self._stored_manifests(pipe, current)
        cutoff = (now or self._server_time(pipe)) - timedelta(seconds=grace_s)
        keep_from = self._keep_from(manifests, current, keep_versions, cutoff)
        doomed = sorted(v for v in manifests if v < keep_from)
        kept = sorted(v for v in manifests if v >= keep_from)
        referenced = {d for v in kept for e in manifests[v].tasks.values() for d in e.blobs.values()}
        digests = sorted({d for v in doomed for e in manifests[v].tasks.values() for d in e.blobs.values()}
                         - referenced)
        sizes = [pipe.strlen(self._blob_key(d)) for d in digests]  # 0 for a blob already gone
        return _GarbagePlan(keep_from, doomed, digests, sum(sizes), kept)

    @staticmethod
    def _keep_from(manifests: dict[int, StoreManifest], current: int, keep_versions: int, cutoff: datetime) -> int:
        """The oldest version the retention rule keeps; everything from it to `current` is kept."""
        keep_from = max(1, current - max(keep_versions, 1) + 1)  # the current version always counts
        for version in sorted(v for v in manifests if v < keep_from):
            successor = manifests.get(version + 1)
            if successor is None or successor.written_at() > cutoff:  # superseded within the grace period
                return version
        return keep_from


class DumpedStore(StoreReader):
    """Read-only store over a folder `KnowledgeStore.dump` wrote: the manifest must match the SHA-256 its
    index recorded, and every blob is verified against its digest when read. No Redis needed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index_path = self.folder / DUMP_INDEX
        if not index_path.is_file():
            raise StoreError(f"{index_path} is missing: not a store dump (KnowledgeStore.dump writes one)")
        self.index = json.loads(index_path.read_text())
        raw = (self.folder / DUMP_MANIFEST).read_bytes()
        if hashlib.sha256(raw).hexdigest() != self.index["manifest_sha256"]:
            raise StoreError(f"{self.folder / DUMP_MANIFEST} does not match the SHA-256 in {DUMP_INDEX}")
        self._manifest = StoreManifest.model_validate_json(raw)
        self.namespace = self.index["namespace"]

    def version(self) -> int:
        return self._manifest.version

    def manifest(self) -> StoreManifest:
        return self._manifest

    def _raw_blob(self, digest: str) -> bytes | None:
        if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            return None  # not a SHA-256: never a path
        path = self.folder / DUMP_BLOBS / digest
        return path.read_bytes() if path.is_file() else None
