"""The randomized stress run (see tests/stress/run.py): quick in ``make test``, long in
``make soak`` (``SOAK_SEED``, ``SOAK_SECONDS``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import Processes
from tests.fault.results import record
from tests.stress.run import StressRun, seed_from_env

QUICK_UPDATES = 1000


def run_stress(
    name: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    processes: Processes,
    *,
    updates: int | None = None,
    seconds: float | None = None,
) -> None:
    run = StressRun(tmp_path, tmp_path_factory.mktemp("st"), processes, seed=seed_from_env())
    began = time.monotonic()
    try:
        run.start()
        run.run(updates=updates, seconds=seconds)
        violations = list(run.checker.violations)
        figures = {**run.report(), "duration_s": round(time.monotonic() - began, 1)}
        run.stop()
    finally:
        run.redis.stop()  # by PID; the daemon and workers through ``processes``
    assert not violations, "\n".join(violations)
    assert not run.checker.violations, "\n".join(run.checker.violations)
    assert figures["updates"] >= (updates or 0)
    record("stress", name, figures)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stress_quick(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, processes: Processes
) -> None:
    run_stress("quick", tmp_path, tmp_path_factory, processes, updates=QUICK_UPDATES)


@pytest.mark.soak
@pytest.mark.timeout(int(os.environ.get("SOAK_SECONDS", "300")) + 300)
def test_stress_soak(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, processes: Processes
) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "300"))
    name = f"soak-seed-{seed_from_env()}-{seconds:g}s"
    run_stress(name, tmp_path, tmp_path_factory, processes, seconds=seconds)
