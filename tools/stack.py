"""The local stack: Kafka (single KRaft node), Redis (AOF) and, if installed, Prometheus.

Each server runs as a detached process (its own session, so it outlives the command that started
it and ignores that terminal's Ctrl-C) with a pid file and a log file under `state_dir`:

    <state_dir>/kafka/       server.properties, data/, kafka.pid, kafka.out (JVM), server.log (log4j)
    <state_dir>/redis/       appendonlydir/ (AOF), redis.pid, redis.log
    <state_dir>/prometheus/  prometheus.yml, targets.json (file_sd), data/, prometheus.pid, prometheus.log

With `StackConfig.security.enabled` (off by default) the servers authenticate every client:

    <state_dir>/credentials/ <role>.json per role (workers/security.py), mode 0600, generated once
    <state_dir>/tls/         cert.pem (the clients' CA file), keystore.pem (key + cert), with `security.tls`
    <state_dir>/security.json  the SecurityConfig the servers were last started with

Kafka's client port then takes SASL/SCRAM (SASL_PLAINTEXT, or SASL_SSL with `tls`) and authorises
each request against the role ACLs of workers/security.py; its controller port (loopback, never
used by clients) takes SASL/PLAIN as the admin user. Redis admits only its ACL users (`--aclfile`).

`up()`, `down()` and `status()` are idempotent and may be called from different processes: the pid
files, not Python objects, say what runs. A pid file whose process is gone (or is now some other
program) is stale and ignored.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaAdminClient
from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePatternFilter
from kafka.admin import ResourceType, UserScramCredentialUpsertion

from pipeline.common.local_files import cache_root, write_atomically
from schemas.config import Credentials, SecurityConfig, StackConfig, TopicsConfig
from workers import security
from workers.kafka_io import ensure_topics

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
STACK_FILE = "stack.json"  # the config of the last `up`, so `status` and `down` find the servers by folder alone
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"
ALERT_RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"
# Every user gets both mechanisms, so changing SecurityConfig.mechanism needs no new users.
_SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_ITERATIONS = 8192  # Kafka accepts 4096..16384


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
        groups: Mapping[str, str] | None = None,
    ) -> None:
        config = config or StackConfig()
        # Absolute, so the pid files and server arguments do not depend on a later cwd.
        self.config = config.model_copy(update={"state_dir": config.state_dir.expanduser().resolve()})
        self.topics = topics or TopicsConfig()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # Consumer group per role, for the ACLs (security.default_groups() unless the workers use others).
        self.groups = dict(groups) if groups is not None else security.default_groups()
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started by this object, to reap
        self._credentials: dict[str, Credentials] = {}  # role -> credentials, once up() has made them

    # ------------------------------------------------------------------------------ public API
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
        _write_private(self.state_dir / STACK_FILE, self.config.model_dump_json(indent=2))
        with self._lock():
            self._prepare_security()
            started: list[str] = []
            try:
                for server in self._servers():
                    if self._live_pid(server) is None:
                        self._launch(server)
                        started.append(server.name)
                for server in self._servers():  # they boot in parallel; now wait for each
                    self._wait_ready(server)
                self._provision_kafka()
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

    def kill(self, name: str) -> bool:
        """SIGKILL one server (a crash, for fault tests): no shutdown, no flush. `up()` starts it again."""
        server = next(s for s in self._servers(all_known=True) if s.name == name)
        pid = self._live_pid(server)
        if pid is None:
            return False
        _signal_group(pid, signal.SIGKILL)
        if not self._wait_gone(pid, 10.0):
            raise StackError(f"{name} (pid {pid}) survived SIGKILL")
        server.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, Any]:
        """What runs where, from the pid files (does not probe the servers).

        `running` is True when the required servers (Kafka and Redis) run; Prometheus is optional.
        `auth` says whether clients must authenticate (then `credentials` names each role's file).
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
        self._edit_targets(lambda entries: [*_without(entries, name), _target(name, host_port)])

    def unregister_metrics_target(self, name: str) -> None:
        self._edit_targets(lambda entries: _without(entries, name))

    # ------------------------------------------------------------------------------ security
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
        servers = {s.name: {"running": self._live_pid(s) is not None} for s in self._servers(all_known=True)}
        in_use = self._security_in_use(servers)
        if in_use != self.config.security:
            raise StackError(f"the stack in {self.state_dir} runs with security {in_use.model_dump()}, not "
                             f"{self.config.security.model_dump()}: `down` it first, or start it as it is")
        if self.auth:
            sec = self.config.security
            cafile = _ensure_tls_files(self.state_dir / "tls") if sec.tls else None
            protocol = "SASL_SSL" if sec.tls else "SASL_PLAINTEXT"
            self._credentials = security.ensure_credentials_files(self.state_dir, sec.mechanism, protocol, cafile)
        write_atomically(self.security_file, (self.config.security.model_dump_json() + "\n").encode())

    def _admin_options(self) -> dict[str, Any]:
        """kafka-python options of the stack's own admin connections (empty when auth is off)."""
        return security.kafka_client_options(self.credentials(security.ADMIN)) if self.auth else {}

    def _provision_kafka(self) -> None:
        """Topics and, with auth, the roles' SCRAM users and ACLs. Idempotent."""
        if not self.auth:
            ensure_topics(self.config.bootstrap_servers, self.topics)
            return
        admin = KafkaAdminClient(bootstrap_servers=self.config.bootstrap_servers, client_id="inspection-admin",
                                 **self._admin_options())
        try:
            ensure_topics(self.config.bootstrap_servers, self.topics, **self._admin_options())
            self._upsert_scram_users(admin)
            self._sync_acls(admin)
        finally:
            admin.close()

    def _upsert_scram_users(self, admin: KafkaAdminClient) -> None:
        """Every role's user, with both SCRAM mechanisms (the admin's came with the storage format).

        Done on every up(), so a credentials file that was replaced takes effect on the next start."""
        for mechanism in _SCRAM_MECHANISMS:  # one request per mechanism: a request may alter a user once
            upserts = [UserScramCredentialUpsertion(creds.username, mechanism, creds.password.get_secret_value(),
                                                    iterations=_SCRAM_ITERATIONS)
                       for role, creds in self._credentials.items() if role != security.ADMIN]
            failed = {user: error for user, error in admin.alter_user_scram_credentials(upserts).items() if error}
            if failed:
                raise StackError(f"Kafka refused the {mechanism} users: {failed}")

    def _sync_acls(self, admin: KafkaAdminClient) -> None:
        """Make the broker's ACLs exactly security.kafka_acls(): add the missing, delete any other."""
        wanted = set(security.kafka_acls(self.topics, self.groups))
        everything = ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                               permission_type=ACLPermissionType.ANY,
                               resource_pattern=ResourcePatternFilter(ResourceType.ANY, None,
                                                                      ACLResourcePatternType.ANY))
        existing, _ = admin.describe_acls(everything)  # raises on an error
        stale = [acl for acl in existing if acl not in wanted]
        if stale:
            log.info("deleting %d ACLs that are no longer in the table", len(stale))
            admin.delete_acls(stale)
        missing = [acl for acl in wanted if acl not in set(existing)]
        if missing:
            failed = admin.create_acls(missing)["failed"]
            if failed:
                raise StackError(f"Kafka refused {len(failed)} ACLs: {failed}")

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
        _write_private(properties, self._kafka_properties(home / "data"))  # with auth, it holds a password
        if not (home / "data" / "meta.properties").exists():
            self._format_kafka_storage(libs, properties)
        elif self.auth:
            self._check_admin_bootstrapped(home)
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
            # A killed worker's open transaction is aborted within a second of its timeout (default: 10 s
            # scan), so read_committed readers stall at most transaction_timeout_ms + 1 s.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
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
        if self.auth:
            settings.update(self._kafka_security_settings())
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _kafka_security_settings(self) -> dict[str, str]:
        """SASL on both listeners, the StandardAuthorizer, and the admin as the only super user."""
        c, sec = self.config, self.config.security
        admin = self.credentials(security.ADMIN)
        user, password = admin.username, admin.password.get_secret_value()
        name = "SASL_SSL" if sec.tls else "SASL_PLAINTEXT"  # the clients' listener, named after its protocol
        # The broker's JAAS entries: the password is what it logs in with to itself (inter-broker and
        # controller connections); user_<name> is the controller's static PLAIN user list.
        scram = (f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{user}" '
                 f'password="{password}";')
        plain = (f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{user}" '
                 f'password="{password}" user_{user}="{password}";')
        settings = {
            "listeners": f"{name}://{c.host}:{c.kafka_port},CONTROLLER://{c.host}:{c.kafka_controller_port}",
            "advertised.listeners": f"{name}://{c.host}:{c.kafka_port}",
            "inter.broker.listener.name": name,
            "listener.security.protocol.map": f"{name}:{name},CONTROLLER:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": ",".join(_SCRAM_MECHANISMS),
            "sasl.mechanism.inter.broker.protocol": sec.mechanism,
            **{f"listener.name.{name.lower()}.{m.lower()}.sasl.jaas.config": scram for m in _SCRAM_MECHANISMS},
            # SCRAM users live in the metadata log, which the controller serves: it cannot depend on
            # them itself. PLAIN, not an anonymous PLAINTEXT port: a PLAINTEXT controller listener
            # would need User:ANONYMOUS as a super user, and admin clients may talk to controllers
            # directly (KIP-919), so anyone on the machine could create ACLs there.
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{user}",
            "allow.everyone.if.no.acl.found": "false",  # the default, stated: no ACL means no access
        }
        if sec.tls:
            tls = self.state_dir / "tls"
            settings |= {"ssl.keystore.type": "PEM", "ssl.keystore.location": str(tls / "keystore.pem"),
                         "ssl.truststore.type": "PEM", "ssl.truststore.location": str(tls / "cert.pem")}
        return settings

    def _format_kafka_storage(self, libs: Path, properties: Path) -> None:
        """Format the KRaft metadata log once, with a fresh cluster id (and, with auth, the admin user)."""
        # Its own log file, so the broker's log tail quoted on errors is the broker's alone.
        java = _java(libs, properties.parent / "format.log")
        arguments = ["kafka.tools.StorageTool", "format", "-t", _kafka_cluster_id(), "-c", str(properties)]
        argfile = properties.parent / "format.args"
        if self.auth:
            # The broker can only authenticate its first user if that user exists before it starts.
            admin = self.credentials(security.ADMIN)
            secret = admin.password.get_secret_value()
            for mechanism in _SCRAM_MECHANISMS:
                arguments += ["--add-scram", f"{mechanism}=[name={admin.username},password={secret},"
                                             f"iterations={_SCRAM_ITERATIONS}]"]
            # Not on the command line (/proc/<pid>/cmdline is world-readable): java reads the main
            # class and its arguments from an @argfile, which only we can read.
            _write_private(argfile, "".join(_argfile_quoted(a) + "\n" for a in arguments))
            command = [*java, f"@{argfile}"]
        else:
            command = [*java, *arguments]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        finally:
            argfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{_last_lines(done.stdout + done.stderr)}")
        if self.auth:
            (properties.parent / "admin-scram").write_text(_admin_fingerprint(self.credentials(security.ADMIN)))

    def _check_admin_bootstrapped(self, home: Path) -> None:
        """Existing Kafka data must know the admin user: its SCRAM credential is made only at format time."""
        marker = home / "admin-scram"
        if not marker.exists():
            raise StackError(f"Kafka's data in {home} was formatted without auth, so it has no admin user: "
                             "`down --wipe` the stack (its data is lost) or use another state_dir")
        if marker.read_text() != _admin_fingerprint(self.credentials(security.ADMIN)):
            raise StackError(f"{self.credentials_file(security.ADMIN)} is not the admin credential Kafka's data "
                             f"in {home} was formatted with: restore it, or `down --wipe` the stack")

    def _redis_command(self, home: Path) -> list[str]:
        c = self.config
        command = ["redis-server", "--port", str(c.redis_port), "--bind", c.host, "--dir", str(home),
                   "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "yes",
                   # bounded, and never evicting: a blob evicted under a manifest would break its task
                   "--maxmemory", f"{c.redis_maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        if self.auth:
            # An ACL file rather than ACL SETUSER after start: no moment in which the default user is open.
            acl_file = home / "users.acl"
            roles = {role: self.credentials(role) for role in security.redis_acl_rules()}
            _write_private(acl_file, security.redis_acl_file(roles))
            command += ["--aclfile", str(acl_file)]
        return command

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
            f"rule_files: [{json.dumps(str(ALERT_RULES))}]\n"
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
                                     bootstrap_timeout_ms=5000, **self._admin_options())
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
        admin = security.redis_client_options(self.credentials(security.ADMIN)) if self.auth else {}
        client = redis.Redis(host=self.config.host, port=self.config.redis_port,
                             socket_connect_timeout=1, socket_timeout=1, **admin)
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
        if self.auth and self.config.security.tls and shutil.which("openssl") is None:
            raise StackError("`openssl` not found: it makes the broker's TLS certificate (apt-get install openssl)")
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
def remembered_config(state_dir: Path) -> StackConfig | None:
    """The config a stack in `state_dir` was last brought up with (its ports), if any."""
    try:
        return StackConfig.model_validate_json((state_dir.expanduser() / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte on."""
    path.unlink(missing_ok=True)  # an older copy would keep its mode
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _argfile_quoted(argument: str) -> str:
    """One argument of a java @argfile: quoted, with backslashes and quotes escaped."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _admin_fingerprint(admin: Credentials) -> str:
    """A digest of the admin's user and password, to notice a replaced credentials file (not a secret)."""
    secret = f"{admin.username}\0{admin.password.get_secret_value()}".encode()
    return hashlib.sha256(b"inspection-admin-scram\0" + secret).hexdigest() + "\n"


def _ensure_tls_files(folder: Path) -> Path:
    """A self-signed certificate for the loopback broker (made once); returns the clients' CA file.

    The certificate names 127.0.0.1 and localhost, so clients verify the broker's identity as well as
    the chain; keystore.pem (key + certificate, unencrypted PKCS#8) is readable by its owner only."""
    cert, keystore = folder / "cert.pem", folder / "keystore.pem"
    if cert.exists() and keystore.exists():
        return cert
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
               "-days", "3650", "-subj", "/CN=inspection-local-kafka",
               "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
               "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StackError(f"openssl could not make the broker's certificate:\n{_last_lines(done.stderr)}")
    descriptor = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key.read_text() + cert.read_text())
    key.unlink()
    return cert


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
