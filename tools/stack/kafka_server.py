"""The local stack's Kafka: one KRaft node, broker and controller, run from jars Maven fetches once.

    <state_dir>/kafka/  server.properties, data/, kafka.pid, kafka.out (JVM), server.log (log4j)
    <state_dir>/tls/    cert.pem (the clients' CA file), keystore.pem (key + cert), with `security.tls`

With auth, the client port takes SASL/SCRAM (SASL_PLAINTEXT, or SASL_SSL with `tls`) and authorises each
request against the role ACLs of workers/security.py; the controller port (loopback, never used by
clients) takes SASL/PLAIN as the admin user. `provision_broker` makes the topics, the roles' SCRAM users
and the ACL table on any running broker, this one or another (deploy/compose/provision.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePatternFilter
from kafka.admin import ACL, ResourceType, UserScramCredentialUpsertion

from pipeline.common.local_files import cache_root
from schemas.config import Credentials, StackConfig, TopicsConfig
from tools.stack.processes import Server, StackError, last_lines, port_open, write_private
from workers import security
from workers.kafka_io import ensure_topics

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
# Every user gets both mechanisms, so changing SecurityConfig.mechanism needs no new users.
_SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_ITERATIONS = 8192  # Kafka accepts 4096..16384


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
        raise StackError(f"mvn could not fetch the Kafka jars:\n{last_lines(done.stdout + done.stderr)}")
    try:
        partial.rename(libs)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return libs


class KafkaServer(Server):
    """The Kafka node of one `StackConfig`; `credentials(role)` gives each role's credentials when auth is on."""

    name = "kafka"

    def __init__(self, config: StackConfig, topics: TopicsConfig, groups: Mapping[str, str],
                 credentials: Callable[[str], Credentials]) -> None:
        super().__init__(config)
        self.topics = topics
        self.groups = groups  # consumer group per role, for the ACLs
        self.credentials = credentials
        self.ports = (config.kafka_port, config.kafka_controller_port)
        self.markers = ("kafka.Kafka", str(self.home / "server.properties"))
        self.logs = (self.home / "server.log", self.home / "kafka.out")
        self.address = config.bootstrap_servers
        self.tls_dir = config.state_dir / "tls"

    def ready(self) -> bool:
        return broker_ready(self.config.bootstrap_servers, self._admin())

    def provision(self) -> None:
        """Topics and, with auth, the roles' SCRAM users and ACLs. Idempotent."""
        roles = {role: self.credentials(role) for role in security.ROLES} if self.auth else None
        provision_broker(self.config.bootstrap_servers, self.topics, self.groups, roles)

    def ensure_certificate(self) -> Path:
        """The broker's self-signed TLS certificate (made once); returns the clients' CA file."""
        return _ensure_tls_files(self.tls_dir)

    def command(self) -> list[str]:
        libs = ensure_kafka_jars()
        properties = self.home / "server.properties"
        write_private(properties, self.properties(self.home / "data"))  # with auth, it holds a password
        if not (self.home / "data" / "meta.properties").exists():
            self._format_storage(libs, properties)
        elif self.auth:
            self._check_admin_bootstrapped()
        jvm = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
        return [*_java(libs, self.home / "server.log", jvm), "kafka.Kafka", str(properties)]

    def properties(self, data_dir: Path) -> str:
        """The broker's server.properties, keeping its data in `data_dir`."""
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
            settings.update(self._security_settings())
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _admin(self) -> Credentials | None:
        return self.credentials(security.ADMIN) if self.auth else None

    def _security_settings(self) -> dict[str, str]:
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
            settings |= {"ssl.keystore.type": "PEM", "ssl.keystore.location": str(self.tls_dir / "keystore.pem"),
                         "ssl.truststore.type": "PEM", "ssl.truststore.location": str(self.tls_dir / "cert.pem")}
        return settings

    def _format_storage(self, libs: Path, properties: Path) -> None:
        """Format the KRaft metadata log once, with a fresh cluster id (and, with auth, the admin user)."""
        # Its own log file, so the broker's log tail quoted on errors is the broker's alone.
        java = _java(libs, self.home / "format.log")
        arguments = ["kafka.tools.StorageTool", "format", "-t", _kafka_cluster_id(), "-c", str(properties)]
        argfile = self.home / "format.args"
        if self.auth:
            # The broker can only authenticate its first user if that user exists before it starts.
            admin = self.credentials(security.ADMIN)
            secret = admin.password.get_secret_value()
            for mechanism in _SCRAM_MECHANISMS:
                arguments += ["--add-scram", f"{mechanism}=[name={admin.username},password={secret},"
                                             f"iterations={_SCRAM_ITERATIONS}]"]
            # Not on the command line (/proc/<pid>/cmdline is world-readable): java reads the main
            # class and its arguments from an @argfile, which only we can read.
            write_private(argfile, "".join(_argfile_quoted(a) + "\n" for a in arguments))
            command = [*java, f"@{argfile}"]
        else:
            command = [*java, *arguments]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        finally:
            argfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{last_lines(done.stdout + done.stderr)}")
        if self.auth:
            (self.home / "admin-scram").write_text(_admin_fingerprint(self.credentials(security.ADMIN)))

    def _check_admin_bootstrapped(self) -> None:
        """Existing Kafka data must know the admin user: its SCRAM credential is made only at format time."""
        marker = self.home / "admin-scram"
        if not marker.exists():
            raise StackError(f"Kafka's data in {self.home} was formatted without auth, so it has no admin user: "
                             "`down --wipe` the stack (its data is lost) or use another state_dir")
        if marker.read_text() != _admin_fingerprint(self.credentials(security.ADMIN)):
            admin_file = security.credentials_file(self.config.state_dir, security.ADMIN)
            raise StackError(f"{admin_file} is not the admin credential Kafka's data "
                             f"in {self.home} was formatted with: restore it, or `down --wipe` the stack")


