"""The compose stack's one-shot init steps, run in the pipeline's image (docker-compose.yml: kafka-init, redis-acl).

    python deploy/compose/provision.py redis-acl /acl/users.acl   # before Redis starts: its ACL file
    python deploy/compose/provision.py kafka                       # once Kafka listens: topics, users, ACLs

Both read each role's credentials from the env file that deploy/compose/make_secrets.py wrote, mounted as a
compose secret at /run/secrets/<role>-credentials, through workers.security.load_credentials: the variables
the workers themselves read. Nothing secret is taken from argv or printed.

- redis-acl writes workers.security.redis_acl_file(): the default user off, one user per role with Redis
  access, passwords as SHA-256 digests only (so the file, on a volume Redis reads, holds no usable secret).
- kafka provisions exactly what `inspection stack up --auth` does (tools/stack/kafka_server.py's own
  provisioning code, pointed at the compose broker): the topics of TopicsConfig with their partitions and
  max.message.bytes, every role's SCRAM user for both mechanisms, and the ACL table of workers.security,
  made exact (missing bindings created, any other deleted). The admin's SCRAM credential was made when the
  broker formatted its storage (deploy/compose/kafka-start.sh). Idempotent: run on every `up`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SECRETS_DIR = Path("/run/secrets")

log = logging.getLogger("provision")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provision", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    acl = steps.add_parser("redis-acl", help="write Redis' ACL file from the roles' credentials")
    acl.add_argument("out", type=Path)
    kafka = steps.add_parser("kafka", help="create the topics, the roles' SCRAM users and the ACLs")
    kafka.add_argument("--bootstrap", default=os.environ.get("INSPECTION_BOOTSTRAP", "kafka:9092"))
    kafka.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the broker")
    return parser


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose's env_file reads them (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def role_credentials(roles: list[str], secrets_dir: Path = SECRETS_DIR) -> dict[str, Any]:
    """role -> schemas.config.Credentials, from /run/secrets/<role>-credentials."""
    from workers.security import load_credentials

    found = {}
    for role in roles:
        path = secrets_dir / f"{role}-credentials"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run deploy/compose/make_secrets.py on the host")
        credentials = load_credentials(read_env_file(path))
        if credentials is None or credentials.username != role:
            raise SystemExit(f"{path} does not hold {role}'s credentials")
        found[role] = credentials
    return found


def redis_acl(out: Path, credentials: Mapping[str, Any] | None = None) -> str:
    from workers import security

    credentials = credentials or role_credentials(list(security.redis_acl_rules()))
    text = security.redis_acl_file(credentials)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    os.chmod(partial, 0o644)  # Redis runs as its own user; the file holds digests, not passwords
    os.replace(partial, out)
    log.info("wrote %s: users %s", out, ", ".join(security.redis_acl_rules()))
    return text


def kafka_plan() -> dict[str, Any]:
    """What `kafka` makes: topics (name -> partitions, configs), SCRAM users, ACL bindings."""
    from schemas.config import TopicsConfig
    from workers import security
    from workers.kafka_io import topic_specs

    topics = TopicsConfig()
    return {
        "topics": topic_specs(topics),
        "users": [role for role in security.ROLES if role != security.ADMIN],
        "acls": security.kafka_acls(topics, security.default_groups()),
    }


def provision_kafka(bootstrap: str, timeout_s: float, credentials: Mapping[str, Any] | None = None) -> None:
    from schemas.config import TopicsConfig
    from workers import security
    from tools.stack.kafka_server import broker_ready, provision_broker

    credentials = credentials or role_credentials(list(security.ROLES))
    deadline = time.monotonic() + timeout_s
    while not broker_ready(bootstrap, credentials[security.ADMIN]):  # an authenticated admin lists the topics
        if time.monotonic() > deadline:
            raise SystemExit(f"Kafka at {bootstrap} did not accept the admin within {timeout_s:.0f} s")
        time.sleep(1.0)
    provision_broker(bootstrap, TopicsConfig(), security.default_groups(), credentials)
    plan = kafka_plan()
    log.info("Kafka at %s: %d topics, users %s, %d ACL bindings", bootstrap, len(plan["topics"]),
             ", ".join(plan["users"]), len(plan["acls"]))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    args = parser().parse_args(argv)
    if args.step == "redis-acl":
        redis_acl(args.out)
    else:
        provision_kafka(args.bootstrap, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
