"""The local stack: Kafka (single KRaft node), Redis (AOF) and, if installed, Prometheus.

Each server runs as a detached process (its own session, so it outlives the command that started
it and ignores that terminal's Ctrl-C) with a pid file and a log file under `state_dir`:

    <state_dir>/kafka/       server.properties, data/, kafka.pid, kafka.out (JVM), server.log (log4j)
    <state_dir>/redis/       appendonlydir/ (AOF), redis.pid, redis.log
    <state_dir>/prometheus/  prometheus.yml, targets.json (file_sd), data/, prometheus.pid, prometheus.log

`up()`, `down()` and `status()` are idempotent and may be called from different processes: the pid
files, not Python objects, say what runs. A pid file whose process is gone (or is now some other
program) is stale and ignored.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaAdminClient

from pipeline.common.local_files import cache_root, write_atomically
from schemas.config import StackConfig, TopicsConfig
from workers.kafka_io import ensure_topics

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"


class StackError(RuntimeError):
    """A server could not be started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class _Server:
    """What the stack knows about one server process."""

    name: str
    ports: tuple[int, ...]  # every port it listens on
    home: Path  # its directory under state_dir
    markers: tuple[str, ...]  # substrings of /proc/<pid>/cmdline that identify our process
    ready: Callable[[], bool]
    logs: tuple[Path, ...]  # quoted on failure, last first

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"


def cache_dir() -> Path:
    """Where the Kafka jars are cached once per machine ($INSPECTION_CACHE_DIR replaces the base)."""
    return cache_root() / f"kafka-{KAFKA_VERSION}"


def ensure_kafka_jars(target: Path | None = None, pom: Path = DEPLOY_DIR / "pom.xml") -> Path:
    """The folder of Kafka broker jars, resolved with Maven into the cache the first time."""
    libs = (target or cache_dir()) / "libs"
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            f"Kafka jars are not cached in {libs} and `mvn` is not installed to fetch them: "
            "apt-get install maven (needed once; the jars come from Maven Central)"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    # Resolve into a private folder and rename it, so an interrupted download is never used.
    partial = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=libs.parent))
    log.info("fetching Kafka %s jars with Maven into %s (once)", KAFKA_VERSION, libs)
    command = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise StackError(f"mvn could not fetch the Kafka jars:\n{_last_lines(done.stdout + done.stderr)}")
    try:
        partial.rename(libs)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return libs


