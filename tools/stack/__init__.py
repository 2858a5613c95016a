"""The local stack: Kafka (single KRaft node), Redis (AOF) and, if installed, Prometheus.

`LocalStack` starts, stops and describes the servers of one `StackConfig`, each from its own module:

    kafka_server.py       Kafka, its SASL/TLS listeners, SCRAM users, ACLs and topics
    redis_server.py       Redis, with its ACL file when auth is on
    prometheus_server.py  Prometheus, its scrape targets and alert rules
    processes.py          the servers' detached processes: pid files, launching, waiting, stopping

Each server keeps its files in its own folder under `state_dir`; the stack adds:

    <state_dir>/stack.json     the config of the last `up`, so `status` and `down` find the servers by folder alone
    <state_dir>/security.json  the SecurityConfig the servers were last started with
    <state_dir>/credentials/   <role>.json per role (workers/security.py), mode 0600, generated once, with auth

With `StackConfig.security.enabled` (off by default) the servers authenticate every client.

`up()`, `down()` and `status()` are idempotent and may be called from different processes: the pid
files, not Python objects, say what runs.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.common.local_files import write_atomically
from schemas.config import Credentials, SecurityConfig, StackConfig, TopicsConfig
from tools.stack.kafka_server import DEPLOY_DIR, KAFKA_VERSION, KafkaServer, cache_dir, ensure_kafka_jars
from tools.stack.processes import Server, ServerProcesses, StackError, write_private
from tools.stack.prometheus_server import ALERT_RULES, PrometheusServer
from tools.stack.redis_server import RedisServer
from workers import security

__all__ = ["ALERT_RULES", "DEPLOY_DIR", "KAFKA_VERSION", "STACK_FILE", "LocalStack", "StackError", "cache_dir",
           "ensure_kafka_jars", "remembered_config"]

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"


class LocalStack:
    """Start, stop and describe the local servers of one `StackConfig`."""

    def __init__(
        self,
        config: StackConfig | None = None,
        topics: TopicsConfig | None = None,
        *,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
        groups: Mapping[str, str] | None = None,
    ) -> None:
        config = config or StackConfig()
        # Absolute, so the pid files and server arguments do not depend on a later cwd.
        self.config = config.model_copy(update={"state_dir": config.state_dir.expanduser().resolve()})
        self.topics = topics or TopicsConfig()
        # Consumer group per role, for the ACLs (security.default_groups() unless the workers use others).
        self.groups = dict(groups) if groups is not None else security.default_groups()
        self._credentials: dict[str, Credentials] = {}  # role -> credentials, once up() has made them
        self.kafka = KafkaServer(self.config, self.topics, self.groups, self.credentials)
        self.redis = RedisServer(self.config, self.credentials)
        self.prometheus = PrometheusServer(self.config)
        self._processes = ServerProcesses(startup_timeout_s, stop_timeout_s)

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def auth(self) -> bool:
        """Whether this configuration runs the servers with authentication (see `status()['auth']`)."""
        return self.config.security.enabled

    @property
    def security_file(self) -> Path:
        return self.state_dir / "security.json"

    def credentials_file(self, role: str) -> Path:
        """The credentials file of `role` (set $INSPECTION_CREDENTIALS_FILE to it); exists once up() ran."""
        return security.credentials_file(self.state_dir, role)

    def credentials(self, role: str) -> Credentials:
        """`role`'s credentials of this auth-on stack, from its file."""
        if role not in self._credentials:
            self._credentials[role] = security.read_credentials_file(self.credentials_file(role))
        return self._credentials[role]

    @property
    def prometheus_url(self) -> str | None:
        """Prometheus' base URL, or None when its binary is not installed."""
        return self.prometheus.address

    def up(self) -> dict[str, Any]:
        """Start whatever is not running, wait until all are ready, create the topics.

        Returns `status()` plus `started` (names started by this call) and `seconds`.
        """
        began = time.monotonic()
        self._check_tools()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.state_dir / STACK_FILE, self.config.model_dump_json(indent=2))
        with self._lock():
            self._prepare_security()
            started: list[str] = []
            try:
                for server in self._servers():
                    if self._processes.live_pid(server) is None:
                        self._processes.launch(server)
                        started.append(server.name)
                for server in self._servers():  # they boot in parallel; now wait for each
                    self._processes.wait_ready(server)
                self.kafka.provision()
            except BaseException:
                for server in self._servers():  # leave nothing half-started behind
                    if server.name in started:
                        self._processes.stop(server)
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
                if self._processes.stop(server):
                    stopped.append(server.name)
            if wipe:
                self._wipe()
        return {**self.status(), "stopped": stopped}

    def kill(self, name: str) -> bool:
        """SIGKILL one server (a crash, for fault tests): no shutdown, no flush. `up()` starts it again."""
        server = next(s for s in self._servers(all_known=True) if s.name == name)
        return self._processes.kill(server)

    def status(self) -> dict[str, Any]:
        """What runs where, from the pid files (does not probe the servers).

        `running` is True when the required servers (Kafka and Redis) run; Prometheus is optional.
        `auth` says whether clients must authenticate (then `credentials` names each role's file).
        """
        servers = {}
        for server in self._servers(all_known=True):
            pid = self._processes.live_pid(server)
            servers[server.name] = {
                "running": pid is not None,
                "pid": pid,
                "address": server.address,
                "log": str(server.logs[0]),
            }
        servers["prometheus"]["installed"] = self.prometheus.installed
        running = all(s["running"] for name, s in servers.items() if name != "prometheus")
        # Running servers keep the security they were started with, whatever this object's config says.
        auth = self._security_in_use(servers).enabled
        return {
            "state_dir": str(self.state_dir),
            "bootstrap_servers": self.config.bootstrap_servers,
            "redis_url": self.config.redis_url,
            "prometheus_url": self.prometheus_url,
            "running": running,
            "auth": auth,
            "credentials": {role: str(self.credentials_file(role)) for role in security.ROLES} if auth else {},
            "servers": servers,
        }

    def register_metrics_target(self, name: str, host_port: str) -> None:
        """Ask Prometheus to scrape `host_port` (labelled worker=<name>); replaces an older entry."""
        self.prometheus.register_target(name, host_port)

    def unregister_metrics_target(self, name: str) -> None:
        self.prometheus.unregister_target(name)

    def _servers(self, all_known: bool = False) -> list[Server]:
        """Kafka, Redis and Prometheus: the latter only when installed, unless `all_known`."""
        servers: list[Server] = [self.kafka, self.redis]
        if self.prometheus.installed or all_known:
            servers.append(self.prometheus)
        return servers

    def _security_in_use(self, servers: Mapping[str, Mapping[str, Any]]) -> SecurityConfig:
        """The recorded security of running Kafka/Redis servers; this object's config when none runs."""
        if not any(servers[name]["running"] for name in ("kafka", "redis")):
            return self.config.security
        try:
            return SecurityConfig.model_validate_json(self.security_file.read_text())
        except FileNotFoundError:
            return SecurityConfig()  # started before the stack knew about security: no auth
        except ValueError as error:
            raise StackError(f"{self.security_file} is damaged ({error}); `down` and `up` the stack again") from None

    def _prepare_security(self) -> None:
        """Refuse to mix security settings with running servers; make the credential (and TLS) files."""
        servers = {s.name: {"running": self._processes.live_pid(s) is not None}
                   for s in self._servers(all_known=True)}
        in_use = self._security_in_use(servers)
        if in_use != self.config.security:
            raise StackError(f"the stack in {self.state_dir} runs with security {in_use.model_dump()}, not "
                             f"{self.config.security.model_dump()}: `down` it first, or start it as it is")
        if self.auth:
            sec = self.config.security
            cafile = self.kafka.ensure_certificate() if sec.tls else None
            protocol = "SASL_SSL" if sec.tls else "SASL_PLAINTEXT"
            self._credentials = security.ensure_credentials_files(self.state_dir, sec.mechanism, protocol, cafile)
        write_atomically(self.security_file, (self.config.security.model_dump_json() + "\n").encode())

    def _check_tools(self) -> None:
        if shutil.which("java") is None:
            raise StackError("`java` not found: Kafka 4.1 needs Java 17+ "
                             "(apt-get install openjdk-17-jre-headless)")
        if shutil.which("redis-server") is None:
            raise StackError("`redis-server` not found: apt-get install redis-server")
        if self.auth and self.config.security.tls and shutil.which("openssl") is None:
            raise StackError("`openssl` not found: it makes the broker's TLS certificate (apt-get install openssl)")
        if not self.prometheus.installed:
            log.info("prometheus not installed: metrics are not scraped (apt-get install prometheus)")

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise up/down of the same state_dir across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _wipe(self) -> None:
        for name in ("kafka", "redis", "prometheus", "credentials", "tls"):
            shutil.rmtree(self.state_dir / name, ignore_errors=True)
        self.security_file.unlink(missing_ok=True)
        (self.state_dir / STACK_FILE).unlink(missing_ok=True)
        (self.state_dir / ".lock").unlink(missing_ok=True)
        try:
            self.state_dir.rmdir()  # only if nothing else lives there
        except OSError:
            pass
        log.info("wiped the stack's data in %s", self.state_dir)


def remembered_config(state_dir: Path) -> StackConfig | None:
    """The config a stack in `state_dir` was last brought up with (its ports), if any."""
    try:
        return StackConfig.model_validate_json((state_dir.expanduser() / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None
