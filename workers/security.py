"""Who may do what: the pipeline's roles, their Kafka ACLs and Redis ACL users, and where secrets come from.

Each process runs as one role and reads its credentials from the environment, never from argv (a
command line is world-readable in /proc and ends up in shell histories):

    INSPECTION_CREDENTIALS_FILE   path of a JSON credentials file (below); or, instead of a file:
    INSPECTION_KAFKA_USERNAME, INSPECTION_KAFKA_PASSWORD      (both, or neither)
    INSPECTION_KAFKA_MECHANISM                                SCRAM-SHA-256 (default) | SCRAM-SHA-512
    INSPECTION_KAFKA_SECURITY_PROTOCOL                        SASL_PLAINTEXT (default) | SASL_SSL
    INSPECTION_KAFKA_SSL_CAFILE                               CA bundle for SASL_SSL (default: system CAs)
    INSPECTION_REDIS_USERNAME, INSPECTION_REDIS_PASSWORD      (both, or neither)

The file holds the fields of `schemas.config.Credentials` as one JSON object, for example

    {"username": "inference", "password": "...", "mechanism": "SCRAM-SHA-256",
     "security_protocol": "SASL_PLAINTEXT", "ssl_cafile": null,
     "redis_username": "inference", "redis_password": "..."}

and must not be readable by other users (mode 0600 or 0640). Setting neither the file nor the
variables means no credentials: the loopback PLAINTEXT stack of the default configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType
from pydantic import ValidationError

from schemas.config import ControlConfig, Credentials, InferenceConfig, ScramMechanism, TopicsConfig

CREDENTIALS_FILE_ENV = "INSPECTION_CREDENTIALS_FILE"
_KAFKA_ENV = {  # Credentials field -> environment variable
    "username": "INSPECTION_KAFKA_USERNAME",
    "password": "INSPECTION_KAFKA_PASSWORD",
    "mechanism": "INSPECTION_KAFKA_MECHANISM",
    "security_protocol": "INSPECTION_KAFKA_SECURITY_PROTOCOL",
    "ssl_cafile": "INSPECTION_KAFKA_SSL_CAFILE",
}
_REDIS_ENV = {"redis_username": "INSPECTION_REDIS_USERNAME", "redis_password": "INSPECTION_REDIS_PASSWORD"}

# Transactional producers name their ids with these prefixes; the ACLs admit exactly these.
TRANSACTIONAL_ID_PREFIXES = {"inference": "inspection-infer-", "control": "inspection-control-"}


class CredentialsError(RuntimeError):
    """Credentials are missing, malformed or stored unsafely; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------- roles
RedisAccess = Literal["none", "read", "write", "all"]


@dataclass(frozen=True)
class Role:
    """One kind of process. Its name is its Kafka principal (User:<name>) and its Redis user."""

    name: str
    redis: RedisAccess
    summary: str


ROLES: dict[str, Role] = {role.name: role for role in (
    Role("admin", "all", "super user: creates topics, users and ACLs (the stack itself)"),
    Role("camera", "none", "writes frames"),
    Role("operator", "read", "writes control commands; reads events, results, dead letters and the store"),
    Role("inference", "read", "reads frames in its group; writes results and dead letters; reads the store"),
    Role("control", "write", "reads control commands in its group; writes events, dead letters and the store"),
    Role("monitor", "read", "reads the store (the forgetting monitor); no Kafka access"),
)}
ADMIN = "admin"


@dataclass(frozen=True)
class Grant:
    """An ALLOW rule of the Kafka ACL table, in terms of configuration rather than names.

    `what` is a TopicsConfig field for a topic, and for a group or a transactional id the role whose
    consumer group / transactional-id prefix is meant."""

    role: str
    resource: Literal["topic", "group", "transactional_id"]
    what: str
    operations: tuple[str, ...]


# Kafka implies DESCRIBE from READ and WRITE, and idempotent producing from WRITE on a topic (KIP-679),
# so the table lists only what each role does. Everything not listed is denied
# (allow.everyone.if.no.acl.found=false): e.g. no role but admin creates or deletes topics.
KAFKA_GRANTS: tuple[Grant, ...] = (
    Grant("camera", "topic", "frames", ("WRITE",)),
    Grant("operator", "topic", "control", ("WRITE",)),
    # Operators read by assign(), without a group, so they need no group ACL.
    Grant("operator", "topic", "events", ("READ",)),
    Grant("operator", "topic", "results", ("READ",)),
    Grant("operator", "topic", "dead_letter", ("READ",)),
    Grant("inference", "topic", "frames", ("READ",)),
    Grant("inference", "group", "inference", ("READ",)),
    Grant("inference", "topic", "results", ("WRITE",)),
    Grant("inference", "topic", "dead_letter", ("WRITE",)),
    # WRITE on the id admits init_transactions and commit; send_offsets_to_transaction also needs READ
    # on the group (above) and on the consumed topic.
    Grant("inference", "transactional_id", "inference", ("WRITE", "DESCRIBE")),
    Grant("control", "topic", "control", ("READ",)),
    Grant("control", "group", "control", ("READ",)),
    Grant("control", "topic", "events", ("WRITE",)),
    Grant("control", "topic", "dead_letter", ("WRITE",)),
    Grant("control", "transactional_id", "control", ("WRITE", "DESCRIBE")),
)


