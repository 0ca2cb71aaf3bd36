"""Real worker processes (tests/workers/subscriber_worker.py) against a real redis-server:
fan-out, rejection, walk-back, and every worker converging after Redis faults.

Fault windows (Redis killed, frozen) are fixed durations on purpose: they are the fault.
Everything else waits by polling with a deadline.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState
from subscriber.testing import RedisServer, append_event
from tests.conftest import Processes
from tests.helpers import cpu_seconds, wait_until
from tests.workers.harness import (
    Worker,
    acks,
    spawn_workers,
    state_of,
    wait_converged,
    worker_states,
)

KEY = "limits.yaml"
WORKERS = 4
# 1 s blocks: a frozen Redis is noticed after 1 + 3 s (the socket timeout margin)
OPTIONS = ("--block-ms", "1000", "--heartbeat", "1.0")


def publish(server: RedisServer, text: str, version: int) -> None:
    append_event(server.url, KEY, text.encode(), version=version)


def start_fleet(
    processes: Processes, server: RedisServer, directory: Path, count: int = WORKERS
) -> list[Worker]:
    workers = spawn_workers(processes, server.url, KEY, directory, count, *OPTIONS)
    for worker in workers:
        outcome = worker.wait_started()
        assert outcome["event"] == "started", outcome
    return workers


def fleet_states(server: RedisServer) -> Callable[[], dict[str, WorkerState]]:
    """What :workers shows of the fleet, read afresh at each call."""
    return lambda: worker_states(server.url, KEY)


def subscriber_connections(server: RedisServer) -> dict[str, int]:
    """Client name -> connection id of every subscriber connected now."""
    client = connect(server.url, socket_timeout=5.0)
    try:
        clients = cast("list[dict[str, Any]]", client.client_list())
    finally:
        client.close()
    return {c["name"]: int(c["id"]) for c in clients if c["name"].startswith("hotreload-sub:")}


def wait_all_connected(server: RedisServer, count: int = WORKERS) -> dict[str, int]:
    """The subscriber connections once every worker's thread has connected (start() used
    a connection of its own, closed when it returned)."""

    def all_connected() -> dict[str, int] | None:
        connections = subscriber_connections(server)
        return connections if len(connections) == count else None

    return wait_until(all_connected, f"{count} subscriber connections")


def wait_reconnected(server: RedisServer, before: dict[str, int]) -> None:
    """Every worker that was connected is connected again, on a newer connection."""

    def reconnected() -> bool:
        now = subscriber_connections(server)
        return now.keys() == before.keys() and all(now[n] > before[n] for n in before)

    wait_until(reconnected, "every worker reconnected")


def test_fan_out_reaches_every_worker_process(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    workers = start_fleet(processes, redis_server, tmp_path)
    assert {w.lines("started")[0]["version"] for w in workers} == {1}
    for version in (2, 3, 4):
        publish(redis_server, f"rate: {version}", version)
        wait_converged(fleet_states(redis_server), workers, f"rate: {version}", version)
    for worker in workers:
        assert worker.applied() == ["rate: 1", "rate: 2", "rate: 3", "rate: 4"]
    applied_acks = [a for a in acks(redis_server.url, KEY) if a.version == 4]
    assert len({a.worker for a in applied_acks}) == WORKERS

    for worker in workers:  # SIGTERM: a clean stop, recorded as such
        worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.process.wait(10) == 0
        (stopped,) = worker.lines("stopped")
        assert stopped["stop_s"] < 1.0
    states = worker_states(redis_server.url, KEY).values()
    assert {s.status for s in states} == {"stopped"}


def test_rejection_keeps_every_worker_on_the_previous_config_and_late_workers_walk_back(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    workers = start_fleet(processes, redis_server, tmp_path)
    publish(redis_server, "rate: REJECT", 2)

    def all_rejected() -> bool:
        states = worker_states(redis_server.url, KEY).values()
        return len([s for s in states if s.status == "rejected"]) == WORKERS

    wait_until(all_rejected, "every worker reports the rejection")
    for state in worker_states(redis_server.url, KEY).values():
        assert (state.version, state.rejected_version) == (1, 2)
        assert state.error == "ValueError: refusing content marked REJECT"
    rejections = [a for a in acks(redis_server.url, KEY) if a.status == "rejected"]
    assert len(rejections) == WORKERS
    assert {a.error for a in rejections} == {"ValueError: refusing content marked REJECT"}
    assert all(w.applied() == ["rate: 1"] for w in workers)

    # A worker starting now comes up on what its siblings run, and says why.
    (late,) = spawn_workers(processes, redis_server.url, KEY, tmp_path, 1, *OPTIONS)
    started = late.wait_started()
    assert (started["event"], started["version"], started["status"]) == ("started", 1, "rejected")
    assert late.applied() == ["rate: 1"]
    late_state = state_of(late, redis_server.url, KEY)
    assert late_state is not None
    assert late_state.rejected_version == 2
    assert len([a for a in acks(redis_server.url, KEY) if a.status == "rejected"]) == WORKERS + 1

    publish(redis_server, "rate: 3", 3)  # the fix reaches everyone
    wait_converged(fleet_states(redis_server), [*workers, late], "rate: 3", 3)
    assert {s.status for s in worker_states(redis_server.url, KEY).values()} == {"applied"}


def outage_cpu_share(workers: list[Worker], seconds: float) -> list[float]:
    """CPU time / wall time of each worker process over a ``seconds`` window."""
    before = [cpu_seconds(w.pid) for w in workers]
    began = time.monotonic()
    time.sleep(seconds)  # the outage itself: a fixed window is the measurement
    wall = time.monotonic() - began
    return [(cpu_seconds(w.pid) - b) / wall for w, b in zip(workers, before, strict=True)]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_workers_survive_redis_killed_and_restarted_empty_with_near_zero_cpu(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    for version in (1, 2, 3):
        publish(redis_server, f"rate: {version}", version)
    workers = start_fleet(processes, redis_server, tmp_path)

    redis_server.kill()
    shares = outage_cpu_share(workers, 5.0)
    print("CPU share per worker while Redis is down: " + ", ".join(f"{s:.2%}" for s in shares))
    assert max(shares) < 0.05
    assert all(w.process.poll() is None for w in workers)

    redis_server.start()  # empty: no history, no :workers, ids and versions start over
    # each worker rewrites its state after the resync: still on version 3
    wait_converged(fleet_states(redis_server), workers, "rate: 3", 3, timeout=20)
    publish(redis_server, "rate: stale", 1)  # version 1 again: below what workers have seen
    publish(redis_server, "rate: after restart", 4)  # published above it: applied
    wait_converged(fleet_states(redis_server), workers, "rate: after restart", 4)
    for worker in workers:
        assert worker.applied() == ["rate: 3", "rate: after restart"]
        assert "lost Redis" in worker.log()
        assert "holding v3: the stream is empty" in worker.log()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_workers_detect_a_frozen_redis_and_converge_after_it_thaws(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    workers = start_fleet(processes, redis_server, tmp_path)
    before = wait_all_connected(redis_server)

    redis_server.freeze()
    try:
        shares = outage_cpu_share(workers, 15.0)
    finally:
        redis_server.thaw()
    print("CPU share per worker while Redis is frozen: " + ", ".join(f"{s:.2%}" for s in shares))
    assert max(shares) < 0.05

    publish(redis_server, "rate: 2", 2)
    wait_converged(fleet_states(redis_server), workers, "rate: 2", 2, timeout=20)
    for worker in workers:
        # noticed by the socket timeout, not by luck: every worker reconnected
        assert "lost Redis" in worker.log()
    wait_reconnected(redis_server, before)  # all on new connections


def test_workers_reconnect_after_client_kill(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    workers = start_fleet(processes, redis_server, tmp_path)
    before = wait_all_connected(redis_server)
    admin = connect(redis_server.url, socket_timeout=5.0)
    try:
        killed = admin.client_kill_filter(_type="normal", skipme=True)
        assert killed >= WORKERS
        # published while they reconnect: the resync must pick it up
        publish(redis_server, "rate: 2", 2)
    finally:
        admin.close()
    wait_converged(fleet_states(redis_server), workers, "rate: 2", 2)
    wait_reconnected(redis_server, before)
    assert all(w.applied() == ["rate: 1", "rate: 2"] for w in workers)


def test_workers_follow_a_deleted_and_recreated_stream(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    for version in (1, 2):
        publish(redis_server, f"rate: {version}", version)
    workers = start_fleet(processes, redis_server, tmp_path)
    admin = connect(redis_server.url, socket_timeout=5.0)
    try:
        admin.delete(stream_keys(KEY).events, stream_keys(KEY).workers)
    finally:
        admin.close()
    # re-seeded above what the workers have seen (a version 1 would be refused as a replay)
    publish(redis_server, "rate: recreated", 3)
    wait_converged(fleet_states(redis_server), workers, "rate: recreated", 3)
    publish(redis_server, "rate: next", 4)
    wait_converged(fleet_states(redis_server), workers, "rate: next", 4)
    assert all(w.applied() == ["rate: 2", "rate: recreated", "rate: next"] for w in workers)
