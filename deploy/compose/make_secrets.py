#!/usr/bin/env python3
"""Generate the secrets of the docker compose stack into deploy/compose/secrets/ (never committed).

    python3 deploy/compose/make_secrets.py            # once, before `docker compose up`; standard library only

Writes, for each role of workers/security.py (admin, camera, operator, inference, control, monitor), `<role>.env`:

    INSPECTION_KAFKA_USERNAME=<role>
    INSPECTION_KAFKA_PASSWORD=<random>
    INSPECTION_KAFKA_MECHANISM=SCRAM-SHA-256
    INSPECTION_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT
    INSPECTION_REDIS_USERNAME=<role>          (roles with Redis access only)
    INSPECTION_REDIS_PASSWORD=<random>

the variables workers/security.py reads (`load_credentials`), and `grafana-admin.password`. Workers get their
role's file through compose's `env_file` (read by compose on the host); Kafka, its init service and the
Redis ACL init service get the files they need as compose `secrets`, which compose bind-mounts with their
host permissions. So the folder is private (0700) and the files in it are 0644: readable by the non-root
users of the images (appuser, inspection), by nobody else on the host. A password is never on a command
line and never in docker-compose.yml.

Existing passwords are kept (Kafka's admin SCRAM credential is fixed when its volume is formatted): to change
them, `docker compose down -v` (the data is lost), delete the folder and run this again. See
deploy/compose/role.env.example for the format with placeholders.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

# workers.security.ROLES (name -> Redis access), restated so that this script needs no dependencies;
# tests/test_compose.py checks that the two agree.
ROLES: dict[str, str] = {"admin": "all", "camera": "none", "operator": "read", "inference": "read", "control": "write",
                         "monitor": "read"}
MECHANISM = "SCRAM-SHA-256"
SECURITY_PROTOCOL = "SASL_PLAINTEXT"  # the compose network's client listener (docker-compose.yml, kafka)
DEFAULT_OUT = Path(__file__).resolve().parent / "secrets"
GRAFANA_ADMIN = "grafana-admin.password"


def _password() -> str:
    return secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe in env files, shell, JAAS and Java properties


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the subset of compose's env_file format this script writes)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def role_env(role: str, redis: str, old: dict[str, str]) -> dict[str, str]:
    values = {
        "INSPECTION_KAFKA_USERNAME": role,
        "INSPECTION_KAFKA_PASSWORD": old.get("INSPECTION_KAFKA_PASSWORD") or _password(),
        "INSPECTION_KAFKA_MECHANISM": MECHANISM,
        "INSPECTION_KAFKA_SECURITY_PROTOCOL": SECURITY_PROTOCOL,
    }
    if redis != "none":
        values["INSPECTION_REDIS_USERNAME"] = role
        values["INSPECTION_REDIS_PASSWORD"] = old.get("INSPECTION_REDIS_PASSWORD") or _password()
    return values


def _write(path: Path, text: str, mode: int) -> None:
    """Write with `mode` from the first byte on, atomically (a reader never sees half a file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(partial, mode)  # open()'s mode is masked by the umask
    os.replace(partial, path)


def make_secrets(out: Path = DEFAULT_OUT) -> dict[str, Path]:
    """Create or complete the secrets folder; returns the files by name. Idempotent."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    written = {}
    for role, redis in ROLES.items():
        path = out / f"{role}.env"
        old = read_env_file(path) if path.exists() else {}
        values = role_env(role, redis, old)
        text = f"# {role}'s credentials for the compose stack (deploy/compose/make_secrets.py); keep private\n"
        text += "".join(f"{key}={value}\n" for key, value in values.items())
        _write(path, text, 0o644)
        written[path.name] = path
    grafana = out / GRAFANA_ADMIN
    password = grafana.read_text().strip() if grafana.exists() else ""
    _write(grafana, (password or _password()) + "\n", 0o644)
    written[grafana.name] = grafana
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    files = make_secrets(args.out)
    print(f"secrets in {args.out} (0700): {', '.join(sorted(files))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
