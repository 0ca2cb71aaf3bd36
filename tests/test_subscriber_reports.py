"""A worker's reports (acks, its state) after a decision: held briefly, then written once.

The follow loop holds the reports of a decision for ``REPORT_DELAY`` (``subscriber._reports``:
out of the way of the other workers' propagation, issue 21); ``stop()`` writes what is held,
and a report counts as written once Redis answered it, so a read cut short by ``stop()`` or
a lost connection does not send it again. Real redis-server, both clients.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from subscriber import _reports
from subscriber._pool import InterruptiblePool, execute
from subscriber._redis import connect
from subscriber._reports import REPORT_DELAY, Reports
from subscriber._wire import Batch
from subscriber.keys import stream_keys
from subscriber.protocol import Ack
from subscriber.testing import RedisServer, append_event
from tests.helpers import Recorder, wait_until
from tests.subscriber_driver import KINDS, Kind, Make, drivers
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
KEYS = stream_keys(KEY)


@pytest.fixture(params=KINDS)
def subscribers(request: pytest.FixtureRequest) -> Iterator[Make]:
    kind: Kind = request.param
    yield from drivers(kind)


def acks_of(server: RedisServer, version: int) -> list[Ack]:
    return [ack for ack in acks(server.url, KEY) if ack.version == version]


def test_a_held_report_is_written_by_stop_exactly_once(
    redis_server: RedisServer, subscribers: Make
) -> None:
    """``stop()`` right after a decision, while its ack is held: written, once, and the
    final state shows the version."""
    append_event(redis_server.url, KEY, b"rate: 1", version=1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", block_ms=30_000
    ).start()
    append_event(redis_server.url, KEY, b"rate: 2", version=2)
    wait_until(lambda: sub.version == 2, "version 2 applied", interval=0.001)
    sub.stop()
    assert [(a.worker, a.status) for a in acks_of(redis_server, 2)] == [("w", "applied")]
    state = worker_states(redis_server.url, KEY)["w"]
    assert (state.status, state.version) == ("stopped", 2)


def test_an_ack_on_a_read_cut_short_by_stop_is_not_written_again(
    redis_server: RedisServer, subscribers: Make
) -> None:
    """The ack went out with the blocking read that ``stop()`` then cut short: Redis had
    answered it, so the final write does not repeat it (it did, every time: 2 acks)."""
    append_event(redis_server.url, KEY, b"rate: 1", version=1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", block_ms=30_000
    ).start()
    append_event(redis_server.url, KEY, b"rate: 2", version=2)
    wait_until(lambda: acks_of(redis_server, 2), "the ack of version 2")
    append_event(redis_server.url, KEY, b"rate: 3", version=3)
    wait_until(lambda: acks_of(redis_server, 3), "the ack of version 3")
    time.sleep(REPORT_DELAY)  # the reply of the read that carried it: long since read
    sub.stop()
    assert len(acks_of(redis_server, 2)) == len(acks_of(redis_server, 3)) == 1
    assert worker_states(redis_server.url, KEY)["w"].status == "stopped"


def test_a_report_held_across_a_lost_connection_is_written_once(
    redis_server: RedisServer,
    client: redis.Redis,
    subscribers: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection is killed while the ack of version 2 is held (from inside the
    callback): the worker reconnects, resyncs over the same entries and writes the ack once."""
    append_event(redis_server.url, KEY, b"rate: 1", version=1)

    def kill_own_connection(text: str) -> None:
        if text == "rate: 2":
            for known in client.client_list():
                if known["name"].startswith("hotreload-sub"):
                    client.client_kill_filter(_id=known["id"])

    sub = subscribers(KEY, kill_own_connection, redis_url=redis_server.url, worker_id="w",
                      block_ms=30_000)  # fmt: skip
    sub.start()
    append_event(redis_server.url, KEY, b"rate: 2", version=2)
    wait_until(lambda: acks_of(redis_server, 2), "the ack of version 2")
    append_event(redis_server.url, KEY, b"rate: 3", version=3)  # followed on after it
    wait_until(lambda: acks_of(redis_server, 3), "the ack of version 3")
    sub.stop()
    assert "lost Redis" in caplog.text  # the connection was killed, the worker reconnected
    assert [(a.status, a.entry_id != "") for a in acks_of(redis_server, 2)] == [("applied", True)]
    assert len(acks_of(redis_server, 3)) == 1


def _ack(entry_id: str, status: Any = "applied") -> Ack:
    return Ack(worker="w", version=2, sha256="a" * 64, status=status, entry_id=entry_id)


