"""The local stack's Redis: an append-only file, bounded memory that never evicts, and with auth an ACL file.

    <state_dir>/redis/  appendonlydir/ (AOF), redis.pid, redis.log, users.acl (with auth)

With auth, Redis admits only the ACL users of workers/security.py (`--aclfile`); its default user is off.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from schemas.config import Credentials, StackConfig
from tools.stack.processes import Server, write_private
from workers import security


class RedisServer(Server):
    """The Redis of one `StackConfig`; `credentials(role)` gives each role's credentials when auth is on."""

    name = "redis"

    def __init__(self, config: StackConfig, credentials: Callable[[str], Credentials]) -> None:
        super().__init__(config)
        self.credentials = credentials
        self.ports = (config.redis_port,)
        # redis-server rewrites its command line to "redis-server <host>:<port>".
        self.markers = ("redis-server", str(config.redis_port))
        self.logs = (self.home / "redis.log",)
        self.address = config.redis_url

    def command(self) -> list[str]:
        c = self.config
        command = ["redis-server", "--port", str(c.redis_port), "--bind", c.host, "--dir", str(self.home),
                   "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "yes",
                   # bounded, and never evicting: a blob evicted under a manifest would break its task
                   "--maxmemory", f"{c.redis_maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        if self.auth:
            # An ACL file rather than ACL SETUSER after start: no moment in which the default user is open.
            acl_file = self.home / "users.acl"
            roles = {role: self.credentials(role) for role in security.redis_acl_rules()}
            write_private(acl_file, security.redis_acl_file(roles))
            command += ["--aclfile", str(acl_file)]
        return command

    def ready(self) -> bool:
        admin = security.redis_client_options(self.credentials(security.ADMIN)) if self.auth else {}
        client = redis.Redis(host=self.config.host, port=self.config.redis_port,
                             socket_connect_timeout=1, socket_timeout=1, **admin)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