class LocalStack:
    """Start, stop and describe the local servers of one `StackConfig`."""

    def __init__(
        self,
        config: StackConfig | None = None,
        topics: TopicsConfig | None = None,
        *,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        config = config or StackConfig()
        # Absolute, so the pid files and server arguments do not depend on a later cwd.
        self.config = config.model_copy(update={"state_dir": config.state_dir.expanduser().resolve()})
        self.topics = topics or TopicsConfig()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started by this object, to reap

    # ------------------------------------------------------------------------------ public API
    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def prometheus_installed(self) -> bool:
        return shutil.which("prometheus") is not None

    @property
    def prometheus_url(self) -> str | None:
        """Prometheus' base URL, or None when its binary is not installed."""
        if not self.prometheus_installed:
            return None
        return f"http://{self.config.host}:{self.config.prometheus_port}"

    @property
    def targets_file(self) -> Path:
        """The file_sd file Prometheus reads its scrape targets from."""
        return self.state_dir / "prometheus" / "targets.json"

    def up(self) -> dict[str, Any]:
        """Start whatever is not running, wait until all are ready, create the topics.

        Returns `status()` plus `started` (names started by this call) and `seconds`.
        """
        began = time.monotonic()
        self._check_tools()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            started: list[str] = []
            try:
                for server in self._servers():
                    if self._live_pid(server) is None:
                        self._launch(server)
                        started.append(server.name)
                for server in self._servers():  # they boot in parallel; now wait for each
                    self._wait_ready(server)
                ensure_topics(self.config.bootstrap_servers, self.topics)
            except BaseException:
                for server in self._servers():  # leave nothing half-started behind
                    if server.name in started:
                        self._stop(server)
                raise
        if not started:
            log.info("stack already up in %s", self.state_dir)
        return {**self.status(), "started": started, "seconds": round(time.monotonic() - began, 2)}

    def down(self, wipe: bool = False) -> dict[str, Any]:
        """Stop every server of this stack (SIGTERM, then SIGKILL); `wipe` also deletes their data."""
        stopped: list[str] = []
        if not self.state_dir.exists():
            return {**self.status(), "stopped": stopped}
        with self._lock():
            for server in reversed(self._servers(all_known=True)):
                if self._stop(server):
                    stopped.append(server.name)
            if wipe:
                self._wipe()
        return {**self.status(), "stopped": stopped}

    def status(self) -> dict[str, Any]:
        """What runs where, from the pid files (does not probe the servers).

        `running` is True when the required servers (Kafka and Redis) run; Prometheus is optional.
        """
        urls = {
            "kafka": self.config.bootstrap_servers,
            "redis": self.config.redis_url,
            "prometheus": self.prometheus_url,
        }
        servers = {}
        for server in self._servers(all_known=True):
            pid = self._live_pid(server)
            servers[server.name] = {
                "running": pid is not None,
                "pid": pid,
                "address": urls[server.name],
                "log": str(server.logs[0]),
            }
        servers["prometheus"]["installed"] = self.prometheus_installed
        return {
            "state_dir": str(self.state_dir),
            "bootstrap_servers": self.config.bootstrap_servers,
            "redis_url": self.config.redis_url,
            "prometheus_url": self.prometheus_url,
            "running": all(s["running"] for name, s in servers.items() if name != "prometheus"),
            "servers": servers,
        }

    def register_metrics_target(self, name: str, host_port: str) -> None:
        """Ask Prometheus to scrape `host_port` (labelled worker=<name>); replaces an older entry."""
        self._edit_targets(lambda entries: [*_without(entries, name), _target(name, host_port)])

    def unregister_metrics_target(self, name: str) -> None:
        self._edit_targets(lambda entries: _without(entries, name))

    # ------------------------------------------------------------------------------ the servers
    def _servers(self, all_known: bool = False) -> list[_Server]:
        """Kafka, Redis and Prometheus: the latter only when installed, unless `all_known`."""
        servers = [self._kafka(), self._redis()]
        if self.prometheus_installed or all_known:
            servers.append(self._prometheus())
        return servers

    def _kafka(self) -> _Server:
        home = self.state_dir / "kafka"
        return _Server(
            name="kafka",
            ports=(self.config.kafka_port, self.config.kafka_controller_port),
            home=home,
            markers=("kafka.Kafka", str(home / "server.properties")),
            ready=self._kafka_ready,
            logs=(home / "server.log", home / "kafka.out"),
        )

    def _redis(self) -> _Server:
        home = self.state_dir / "redis"
        return _Server(
            name="redis",
            ports=(self.config.redis_port,),
            home=home,
            # redis-server rewrites its command line to "redis-server <host>:<port>".
            markers=("redis-server", str(self.config.redis_port)),
            ready=self._redis_ready,
            logs=(home / "redis.log",),
        )

    def _prometheus(self) -> _Server:
        home = self.state_dir / "prometheus"
        return _Server(
            name="prometheus",
            ports=(self.config.prometheus_port,),
            home=home,
            markers=("prometheus", str(home / "prometheus.yml")),
            ready=self._prometheus_ready,
            logs=(home / "prometheus.log",),
        )

    def _command(self, server: _Server) -> list[str]:
        """Write the server's config files and return its command line."""
        server.home.mkdir(parents=True, exist_ok=True)
        if server.name == "kafka":
            return self._kafka_command(server.home)
        if server.name == "redis":
            return self._redis_command(server.home)
        return self._prometheus_command(server.home)

    def _kafka_command(self, home: Path) -> list[str]:
        libs = ensure_kafka_jars()
        properties = home / "server.properties"
        properties.write_text(self._kafka_properties(home / "data"))
        if not (home / "data" / "meta.properties").exists():
            self._format_kafka_storage(libs, properties)
        jvm = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
        return [*_java(libs, home / "server.log", jvm), "kafka.Kafka", str(properties)]

    def _kafka_properties(self, data_dir: Path) -> str:
        c, t = self.config, self.topics
        # Broker-wide limits must admit a full-size record plus batch and request overhead.
        request_max = max(100 * 1024 * 1024, 2 * t.max_message_bytes)
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{c.host}:{c.kafka_controller_port}",
            "listeners": f"PLAINTEXT://{c.host}:{c.kafka_port},CONTROLLER://{c.host}:{c.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://{c.host}:{c.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data_dir),
            "offsets.topic.replication.factor": "1",
            # 50 partitions (the default) make the first consumer group join slow on a small machine.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created explicitly with their partitions and limits (kafka_io.ensure_topics).
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(t.max_message_bytes),
            "replica.fetch.max.bytes": str(t.max_message_bytes),
            "socket.request.max.bytes": str(request_max),
            "fetch.max.bytes": str(max(57671680, t.max_message_bytes)),
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _format_kafka_storage(self, libs: Path, properties: Path) -> None:
        """Format the KRaft metadata log once, with a fresh cluster id."""
        # Its own log file, so the broker's log tail quoted on errors is the broker's alone.
        java = _java(libs, properties.parent / "format.log")
        command = [*java, "kafka.tools.StorageTool", "format", "-t", _kafka_cluster_id(), "-c", str(properties)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{_last_lines(done.stdout + done.stderr)}")

    def _redis_command(self, home: Path) -> list[str]:
        c = self.config
        return ["redis-server", "--port", str(c.redis_port), "--bind", c.host, "--dir", str(home),
                "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "yes"]

    def _prometheus_command(self, home: Path) -> list[str]:
        if not self.targets_file.exists():
            write_atomically(self.targets_file, b"[]\n")
        config = home / "prometheus.yml"
        config.write_text(self._prometheus_config())
        return ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address={self.config.host}:{self.config.prometheus_port}",
                "--storage.tsdb.retention.time=7d"]

    def _prometheus_config(self) -> str:
        return (
            "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
            "scrape_configs:\n  - job_name: inspection\n    file_sd_configs:\n"
            f"      - files: [{json.dumps(str(self.targets_file))}]\n        refresh_interval: 2s\n"
        )

    # ------------------------------------------------------------------------------ readiness
    def _kafka_ready(self) -> bool:
        if not _port_open(self.config.host, self.config.kafka_port):
            return False
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.config.bootstrap_servers,
                                     client_id="inspection-stack", request_timeout_ms=5000,
                                     bootstrap_timeout_ms=5000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def _redis_ready(self) -> bool:
        client = redis.Redis(host=self.config.host, port=self.config.redis_port,
                             socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _prometheus_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------------------ processes
    def _check_tools(self) -> None:
        if shutil.which("java") is None:
            raise StackError("`java` not found: Kafka 4.1 needs Java 17+ "
                             "(apt-get install openjdk-17-jre-headless)")
        if shutil.which("redis-server") is None:
            raise StackError("`redis-server` not found: apt-get install redis-server")
        if not self.prometheus_installed:
            log.info("prometheus not installed: metrics are not scraped (apt-get install prometheus)")

    def _launch(self, server: _Server) -> None:
        for port in server.ports:
            if _port_open(self.config.host, port):
                raise StackError(
                    f"{server.name}: {self.config.host}:{port} is already in use by a process this stack did "
                    f"not start (no live pid in {server.pid_file}); stop it or configure another port"
                )
        command = self._command(server)
        with open(server.logs[-1], "ab") as out:
            process = subprocess.Popen(command, cwd=server.home, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self._children[process.pid] = process
        server.pid_file.write_text(f"{process.pid}\n")
        log.info("started %s (pid %d), log %s", server.name, process.pid, server.logs[0])

    def _wait_ready(self, server: _Server) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        first_pid = self._live_pid(server)
        while not server.ready():
            pid = self._live_pid(server)
            if pid is None:
                raise StackError(f"{server.name} {self._why_gone(first_pid)}.\n{self._log_tails(server)}")
            if time.monotonic() > deadline:
                raise StackError(
                    f"{server.name} (pid {pid}) not ready after {self.startup_timeout_s:.0f}s.\n"
                    f"{self._log_tails(server)}"
                )
            time.sleep(0.25)

    def _stop(self, server: _Server) -> bool:
        """SIGTERM the server's process group, SIGKILL it if it lingers. False if it was not running."""
        pid = self._live_pid(server)
        if pid is None:
            return False
        log.info("stopping %s (pid %d)", server.name, pid)
        _signal_group(pid, signal.SIGTERM)
        if not self._wait_gone(pid, self.stop_timeout_s):
            log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", server.name, pid, self.stop_timeout_s)
            _signal_group(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 10.0):
                raise StackError(f"{server.name} (pid {pid}) survived SIGKILL")
        server.pid_file.unlink(missing_ok=True)
        return True

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        self._children.pop(pid, None)
        return True

    def _live_pid(self, server: _Server) -> int | None:
        """The pid in the server's pid file if that process still runs and is ours; clears stale files."""
        try:
            pid = int(server.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        # A child of this object is certainly ours; any other pid may have been reused since.
        if self._alive(pid) and (pid in self._children or _cmdline_has(pid, server.markers)):
            return pid
        log.info("removing stale pid file %s (pid %d is gone)", server.pid_file, pid)
        server.pid_file.unlink(missing_ok=True)
        return None

    def _alive(self, pid: int) -> bool:
        """Whether `pid` runs; reaps our own exited children so they do not linger as zombies."""
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        return _pid_alive(pid)

    def _why_gone(self, pid: int | None) -> str:
        """Why a server that was starting no longer counts as running, for the error message."""
        child = self._children.get(pid) if pid is not None else None
        if child is not None and child.returncode is not None:
            return f"(pid {pid}) exited with code {child.returncode} while starting"
        if pid is not None and _pid_alive(pid):
            return f"(pid {pid}) no longer looks like this server: {_cmdline(pid)!r}"
        return f"(pid {pid}) is gone"

    def _log_tails(self, server: _Server) -> str:
        parts = [f"--- tail of {path} ---\n{_last_lines(path.read_text(errors='replace'))}"
                 for path in server.logs if path.exists()]
        return "\n".join(parts) or f"(no log written in {server.home})"

    # ------------------------------------------------------------------------------ files
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise up/down of the same state_dir across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _wipe(self) -> None:
        for name in ("kafka", "redis", "prometheus"):
            shutil.rmtree(self.state_dir / name, ignore_errors=True)
        (self.state_dir / ".lock").unlink(missing_ok=True)
        try:
            self.state_dir.rmdir()  # only if nothing else lives there
        except OSError:
            pass
        log.info("wiped the stack's data in %s", self.state_dir)

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


# ---------------------------------------------------------------------------------- helpers
def _target(name: str, host_port: str) -> dict[str, Any]:
    return {"targets": [host_port], "labels": {"worker": name}}


def _without(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("labels", {}).get("worker") != name]


def _java(libs: Path, log_file: Path, options: list[str] | None = None) -> list[str]:
    """A java command line up to the main class, logging through deploy/kafka's log4j2 config."""
    return [shutil.which("java") or "java", *(options or []),
            f"-Dlog4j2.configurationFile={DEPLOY_DIR / 'log4j2.properties'}",
            f"-Dkafka.log.file={log_file}", "-cp", f"{libs}/*"]


def _kafka_cluster_id() -> str:
    """What `StorageTool random-uuid` prints (22 chars of base64url), without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids ids that look like a command-line option
            return text


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a zombie has exited; only its parent can reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str | None:
    """The process' command line; None if it is gone. Raises OSError where /proc is missing."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return None


def _cmdline_has(pid: int, markers: tuple[str, ...]) -> bool:
    """Whether the process' command line contains every marker (guards against reused pids)."""
    try:
        cmdline = _cmdline(pid)
        # A process in the middle of exec() shows an empty command line for a few milliseconds.
        for _ in range(50):
            if cmdline != "":
                break
            time.sleep(0.01)
            cmdline = _cmdline(pid)
    except OSError:
        return True  # no /proc to check against: trust the pid file
    if cmdline == "":
        return True  # still unreadable: trust the pid file rather than orphan a server
    return cmdline is not None and all(marker in cmdline for marker in markers)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the server's whole process group (it leads its own session) or, failing that, the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _last_lines(text: str, count: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])
