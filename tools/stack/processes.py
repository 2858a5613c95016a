"""The server processes of the local stack, and the small helpers its server modules share.

Each server runs as a detached process (its own session, so it outlives the command that started it and
ignores that terminal's Ctrl-C) with a pid file and log files in its folder `<state_dir>/<name>/`. The pid
files, not Python objects, say what runs: a pid file whose process is gone (or is now some other program)
is stale and ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

from schemas.config import StackConfig

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A server could not be started or stopped; the message says why and what to do."""


class Server(ABC):
    """One server of the stack: where it lives, what it listens on, how it starts, when it is ready."""

    name: str  # also its folder under state_dir and its pid file's stem
    ports: tuple[int, ...]  # every port it listens on
    markers: tuple[str, ...]  # substrings of /proc/<pid>/cmdline that identify our process
    logs: tuple[Path, ...]  # quoted on failure; the first is its own log, the last takes its stdout
    address: str | None  # what clients connect to, as `status()` reports it

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.home = config.state_dir / self.name

    @property
    def auth(self) -> bool:
        """Whether its clients must authenticate."""
        return self.config.security.enabled

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"

    @abstractmethod
    def command(self) -> list[str]:
        """Write the server's config files into its (existing) home and return its command line."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether the server answers its clients."""


class ServerProcesses:
    """Launches, finds, waits for and stops the processes of servers."""

    def __init__(self, startup_timeout_s: float, stop_timeout_s: float) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started by this object, to reap

    def launch(self, server: Server) -> None:
        for port in server.ports:
            if port_open(server.config.host, port):
                raise StackError(
                    f"{server.name}: {server.config.host}:{port} is already in use by a process this stack did "
                    f"not start (no live pid in {server.pid_file}); stop it or configure another port"
                )
        server.home.mkdir(parents=True, exist_ok=True)
        command = server.command()
        with open(server.logs[-1], "ab") as out:
            process = subprocess.Popen(command, cwd=server.home, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self._children[process.pid] = process
        server.pid_file.write_text(f"{process.pid}\n")
        log.info("started %s (pid %d), log %s", server.name, process.pid, server.logs[0])

    def wait_ready(self, server: Server) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        first_pid = self.live_pid(server)
        while not server.ready():
            pid = self.live_pid(server)
            if pid is None:
                raise StackError(f"{server.name} {self._why_gone(first_pid)}.\n{_log_tails(server)}")
            if time.monotonic() > deadline:
                raise StackError(
                    f"{server.name} (pid {pid}) not ready after {self.startup_timeout_s:.0f}s.\n"
                    f"{_log_tails(server)}"
                )
            time.sleep(0.25)

    def stop(self, server: Server) -> bool:
        """SIGTERM the server's process group, SIGKILL it if it lingers. False if it was not running."""
        pid = self.live_pid(server)
        if pid is None:
            return False
        log.info("stopping %s (pid %d)", server.name, pid)
        _signal_group(pid, signal.SIGTERM)
        if not self._wait_gone(pid, self.stop_timeout_s):
            log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", server.name, pid, self.stop_timeout_s)
            self._sigkill(server, pid)
        server.pid_file.unlink(missing_ok=True)
        return True

    def kill(self, server: Server) -> bool:
        """SIGKILL the server at once: no shutdown, no flush. False if it was not running."""
        pid = self.live_pid(server)
        if pid is None:
            return False
        self._sigkill(server, pid)
        server.pid_file.unlink(missing_ok=True)
        return True

    def live_pid(self, server: Server) -> int | None:
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

    def _sigkill(self, server: Server, pid: int) -> None:
        _signal_group(pid, signal.SIGKILL)
        if not self._wait_gone(pid, 10.0):
            raise StackError(f"{server.name} (pid {pid}) survived SIGKILL")

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        self._children.pop(pid, None)
        return True

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


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte on."""
    path.unlink(missing_ok=True)  # an older copy would keep its mode
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def last_lines(text: str, count: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])


def _log_tails(server: Server) -> str:
    parts = [f"--- tail of {path} ---\n{last_lines(path.read_text(errors='replace'))}"
             for path in server.logs if path.exists()]
    return "\n".join(parts) or f"(no log written in {server.home})"


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