def test_a_decision_reached_twice_is_reported_once_and_an_unanswered_one_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes reaching the same entry (as a resync re-reading it would) queue its ack
    once; a report Redis never answered (its round trip failed before) goes out again."""
    monkeypatch.setattr(_reports, "REPORT_DELAY", 0.03)  # the hold, whatever the default
    hold = _reports.REPORT_DELAY
    states: list[bool] = []

    def queue_state(pipe: Batch, stopped: bool) -> None:  # the state's HSET, as a worker's
        states.append(stopped)
        pipe.hset(KEYS.workers, "w", b"{}")

    reports = Reports(KEYS.acks, queue_state)
    now = time.monotonic()
    reports.add([_ack("1-1")], now=now, hold=True)
    reports.add([_ack("1-1"), _ack("1-2", "rejected")], now=now, hold=True)
    assert reports.queue(Batch(), now=now) == 0  # held
    unanswered = Batch()
    assert reports.queue(unanswered, now=now + hold) == 3  # 2 acks and the state
    reports.add([_ack("1-1")], now=now, hold=True)  # its round trip failed: pending, once
    batch = Batch()
    assert reports.queue(batch, now=now) == 3  # the unanswered ones, at once
    client = connect(redis_server.url, socket_timeout=5.0, pool_class=InterruptiblePool)
    try:
        execute(client, batch, raise_on_error=True)
    finally:
        client.close()
    reports.add([_ack("1-1")], now=now, hold=False)  # answered: a new report is new again
    assert reports.queue(Batch(), now=now) == 2
    written = [(a.entry_id, a.status) for a in acks(redis_server.url, KEY)]
    assert written == [("1-1", "applied"), ("1-2", "rejected")]
    assert states == [False, False, False]


def test_an_unanswered_older_applied_ack_is_not_sent_after_a_newer_one(
    redis_server: RedisServer,
) -> None:
    """A reply that never came may still mean Redis ran the ``XADD`` (a connection killed
    after it did): of the unanswered ``applied`` acks only the newest goes out again, so a
    worker's applied acks never go back in ``:acks`` (the stress checker saw ``applied v42``
    re-sent after ``v43``); rejections all go out again."""

    def ack(entry_id: str, version: int, status: Any = "applied") -> Ack:
        return Ack(worker="w", version=version, sha256="a" * 64, status=status, entry_id=entry_id)

    reports = Reports(KEYS.acks, lambda pipe, stopped: pipe.hset(KEYS.workers, "w", b"{}"))
    now = time.monotonic()
    reports.add([ack("1-1", 1), ack("1-2", 2), ack("1-3", 3, "rejected")], now=now, hold=False)
    assert reports.queue(Batch(), now=now) == 4  # 3 acks and the state; never answered
    reports.add([ack("1-4", 4)], now=now, hold=False)
    batch = Batch()
    assert reports.queue(batch, now=now) == 4  # v2, the rejection of v3, v4 and the state
    client = connect(redis_server.url, socket_timeout=5.0, pool_class=InterruptiblePool)
    try:
        execute(client, batch, raise_on_error=True)
    finally:
        client.close()
    written = [(a.version, a.status) for a in acks(redis_server.url, KEY)]
    assert written == [(2, "applied"), (3, "rejected"), (4, "applied")]


FORKS = """
import os, sys, time
from subscriber import Subscriber, _reports
from subscriber.testing import append_event

_reports.REPORT_DELAY = 30.0  # held until stop(), whatever the machine's load

url, key = sys.argv[1], sys.argv[2]
sub = Subscriber(key, lambda _t: None, redis_url=url, worker_id="parent", block_ms=30_000)
sub.start()
append_event(url, key, b"rate: 2", version=2)
while sub.version != 2:
    time.sleep(0.001)
held = len(sub._reports.acks)  # the ack of version 2, held
pid = os.fork()
if pid == 0:  # the child: whatever it inherited is its parent's to write
    os._exit(len(sub._reports.acks) + 10 * len(sub._reports.in_flight))
_, status = os.waitpid(pid, 0)
sub.stop()
print(held, os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_drops_the_reports_its_parent_holds(redis_server: RedisServer) -> None:
    append_event(redis_server.url, KEY, b"rate: 1", version=1)
    done = subprocess.run(
        [sys.executable, "-c", FORKS, redis_server.url, KEY],
        capture_output=True,
        check=True,
        timeout=60,
    )
    held, child = done.stdout.split()
    assert (int(held), int(child)) == (1, 0)
    assert [a.worker for a in acks_of(redis_server, 2)] == ["parent"]  # stop() wrote it, once


def _xread_calls(server: RedisServer) -> int:
    admin = connect(server.url, socket_timeout=5)
    try:
        stats = admin.info("commandstats")
    finally:
        admin.close()
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def test_held_reports_are_waited_out_before_the_next_read_is_sent(
    redis_server: RedisServer, subscribers: Make
) -> None:
    """A change costs one read that returns (its entry) and the next one (blocking, with its
    held reports): no read in between that times out at the hold's end (``_hubplan.held_for``:
    one message each way and a wake-up of the worker and of Redis fewer per update)."""
    assert _reads_per_change(redis_server, subscribers) == 1


def test_held_reports_are_waited_out_by_a_subscriber_on_its_own_thread(
    redis_server: RedisServer,
) -> None:
    """The same with ``shared=False`` (``client.Subscriber._cycle``)."""
    for make in drivers("Subscriber"):
        assert _reads_per_change(redis_server, make, shared=False) == 1


def _reads_per_change(redis_server: RedisServer, subscribers: Make, **kwargs: Any) -> int:
    """The XREADs that completed for one change: from the read that returns it to the one
    that carries its held reports (then blocking, not counted yet)."""
    from tests.test_hub import blocked_reads

    append_event(redis_server.url, KEY, b"rate: 1", version=1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", block_ms=30_000, **kwargs
    ).start()
    try:
        wait_until(lambda: len(blocked_reads(redis_server.url, "w")) == 1, "a blocked read")
        before = _xread_calls(redis_server)
        append_event(redis_server.url, KEY, b"rate: 2", version=2)
        wait_until(lambda: sub.version == 2, "version 2 applied", interval=0.001)
        wait_until(lambda: [a.status for a in acks_of(redis_server, 2)] == ["applied"], "acked")
        wait_until(lambda: len(blocked_reads(redis_server.url, "w")) == 1, "blocked again")
        return _xread_calls(redis_server) - before
    finally:
        sub.stop()