def broker_ready(bootstrap_servers: str, admin: Credentials | None = None) -> bool:
    """Whether the broker answers an admin request (listing topics), authenticated as `admin` if given."""
    host, _, port = bootstrap_servers.rpartition(":")
    if not port_open(host, int(port)):
        return False
    try:
        client = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="inspection-stack",
                                  request_timeout_ms=5000, bootstrap_timeout_ms=5000,
                                  **security.kafka_client_options(admin))
    except Exception:
        return False
    try:
        client.list_topics()
        return True
    except Exception:
        return False
    finally:
        client.close()


def provision_broker(bootstrap_servers: str, topics: TopicsConfig, groups: Mapping[str, str],
                     credentials: Mapping[str, Credentials] | None = None) -> None:
    """Create the topics on a running broker; given every role's credentials (the admin's included), also
    upsert the roles' SCRAM users and make the broker's ACLs exactly the table of workers/security.py.
    Idempotent."""
    if credentials is None:
        ensure_topics(bootstrap_servers, topics)
        return
    options = security.kafka_client_options(credentials[security.ADMIN])
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="inspection-admin", **options)
    try:
        ensure_topics(bootstrap_servers, topics, **options)
        _upsert_scram_users(admin, credentials)
        _sync_acls(admin, security.kafka_acls(topics, groups))
    finally:
        admin.close()


def _upsert_scram_users(admin: KafkaAdminClient, credentials: Mapping[str, Credentials]) -> None:
    """Every role's user, with both SCRAM mechanisms (the admin's came with the storage format).

    Done on every provisioning, so a credentials file that was replaced takes effect on the next start."""
    for mechanism in _SCRAM_MECHANISMS:  # one request per mechanism: a request may alter a user once
        upserts = [UserScramCredentialUpsertion(creds.username, mechanism, creds.password.get_secret_value(),
                                                iterations=_SCRAM_ITERATIONS)
                   for role, creds in credentials.items() if role != security.ADMIN]
        failed = {user: error for user, error in admin.alter_user_scram_credentials(upserts).items() if error}
        if failed:
            raise StackError(f"Kafka refused the {mechanism} users: {failed}")


def _sync_acls(admin: KafkaAdminClient, acls: list[ACL]) -> None:
    """Make the broker's ACLs exactly `acls`: add the missing, delete any other."""
    wanted = set(acls)
    everything = ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                           permission_type=ACLPermissionType.ANY,
                           resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))
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
        raise StackError(f"openssl could not make the broker's certificate:\n{last_lines(done.stderr)}")
    descriptor = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key.read_text() + cert.read_text())
    key.unlink()
    return cert


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


def _argfile_quoted(argument: str) -> str:
    """One argument of a java @argfile: quoted, with backslashes and quotes escaped."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _admin_fingerprint(admin: Credentials) -> str:
    """A digest of the admin's user and password, to notice a replaced credentials file (not a secret)."""
    secret = f"{admin.username}\0{admin.password.get_secret_value()}".encode()
    return hashlib.sha256(b"inspection-admin-scram\0" + secret).hexdigest() + "\n"
