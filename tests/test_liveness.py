"""The poll watchdog and the worker supervisor, with real processes (no Kafka needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from workers.liveness import EXIT_STUCK, RESTARTS_ENV, PollWatchdog, supervise
from workers.metrics import ConsumerMetrics
from tools.processes import wait_until


def test_watchdog_fires_once_when_polls_stop_and_never_while_they_run() -> None:
    metrics = ConsumerMetrics(CollectorRegistry())
    fired: list[float] = []
    watchdog = PollWatchdog(metrics, stuck_after_s=0.4, on_stuck=fired.append).start()
    for _ in range(8):  # 0.8 s of regular polls: no alarm
        time.sleep(0.1)
        watchdog.beat()
    assert not fired
    assert abs(metrics.last_poll._value.get() - time.time()) < 1.0  # liveness gauge follows the polls
    wait_until(lambda: bool(fired), 5, interval_s=0.05, what="the watchdog")
    time.sleep(0.5)
    assert len(fired) == 1 and fired[0] > 0.4
    watchdog.stop()


def test_restart_count_survives_in_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(RESTARTS_ENV, "3")
    metrics = ConsumerMetrics(CollectorRegistry())
    PollWatchdog(metrics, 10)
    assert metrics.consumer_restarts._value.get() == 3


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_supervisor_restarts_a_stuck_worker_and_stops_on_success(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = _script(tmp_path, f"""
        import os, sys
        from pathlib import Path
        runs = Path({str(runs)!r})
        runs.write_text(runs.read_text() + os.environ["{RESTARTS_ENV}"] + "\\n" if runs.exists() else "0\\n")
        sys.exit({EXIT_STUCK} if len(runs.read_text().split()) < 3 else 0)
    """)
    assert supervise(command, backoff_s=0.01) == 0
    assert runs.read_text().split() == ["0", "1", "2"]  # each start knows how many restarts came before


def test_supervisor_gives_up_after_max_restarts(tmp_path: Path) -> None:
    command = _script(tmp_path, "import sys; sys.exit(3)")
    assert supervise(command, max_restarts=2, backoff_s=0.01) == 3


def test_killing_the_supervisor_kills_its_worker(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    child = _script(tmp_path, f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    parent = _supervisor(child)
    try:
        wait_until(pid_file.exists, 20, what="the child to start")
        wait_until(lambda: pid_file.read_text() != "", 5)
        worker_pid = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not _alive(worker_pid), 10, what="the orphaned worker to die")
    finally:
        parent.kill()


def test_sigterm_is_forwarded_and_not_restarted(tmp_path: Path) -> None:
    started = tmp_path / "started"
    child = _script(tmp_path, f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        open({str(started)!r}, "a").write("x")
        time.sleep(60)
    """)
    parent = _supervisor(child)
    try:
        wait_until(started.exists, 20, what="the child to start")
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(20) == 0
        assert started.read_text() == "x"  # started once
    finally:
        parent.kill()


def test_sigterm_between_restarts_stops_the_supervisor(tmp_path: Path) -> None:
    started = tmp_path / "started"
    child = _script(tmp_path, f"""
        import sys
        open({str(started)!r}, "a").write("x")
        sys.exit(3)
    """)
    parent = _supervisor(child, backoff_s=5.0)
    try:
        wait_until(started.exists, 20, what="the child to start")
        time.sleep(0.5)  # the child has crashed: the supervisor waits out its backoff
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(4) == 3  # at once, with the child's last code
        assert started.read_text() == "x"  # never started again
    finally:
        parent.kill()


def _supervisor(child: list[str], backoff_s: float = 1.0) -> subprocess.Popen:
    """`supervise(child)` in a process of its own, exiting with the child's last code."""
    code = f"import sys; from workers.liveness import supervise; sys.exit(supervise({child!r}, backoff_s={backoff_s}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def test_a_supervised_worker_keeps_one_id_across_restarts(monkeypatch) -> None:
    """Without --worker-id the supervisor picks the id once and hands it to every child it starts, so an
    inference worker keeps its transactional id (a restart fences its predecessor at once)."""
    from workers import cli, liveness

    started: list[list[str]] = []
    monkeypatch.setattr(liveness, "supervise", lambda command, max_restarts: started.append(list(command)) or 0)
    for _ in range(2):  # the same supervisor process twice: the same id (supervise() reruns its one command)
        assert cli.main(["worker", "infer", "--max-restarts", "3"]) == 0
    ids = [command[command.index("--worker-id") + 1] for command in started]
    assert ids[0].startswith("infer-") and ids[0].endswith(f"-{os.getpid()}") and ids[0] == ids[1]  # the supervisor's pid
    assert all("--no-supervisor" in command for command in started)
