"""The local stack's Prometheus, when its binary is installed: scrapes the workers every 2 s and evaluates
the alert rules of deploy/prometheus/alerts.yml.

    <state_dir>/prometheus/  prometheus.yml, targets.json (file_sd), data/, prometheus.pid, prometheus.log

Workers are scraped from targets.json, which `register_target` and `unregister_target` edit.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.common.local_files import write_atomically
from schemas.config import StackConfig
from tools.stack.processes import Server

ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


class PrometheusServer(Server):
    """The Prometheus of one `StackConfig`."""

    name = "prometheus"

    def __init__(self, config: StackConfig) -> None:
        super().__init__(config)
        self.ports = (config.prometheus_port,)
        self.markers = ("prometheus", str(self.home / "prometheus.yml"))
        self.logs = (self.home / "prometheus.log",)
        self.targets_file = self.home / "targets.json"  # the file_sd file it reads its scrape targets from

    @property
    def installed(self) -> bool:
        return shutil.which("prometheus") is not None

    @property
    def address(self) -> str | None:
        """Prometheus' base URL, or None when its binary is not installed."""
        if not self.installed:
            return None
        return f"http://{self.config.host}:{self.config.prometheus_port}"

    def command(self) -> list[str]:
        if not self.targets_file.exists():
            write_atomically(self.targets_file, b"[]\n")
        config = self.home / "prometheus.yml"
        config.write_text(self._config())
        return ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.home / 'data'}",
                f"--web.listen-address={self.config.host}:{self.config.prometheus_port}",
                "--storage.tsdb.retention.time=7d"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def register_target(self, name: str, host_port: str) -> None:
        """Scrape `host_port` (labelled worker=<name>); replaces an older entry."""
        self._edit_targets(lambda entries: [*_without(entries, name), _target(name, host_port)])

    def unregister_target(self, name: str) -> None:
        self._edit_targets(lambda entries: _without(entries, name))

    def _config(self) -> str:
        return (
            "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
            f"rule_files: [{json.dumps(str(ALERT_RULES))}]\n"
            "scrape_configs:\n  - job_name: inspection\n    file_sd_configs:\n"
            f"      - files: [{json.dumps(str(self.targets_file))}]\n        refresh_interval: 2s\n"
        )

    def _edit_targets(self, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        """Read-modify-write targets.json under a lock; Prometheus only ever sees a complete file."""
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.targets_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(self.targets_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                entries = []
            write_atomically(self.targets_file, (json.dumps(edit(entries), indent=2) + "\n").encode())


def _target(name: str, host_port: str) -> dict[str, Any]:
    return {"targets": [host_port], "labels": {"worker": name}}


def _without(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("labels", {}).get("worker") != name]