def default_groups() -> dict[str, str]:
    """The consumer group of each role that has one, from the workers' default configuration."""
    return {"inference": InferenceConfig().group_id, "control": ControlConfig().group_id}


def kafka_acls(topics: TopicsConfig, groups: Mapping[str, str] | None = None) -> list[ACL]:
    """The ACL bindings of KAFKA_GRANTS for these topic names and consumer groups (role -> group id)."""
    groups = default_groups() if groups is None else groups
    acls = []
    for grant in KAFKA_GRANTS:
        pattern = _resource_pattern(grant, topics, groups)
        for operation in grant.operations:
            acls.append(ACL(principal=f"User:{grant.role}", host="*", operation=ACLOperation[operation],
                            permission_type=ACLPermissionType.ALLOW, resource_pattern=pattern))
    return acls


def _resource_pattern(grant: Grant, topics: TopicsConfig, groups: Mapping[str, str]) -> ResourcePattern:
    if grant.resource == "topic":
        return ResourcePattern(ResourceType.TOPIC, getattr(topics, grant.what))
    if grant.resource == "group":
        return ResourcePattern(ResourceType.GROUP, groups[grant.what])
    return ResourcePattern(ResourceType.TRANSACTIONAL_ID, TRANSACTIONAL_ID_PREFIXES[grant.what],
                           ACLResourcePatternType.PREFIXED)


# ---------------------------------------------------------------------------------- Redis ACL
def redis_acl_rules(namespace: str = "kpk") -> dict[str, list[str]]:
    """ACL SETUSER rules per role with Redis access (password and `on` not included).

    Rules apply left to right: start from nothing, add categories, then take the dangerous commands
    (KEYS, FLUSHALL, CONFIG, DEBUG, CLIENT KILL, ...) away again."""
    keys, updates = f"{namespace}:*", f"{namespace}:updates"
    read = [f"%R~{keys}", f"&{updates}", "-@all", "+@read", "+@connection", "+subscribe", "+unsubscribe",
            "-@dangerous"]
    # TIME: the store stamps manifests with the server's clock, so publishers and the garbage collector
    # agree on ages whatever their hosts' clocks say (TIME is in @dangerous only for being non-deterministic).
    # INFO: the control worker reads used memory against maxmemory before it publishes a task.
    write = [f"~{keys}", f"&{keys}", "-@all", "+@read", "+@write", "+@transaction", "+@pubsub",
             "+@connection", "-@dangerous", "+time", "+info"]
    rules = {"read": read, "write": write, "all": ["~*", "&*", "+@all"]}
    return {role.name: rules[role.redis] for role in ROLES.values() if role.redis != "none"}


