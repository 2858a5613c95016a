"""Forgetting monitor: after every store version change, every task's audit set through the live path.

It reads the store (read-only, like an inference worker), keeps an Inspector of its own and, on each new
store version, scores every task's audit set with `pipeline.core.audit.AuditMonitor`: routing for all
frames, experts only where a task or a frame's routing changed. It exports the values and the
forgetting per category and metric. No Kafka: its inputs are the store's versions, its outputs metrics.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.core.audit import AuditMonitor
from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from workers.metrics import MonitorMetrics

log = logging.getLogger(__name__)


class MonitorWorker:
    def __init__(self, inspector: Inspector, store: KnowledgeStore, metrics: MonitorMetrics, worker_id: str,
                 poll_interval_s: float = 1.0):
        self.inspector = inspector
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.poll_interval_s = poll_interval_s
        self.audit = AuditMonitor()

    def run(self, stop: threading.Event) -> None:
        log.info("monitor %s following the store", self.worker_id)
        while not stop.wait(self.poll_interval_s):
            try:
                if self.store.version() != self.inspector.store_version:
                    self.check()
            except Exception:  # a store hiccup or a broken task must not end the monitor
                log.exception("audit pass failed; trying again at the next store version")
                time.sleep(5 * self.poll_interval_s)

    def check(self) -> None:
        """Bring the tasks to the store's version, score every audit set, export."""
        started = time.perf_counter()
        changed = self.inspector.sync(self.store)
        reports = self.audit.score(self.inspector)
        seconds = time.perf_counter() - started
        self.metrics.publish(reports)
        self.metrics.store_version.set(self.inspector.store_version)
        self.metrics.pass_seconds.observe(seconds)
        for report in reports:
            worst = max(report.forgetting.values(), default=0.0)
            log.info("store version %d, %s v%d: %s; forgetting max %.4f (%d of %d frames through an expert)",
                     self.inspector.store_version, report.category, report.task_version,
                     ", ".join(f"{k} {v:.4f}" for k, v in report.values.items()), worst,
                     report.expert_frames_run, report.frames)
        log.info("audit pass of store version %d in %.1f s (reloaded %s)", self.inspector.store_version, seconds,
                 changed or "nothing")
