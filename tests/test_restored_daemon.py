"""The daemon's side of a first publish held while its ``:workers`` rows predate Redis's
start (``publisher._restored``), in process (the thread that defers, and what waits, is
what is tested), with a real redis-server and a mount written the way kubelet writes it.

A first publish deferred on a watcher's thread (``Daemon._delivered``: an idle daemon
publishes a kubelet swap right there) is looked at again when its wait says
(``publisher._restored``: every ``RECHECK`` s, at the latest when its bound ends), not at the
loop's next wake-up: the loop, idle, slept until its next stream check, computed before the
key waited, and nothing woke it (up to ``check_interval``, 1 s, late; here the check is an
hour away, so the key was published an hour late). ``app.yaml`` joins the mount while the
daemon is idle, its ``:workers`` rows those of workers gone 10 minutes ago (a Redis restored
or restarted).
"""

from __future__ import annotations

import logging
import threading

import msgspec
import pytest
import redis

from publisher.daemon import Daemon
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, now_ms
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount
from tests.helpers import LOOP, events, running, wait_until

KEY = "app.yaml"
WAITS = "its first publish waits"


def row(worker: str, *, heartbeat: int, interval: float) -> bytes:
    state = WorkerState(worker=worker, status="applied", version=3, seen=3,
                        heartbeat=heartbeat, heartbeat_interval=interval, pid=1)  # fmt: skip
    return msgspec.json.encode(state)


@pytest.mark.parametrize("ends", ["a worker reports", "its bound"])
def test_a_first_publish_deferred_on_a_watcher_s_thread_goes_when_its_wait_ends(
    kubelet_mount: KubeletMount,
    redis_server: RedisServer,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    ends: str,
) -> None:
    """``a worker reports``: a row written after the deferral ends the wait (rows of 5 s
    heartbeats: the bound, 18 s from Redis's start, far); ``its bound``: rows of 1 s
    heartbeats, nobody comes back, the wait ends 6 s after Redis's start. Either way the
    key is published then: within 20 s here, against the hour to the idle loop's next
    check before the fix."""
    caplog.set_level(logging.INFO, logger="publisher")
    interval = 5.0 if ends == "a worker reports" else 1.0
    old = now_ms() - 600_000
    workers = stream_keys(KEY).workers
    client.hset(workers, mapping={w: row(w, heartbeat=old, interval=interval) for w in "ab"})
    kubelet_mount.write({"other.yaml": b"rev: 1\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, check_interval=3600)
    with running(daemon):
        wait_until(lambda: daemon.ready()[0] and daemon._idle is not None, "idle", 20)
        kubelet_mount.set(KEY, b"rev: 1\n")  # a new key, on the watcher's thread
        wait_until(lambda: any(WAITS in r.getMessage() for r in caplog.records), "deferred", 20)
        (deferred,) = [r for r in caplog.records if WAITS in r.getMessage()]
        assert deferred.threadName != LOOP  # deferred on the watcher's thread, the loop idle
        assert not events(client, KEY)
        if ends == "a worker reports":
            client.hset(workers, "back", row("back", heartbeat=now_ms(), interval=interval))
        wait_until(lambda: events(client, KEY), f"published once {ends}", 20)
    assert [e.content for e in events(client, KEY)] == [b"rev: 1\n"]


def test_a_waiting_key_whose_content_goes_back_to_one_refused_as_too_large_waits_no_more(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    """The snapshot ``all`` of two 0.6 MiB files is refused as too large (over what one
    entry may carry), before any row (no wait); then its rows are those of workers gone
    10 minutes ago and a smaller content's first publish waits; then the mount goes back
    to the refused content (nothing to publish: ``Intake.newest`` is None). The key waits
    no more (``FirstPublish.forget``); left waiting, its recheck time passed, it was due at
    every step and the loop spun (tens of thousands of steps a second) until the daemon
    stopped (44,261 steps in a second, measured), the key never published again."""
    big = {"a": b"a" * 600_000, "b": b"b" * 600_000}
    kubelet_mount.write(big)
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url,
                    snapshots={"all": kubelet_mount.directory})  # fmt: skip
    steps = 0
    wait = daemon._intake.wait

    def counted(timeout: float) -> None:  # the loop's idle wait: once per step
        nonlocal steps
        steps += 1
        wait(timeout)

    daemon._intake.wait = counted  # type: ignore[method-assign]
    too_large = daemon.metrics.errors.labels("all", "too_large")
    with running(daemon):
        wait_until(lambda: daemon.ready()[0] and too_large._value.get() == 1, "refused", 20)
        assert not events(client, "all")
        old = now_ms() - 600_000
        workers = stream_keys("all").workers
        client.hset(workers, mapping={w: row(w, heartbeat=old, interval=5.0) for w in "xy"})
        kubelet_mount.write({"a": b"a: small\n"})
        wait_until(lambda: daemon._first.waiting, "the smaller content's first publish waits")
        kubelet_mount.write(big)  # the refused content again, within the wait (18 s)
        wait_until(lambda: not daemon._first.waiting, "waits no more", 10)
        before = steps
        threading.Event().wait(1.0)
        assert steps - before < 100  # idle: a check a second, no spin
        assert too_large._value.get() == 1  # not refused again: unchanged since
    assert not events(client, "all")