def redis_acl_file(credentials: Mapping[str, Credentials], namespace: str = "kpk") -> str:
    """An ACL file (redis-server --aclfile) of the roles' Redis users; the default user is disabled.

    Passwords are stored as SHA-256 digests (`#<hex>`), so the file does not hold a usable secret."""
    lines = ["user default reset off"]  # no anonymous connections (AUTH with a user is required)
    for name, rules in redis_acl_rules(namespace).items():
        creds = credentials[name]
        assert creds.redis_username and creds.redis_password, f"{name} has no Redis user"
        digest = hashlib.sha256(creds.redis_password.get_secret_value().encode()).hexdigest()
        lines.append(" ".join(["user", creds.redis_username, "reset", "on", f"#{digest}", *rules]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- loading
def load_credentials(environ: Mapping[str, str] | None = None) -> Credentials | None:
    """This process' credentials from $INSPECTION_CREDENTIALS_FILE or the INSPECTION_* variables.

    None when neither is set (the loopback stack without auth). Raises CredentialsError when both
    are set, when a variable pair is incomplete or when the file is unsafe or malformed."""
    env = os.environ if environ is None else environ
    variables = [name for name in (*_KAFKA_ENV.values(), *_REDIS_ENV.values()) if env.get(name)]
    path = env.get(CREDENTIALS_FILE_ENV)
    if path and variables:
        raise CredentialsError(f"set either {CREDENTIALS_FILE_ENV} or {', '.join(variables)}, not both")
    if path:
        return read_credentials_file(Path(path))
    if not variables:
        return None
    fields = {field: env[name] for field, name in {**_KAFKA_ENV, **_REDIS_ENV}.items() if env.get(name)}
    return _validated(fields, "the environment")


def read_credentials_file(path: Path) -> Credentials:
    """A credentials file's contents; refused if other users may read or write it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise CredentialsError(f"cannot read credentials file {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXO):
        raise CredentialsError(f"credentials file {path} is accessible to other users (mode "
                               f"{stat.S_IMODE(mode):04o}): chmod 600 {path}")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise CredentialsError(f"credentials file {path} is not JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(fields, dict):
        raise CredentialsError(f"credentials file {path} must hold one JSON object")
    return _validated(fields, str(path))


def _validated(fields: dict[str, Any], source: str) -> Credentials:
    try:
        return Credentials.model_validate(fields)
    except ValidationError as error:
        # Name the fields only: pydantic's message would quote the input, password included.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'credentials'}: {e['msg']}" for e in error.errors())
        raise CredentialsError(f"invalid credentials in {source}: {problems}") from None


# ---------------------------------------------------------------------------------- client options
def kafka_client_options(credentials: Credentials | None) -> dict[str, Any]:
    """kafka-python keyword arguments for these credentials (for producers, consumers and admins alike).

    Empty without credentials, so `**kafka_client_options(load_credentials())` keeps the PLAINTEXT default."""
    if credentials is None:
        return {}
    options: dict[str, Any] = {
        "security_protocol": credentials.security_protocol,
        "sasl_mechanism": credentials.mechanism,
        "sasl_plain_username": credentials.username,
        "sasl_plain_password": credentials.password.get_secret_value(),
    }
    if credentials.security_protocol == "SASL_SSL":
        options["ssl_check_hostname"] = True  # kafka-python's default, stated: a TLS peer must be the broker
        if credentials.ssl_cafile is not None:
            options["ssl_cafile"] = str(credentials.ssl_cafile)
    return options


def redis_client_options(credentials: Credentials | None) -> dict[str, Any]:
    """redis-py keyword arguments (username, password) for `redis.Redis(...)` or `Redis.from_url(url, ...)`.

    Kept out of the URL so that URLs can be logged and shown; empty without a Redis user."""
    if credentials is None or credentials.redis_username is None or credentials.redis_password is None:
        return {}
    return {"username": credentials.redis_username, "password": credentials.redis_password.get_secret_value()}


# ---------------------------------------------------------------------------------- the local stack's files
def credentials_dir(state_dir: Path) -> Path:
    return state_dir / "credentials"


def credentials_file(state_dir: Path, role: str) -> Path:
    """Where the local stack keeps `role`'s credentials; hand it to a process as $INSPECTION_CREDENTIALS_FILE."""
    if role not in ROLES:
        raise KeyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return credentials_dir(state_dir) / f"{role}.json"


def credentials_env(state_dir: Path, role: str) -> dict[str, str]:
    """The environment entry that gives a child process `role`'s credentials of the local stack."""
    return {CREDENTIALS_FILE_ENV: str(credentials_file(state_dir, role))}


def ensure_credentials_files(
    state_dir: Path,
    mechanism: ScramMechanism = "SCRAM-SHA-256",
    security_protocol: Literal["SASL_PLAINTEXT", "SASL_SSL"] = "SASL_PLAINTEXT",
    ssl_cafile: Path | None = None,
) -> dict[str, Credentials]:
    """Each role's credentials of the local stack: read from its file, or generated and written (0600).

    Existing passwords are kept, so a restarted stack and its running clients keep working; the other
    fields follow the arguments (the stack's current mechanism and protocol)."""
    folder = credentials_dir(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask and ignored for an existing folder
    found = {}
    for role in ROLES.values():
        path = credentials_file(state_dir, role.name)
        old = read_credentials_file(path) if path.exists() else None
        creds = _role_credentials(role, old, mechanism, security_protocol, ssl_cafile)
        if creds != old:
            _write_private(path, creds)
        found[role.name] = creds
    return found


def _role_credentials(role: Role, old: Credentials | None, mechanism: ScramMechanism,
                      security_protocol: str, ssl_cafile: Path | None) -> Credentials:
    password = old.password.get_secret_value() if old else secrets.token_urlsafe(24)
    redis = {}
    if role.redis != "none":
        redis_password = old.redis_password if old and old.redis_password else None
        redis = {"redis_username": role.name,
                 "redis_password": redis_password.get_secret_value() if redis_password else secrets.token_urlsafe(24)}
    return Credentials.model_validate({
        "username": role.name, "password": password, "mechanism": mechanism,
        "security_protocol": security_protocol, "ssl_cafile": ssl_cafile, **redis,
    })


def _write_private(path: Path, credentials: Credentials) -> None:
    """Write the file readable by its owner only, from its first byte on (no chmod after the fact)."""
    fields = credentials.model_dump(mode="json")
    fields["password"] = credentials.password.get_secret_value()
    if credentials.redis_password is not None:
        fields["redis_password"] = credentials.redis_password.get_secret_value()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)  # a leftover would keep its own mode
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(fields, handle, indent=2)
        handle.write("\n")
    os.replace(partial, path)
