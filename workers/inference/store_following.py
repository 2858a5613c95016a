"""Following the knowledge store beside the stream. A new store version is prepared on a thread of its own
(its tasks, experts and every backbone they need: Inspector.prepare) while the worker goes on serving the
version it has; the poll thread swaps the prepared snapshot in between two batches, whole. So a task
whose expert needs a backbone no other task used costs its first frame nothing extra, and polling never
waits for a load (the liveness watchdog keeps hearing from it)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from pipeline.core.inspector import Inspector, TaskSnapshot
from pipeline.core.store import KnowledgeStore
from workers.metrics import InferenceMetrics

log = logging.getLogger(__name__)


class StoreFollower:
    def __init__(self, inspector: Inspector, store: KnowledgeStore, metrics: InferenceMetrics, poll_interval_s: float):
        self.inspector = inspector
        self.store = store
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self._next_check = 0.0
        self._preparing: Future | None = None  # TaskSnapshot | None (the version was served meanwhile)
        # No frame is taken before the store was read once: a worker started while Redis is down would
        # otherwise answer every frame "unknown" (no task loaded), silently.
        self.read = False
        self._failing = False

    def follow(self) -> None:
        """On the poll thread, each turn of its loop: swap in a prepared version; every poll interval,
        ask the store for its version and start preparing a new one."""
        if self._preparing is not None and self._preparing.done():
            self._swap(self._preparing)
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.poll_interval_s
        if self._preparing is None:
            try:
                if self.store.version() != self.inspector.store_version:
                    self._preparing = self._prepare_in_background()
                else:
                    self._readable()
            except Exception:  # a store hiccup must not stop inference with the tasks already loaded
                self._unreadable()
        self._export()

    def preparing(self) -> bool:
        return self._preparing is not None

    def _prepare_in_background(self) -> Future:
        """A daemon thread: a worker told to stop does not wait for a version it will never serve."""
        prepared: Future = Future()

        def prepare() -> None:
            try:
                prepared.set_result(self.inspector.prepare(self.store))
            except BaseException as exc:
                prepared.set_exception(exc)

        threading.Thread(target=prepare, name="store-prepare", daemon=True).start()
        return prepared

    def _swap(self, prepared: Future) -> None:
        self._preparing = None
        try:
            snapshot: TaskSnapshot | None = prepared.result()
        except Exception:
            self._unreadable()
            return
        if snapshot is not None:
            self.inspector.use(snapshot)
        log.info("store version %d, reloaded %s", self.inspector.store_version,
                 (snapshot.changed if snapshot is not None else []) or "nothing")
        self._readable()
        self._export()

    def _readable(self) -> None:
        if self._failing:
            log.info("store readable again (version %d)", self.inspector.store_version)
        self.read, self._failing = True, False

    def _unreadable(self) -> None:
        if not self._failing:  # once per outage, not twice a second
            log.exception("store sync failed; serving store version %d until it answers",
                          self.inspector.store_version)
        self._failing = True

    def _export(self) -> None:
        self.metrics.tasks_known.set(len(self.inspector.tasks))
        self.metrics.store_version.set(self.inspector.store_version)
        self.metrics.set_false_alarm_targets(
            {name: task.artifacts.calibration.false_alarm_rate for name, task in self.inspector.tasks.items()})
