"""The randomized fault soak, short: every acknowledged frame and command answered exactly once under
seeded kills and restarts of workers, broker and Redis, and a worker paused past its session timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.soak import FAULTS, SoakOptions, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a stack of its own, 2.5 minutes of faults


def test_a_short_soak_loses_and_repeats_nothing(tmp_path: Path) -> None:
    report = run_soak(SoakOptions(minutes=2.5, seed=5, state_dir=tmp_path / "soak", fault_every_s=(8.0, 16.0),
                                  command_every_s=(10.0, 20.0), drain_timeout_s=300.0))
    print(report.table())
    assert len(report.faults) >= 4 and {f.kind for f in report.faults} <= set(FAULTS)
    assert report.frames_acked > 100 and report.commands_acked >= 4
    assert report.missing == [] and report.duplicates == 0, report.table()
    assert report.commands_unanswered == [] and report.commands_answered_twice == [], report.table()
    assert report.store_versions_per_command == {} and report.store_disagrees == [], report.table()
    assert report.workers_without_partitions == [] and report.ok
