"""Worker processes started by the demo and the tests: spawn, watch through metrics, stop or kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

_REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free right now (all held open together so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class WorkerProcess:
    name: str
    kind: str
    metrics_port: int
    log_path: Path
    popen: subprocess.Popen

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def child_pid(self) -> int | None:
        """The worker itself, under its supervisor (None between two restarts, or when unsupervised)."""
        try:
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def metric(self, name: str) -> float | None:
        """Sum of a metric's samples (all labels), or None while the endpoint is not up."""
        values = [value for _labels, value in self.samples(name)]
        return sum(values) if values else None

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of metric `name` with its labels ([] while the endpoint is not up)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return []
        return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name]

    def stop(self, timeout_s: float = 60.0) -> int:
        """Graceful: SIGTERM lets the worker finish and commit its batch."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL: no chance to commit or flush anything (used to test at-least-once delivery)."""
        if self.alive():
            self.popen.kill()
        return self.popen.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn_worker(
    kind: str,
    name: str,
    bootstrap: str,
    redis_url: str,
    log_dir: Path,
    threads: int = 0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start `inspection worker <kind>` as a child process logging to `log_dir/<name>.log`.

    `env` adds to this process' environment, e.g. `security.credentials_env(state_dir, role)`: secrets
    reach a worker through its environment, never its command line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / f"{name}.log"
    command = [
        sys.executable, "-m", "workers.cli", "worker", kind, "--worker-id", name, "--metrics-port", str(port),
        "--bootstrap", bootstrap, "--redis-url", redis_url, "--threads", str(threads), *extra_args,
    ]
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=_REPO_ROOT, env=env)
    return WorkerProcess(name, kind, port, log_path, popen)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def wait_for_store_version(workers: list[WorkerProcess], version: int, timeout_s: float = 120.0) -> None:
    """Until every worker reports (through its metrics) that it serves `version` or later."""

    def caught_up() -> bool:
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.log_tail()}")
            served = worker.metric("inspection_store_version")
            if served is None or served < version:
                return False
        return True

    wait_until(caught_up, timeout_s, what=f"workers to serve store version {version}")
