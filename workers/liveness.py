"""Liveness of a consuming worker: a watchdog over its poll loop, and the supervisor that restarts it.

A worker's loop calls `PollWatchdog.beat()` each time `consumer.poll()` returns; the time is exported as
`inspection_last_poll_timestamp_seconds`. kafka-python can spin inside `poll()` and never return (seen
after a group eviction: 11 minutes at 94% CPU, nothing logged). No thread can interrupt it, so the
watchdog logs the stall and ends the process with `EXIT_STUCK`; `supervise()` (the `inspection worker`
command's parent process) starts a fresh one, which rejoins the group and resumes from the committed
offsets (nothing committed is lost, nothing uncommitted was produced).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the supervisor process imports this module and should stay small
    from workers.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

EXIT_STUCK = 75  # EX_TEMPFAIL: try again
RESTARTS_ENV = "INSPECTION_WORKER_RESTARTS"
_PR_SET_PDEATHSIG = 1


class PollWatchdog:
    """Calls `on_stuck(seconds)` once when no poll has returned for `stuck_after_s`."""

    def __init__(self, metrics: ConsumerMetrics, stuck_after_s: float, on_stuck: Callable[[float], None] | None = None):
        self.metrics = metrics
        self.stuck_after_s = stuck_after_s
        self.on_stuck = on_stuck or _exit_stuck
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="poll-watchdog", daemon=True)
        metrics.consumer_restarts.inc(int(os.environ.get(RESTARTS_ENV, "0") or 0))

    def beat(self) -> None:
        self._last = time.monotonic()
        self.metrics.last_poll.set(time.time())

    def start(self) -> "PollWatchdog":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.stuck_after_s / 4)):
            silent = time.monotonic() - self._last
            if silent > self.stuck_after_s:
                self.on_stuck(silent)
                return


def _exit_stuck(silent_s: float) -> None:
    log.error("consumer stuck: no poll returned for %.0f s; exiting with code %d so the supervisor restarts "
              "this worker", silent_s, EXIT_STUCK)
    logging.shutdown()
    os._exit(EXIT_STUCK)  # noqa: SLF001 - the stuck thread cannot be joined; nothing uncommitted is lost


def supervise(command: Sequence[str], max_restarts: int = 20, backoff_s: float = 1.0) -> int:
    """Run `command` as a child; start it again when it exits stuck or crashes. Returns its last exit code.

    SIGTERM/SIGINT are forwarded (a graceful stop is not restarted); the child dies with this process
    (PR_SET_PDEATHSIG), so a SIGKILL of the supervisor never leaves an orphan worker consuming.
    """
    restarts = 0
    stopping = threading.Event()
    child: list[subprocess.Popen] = []

    def forward(sig: int, _frame: object) -> None:
        stopping.set()
        if child and child[0].poll() is None:
            child[0].send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        env = {**os.environ, RESTARTS_ENV: str(restarts)}
        child[:] = [subprocess.Popen(list(command), env=env, preexec_fn=_die_with_parent)]
        code = child[0].wait()
        if stopping.is_set() or code == 0:
            return code
        if restarts >= max_restarts:
            log.error("worker exited with code %d; %d restarts already, giving up", code, restarts)
            return code
        restarts += 1
        log.warning("worker exited with code %d%s; restart %d of at most %d", code,
                    " (stuck consumer)" if code == EXIT_STUCK else "", restarts, max_restarts)
        if stopping.wait(backoff_s):  # a SIGTERM between two children stops the supervisor, not the next child
            return code


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the child may outlive a SIGKILLed supervisor
        pass
