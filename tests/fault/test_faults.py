"""Fault scenarios with real processes and real signals (issue 8); the faults themselves are in
tests/fault/scenarios.py.

Each runs ``hotreload watch`` and 6 worker processes against a private redis-server, changes
the config while the fault lasts, and asserts afterwards: every live worker converged on the
newest valid content (its records and ``:workers`` agree), nothing died, no worker applied
anything it should not have or went back to an older revision (not even when Redis went back
to older data or an old signed entry was appended again), the stream's versions only went
up with no content twice in a row (``Pod.check``), and -- where something was away -- the
processes left waiting stayed near zero CPU. The figures are printed and written to
bench-results/reliability.json.
"""

from __future__ import annotations

import pytest

from tests.fault.conftest import MakePod
from tests.fault.pod import Pod
from tests.fault.results import record
from tests.fault.scenarios import BURST_PAD, SCENARIOS, Outcome


def report(name: str, pod: Pod, outcome: Outcome) -> None:
    counts = pod.check()
    times = outcome.reconverge_s
    record(
        "fault",
        name,
        {
            "workers": len(pod.workers),
            "changed_during_fault": outcome.changed,
            "reconverge_s": round(max(times), 3),
            "reconverge_all_s": [round(t, 3) for t in times],
            "cpu_during_outage": outcome.cpu,
            "runs": len(times),
            **counts,
            **outcome.extra,
        },
    )


def run(name: str, pod: Pod) -> None:
    outcome = SCENARIOS[name](pod)
    report(name, pod, outcome)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_kill9_config_changed_while_down_restarted_empty(make_pod: MakePod) -> None:
    run("redis_kill9_restart_empty", make_pod())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_kill9_restarted_with_its_aof(make_pod: MakePod) -> None:
    run("redis_kill9_restart_with_aof", make_pod(appendonly=True))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_restarted_from_an_older_aof(make_pod: MakePod) -> None:
    run("redis_restarted_from_older_aof", make_pod(appendonly=True))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_restored_from_an_older_rdb_while_workers_run_newer(make_pod: MakePod) -> None:
    run("redis_restored_from_older_rdb", make_pod())


@pytest.mark.timeout(90)
def test_signed_replay_of_an_old_entry(make_pod: MakePod) -> None:
    run("signed_replay_of_an_old_entry", make_pod(signed=True))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_frozen_longer_than_the_block_timeout(make_pod: MakePod) -> None:
    run("redis_sigstop", make_pod())


@pytest.mark.timeout(90)
def test_client_kill_of_every_client(make_pod: MakePod) -> None:
    run("client_kill_all", make_pod())


@pytest.mark.timeout(90)
def test_events_stream_deleted(make_pod: MakePod) -> None:
    run("events_stream_deleted", make_pod())


@pytest.mark.timeout(90)
def test_script_flush(make_pod: MakePod) -> None:
    run("script_flush", make_pod())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_daemon_kill9_mid_burst_and_restarted(make_pod: MakePod) -> None:
    run("daemon_kill9_mid_burst", make_pod(size=BURST_PAD))


@pytest.mark.timeout(90)
def test_two_daemons_at_once(make_pod: MakePod) -> None:
    run("two_daemons", make_pod())


@pytest.mark.timeout(90)
def test_inotify_queue_overflow_while_the_daemon_is_stopped(make_pod: MakePod) -> None:
    run("inotify_overflow", make_pod(daemon_args=("--resync-interval", "2")))


@pytest.mark.timeout(90)
def test_mount_directory_removed_and_recreated(make_pod: MakePod) -> None:
    run("mount_directory_removed", make_pod())


@pytest.mark.timeout(90)
def test_worker_kill9_and_a_new_one_replays(make_pod: MakePod) -> None:
    run("worker_kill9_replay", make_pod())
