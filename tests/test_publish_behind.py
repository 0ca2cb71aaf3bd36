"""Behind: a content read before another publisher appended a newer entry is not written
above it (docs/design.md "Behind"; the pinned case is in tests/test_never_backwards.py).

Two publishers on one stream, the mount going 1 -> 2 -> 3: ``fast`` reads 3 (it coalesced),
``slow`` read 2 before ``fast`` appended 3 and publishes it after. What ``slow`` knew of the
stream before it read 2 (``seen``: the id of its newest entry then) tells the script that 3
is an entry it had not seen: 2 may be older, and is answered ``behind``. Real redis-server
throughout; the daemon-level tests run two real ``Daemon``s, each on its own kubelet-written
mount (two pods) or both on one (the fault soak's two daemons), the order made
deterministic by holding a daemon in its own hooks (its pre-read's, or its publish call):
the other's kubelet write and publish happen while it is held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher import _earlyfloor
from publisher._earlyfloor import EarlyFloor
from publisher._marks import RolloutMark
from publisher.daemon import Daemon
from publisher.publish import Publisher, PublishResult
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, encode_worker_state, sha256_hex
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount
from tests.helpers import events, wait_until

KEY = "app.yaml"
SIGNING_KEY = b"a3f1c0de9b7e4f2a8c6d5e4f3a2b1c0d"
LARGE = 70 * 1024  # at or above publisher._fast.FAST_FROM: decided around Lua


def rev(n: int, pad: int = 0) -> bytes:
    return f"rev: {n}\n".encode() + b"#" * pad


def revs(client: redis.Redis, pad: int = 0) -> list[int]:
    """The stream's contents as revs, oldest first."""
    known = {sha256_hex(rev(n, pad)): n for n in range(1, 20)}
    return [known[e.sha256] for e in events(client, KEY)]


def pair(client: redis.Redis, signing_key: bytes | None = None) -> tuple[Publisher, Publisher]:
    fast = Publisher(client, publisher_id="pod-a:1", signing_key=signing_key)
    slow = Publisher(client, publisher_id="pod-b:1", signing_key=signing_key)
    return fast, slow


@pytest.mark.parametrize(
    ("signing_key", "pad"),
    [(None, 0), (SIGNING_KEY, 0), (None, LARGE), (SIGNING_KEY, LARGE)],
    ids=["plain", "signed", "large", "signed-large"],
)
def test_behind_in_every_mode_and_a_resync_publishes_nothing(
    client: redis.Redis, signing_key: bytes | None, pad: int
) -> None:
    """Plain (ARGV[12]), signed (extended, ARGV[24]), a large content (decided around Lua).
    The mount goes 1 -> 2 -> 3 -> 4; ``fast`` appends 4, ``slow`` read 2 and then 3 before
    that: both are behind, and its base stays at 1's entry, so 3 is behind 4 too (with the
    base moved to 4's entry it would be written above it). Publishing 2 again with what it
    had seen (the daemon's resync) is behind again; with a fresher seen or none it writes
    nothing either (it is held: superseded). Its mount reaching 4 finds it."""
    fast, slow = pair(client, signing_key)
    fast.publish(KEY, rev(1, pad))
    v1 = slow.publish(KEY, rev(1, pad))
    v2 = fast.publish(KEY, rev(4, pad))
    late = slow.publish(KEY, rev(2, pad), seen=v1.entry_id)
    assert (late.written, late.behind, late.version, late.entry_id) == (
        False,
        True,
        2,
        v2.entry_id,
    )
    assert slow.publish(KEY, rev(2, pad), seen=v1.entry_id).behind  # a resync
    third = slow.publish(KEY, rev(3, pad), seen=v1.entry_id)  # read before 4's append
    assert (third.written, third.behind) == (False, True)
    for seen in (v2.entry_id, ""):  # what it knows now, or nothing
        again = slow.publish(KEY, rev(3, pad), seen=seen)
        assert (again.written, again.superseded, again.behind) == (False, True, False)
    assert slow.highest_version[KEY] == 1  # the floor stays: nothing of ours is above v1
    assert not slow.publish(KEY, rev(4, pad)).written  # its mount catches up: found
    assert revs(client, pad) == [1, 4]


def test_a_content_read_after_the_others_append_is_written_at_once(client: redis.Redis) -> None:
    """A genuinely newer ConfigMap: ``slow`` read 4 after ``fast`` appended 3 (its seen is
    3's entry), so nothing it had not seen was appended: 4 is written, at once."""
    fast, slow = pair(client)
    fast.publish(KEY, rev(1))
    slow.publish(KEY, rev(1))
    v2 = fast.publish(KEY, rev(3))
    newer = slow.publish(KEY, rev(4), seen=v2.entry_id)
    assert (newer.written, newer.behind, newer.version) == (True, False, 3)
    assert revs(client) == [1, 3, 4]


def test_a_publisher_s_own_appends_never_make_it_behind(client: redis.Redis) -> None:
    """``slow`` publishes 2, then 3, whose pre-read asked before 2's append returned (its
    seen is still 1's entry): its own entry is its base, 3 is written. So is a content read
    before an operation this publisher wrote itself (a rollback carried out meanwhile)."""
    publisher = Publisher(client, publisher_id="pod-b:1")
    v1 = publisher.publish(KEY, rev(1))
    assert publisher.publish(KEY, rev(2), seen=v1.entry_id).written
    v3 = publisher.publish(KEY, rev(3), seen=v1.entry_id)
    assert v3.written
    before = v3.entry_id
    rollback = RolloutMark(
        rollout="rollback", rollout_of=3, rollout_sha256=sha256_hex(rev(3)), expect=3
    )
    assert publisher.publish(KEY, rev(2), mark=rollback).written  # an operation: v4
    written = publisher.publish(KEY, rev(5), seen=before)
    assert (written.written, written.behind) == (True, False)
    assert revs(client) == [1, 2, 3, 2, 5]


def test_an_older_argument_list_is_decided_as_before(client: redis.Redis) -> None:
    """Without seen (11 arguments, or 16 signed) the script decides as it did: 2 is written
    above 3 (what seen is for), and a caller that passes an empty seen gets the same."""
    fast, slow = pair(client)
    fast.publish(KEY, rev(1))
    slow.publish(KEY, rev(1))
    fast.publish(KEY, rev(3))
    assert slow.publish(KEY, rev(2), seen="").written
    assert revs(client) == [1, 3, 2]


def run(daemon: Daemon) -> threading.Thread:
    runner = threading.Thread(target=daemon.run)
    runner.start()
    return runner


def report(client: redis.Redis, rows: int) -> None:
    for i in range(rows):
        state = WorkerState(worker=f"w:{i}", status="applied", version=0, seen=0)
        client.hset(stream_keys(KEY).workers, f"w:{i}", encode_worker_state(state))


@pytest.mark.parametrize(
    "rows", [0, _earlyfloor.MAX_ROWS + 1], ids=["asked-early", "read-by-the-loop"]
)
def test_two_daemons_the_lagging_one_publishes_nothing_older(
    redis_server: RedisServer,
    client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
) -> None:
    """Two real daemons (two pods), each on its own kubelet-written mount. Pod b's kubelet
    writes 2; once b has read the stream's head (1's entry: asked early on watchdog's
    thread, or -- over ``MAX_ROWS`` workers' rows -- read by the loop), pod a's kubelet goes
    to 3 and a publishes it, and only then does b's kubelet swap 2 in. b publishes what it
    knew before it read 2: behind, logged and counted; a resync of 2 is behind again.
    b's next swap (3) finds a's entry; the one after (4), whose pre-read saw 3, is written at
    once. Without seen, b wrote 2 above 3: the workers ran 1, 3, 2, 3."""
    report(client, rows)  # known to both daemons from their first publish
    mount_a, mount_b = KubeletMount(tmp_path / "a"), KubeletMount(tmp_path / "b")
    for mount in (mount_a, mount_b):
        mount.write({KEY: rev(1)})
    results: list[PublishResult] = []
    coming: Callable[[Daemon, str], None] = Daemon._coming
    raced: list[bool] = []

    def pod_a_goes_first(daemon: Daemon, directory: str) -> None:
        coming(daemon, directory)
        if daemon is b and not raced:
            raced.append(True)
            daemon._early.take("not-a-key")  # a request sent: its answer in
            wait_until(lambda: KEY in daemon._early._seen, "b read the head before its swap")
            mount_a.write({KEY: rev(3)})
            wait_until(lambda: revs(client) == [1, 3], "a published 3")

    monkeypatch.setattr(Daemon, "_coming", pod_a_goes_first)
    url, directory = redis_server.url, mount_b.directory
    a = Daemon([mount_a.directory], redis_url=url, check_interval=3600)
    b = Daemon([directory], redis_url=url, check_interval=3600, on_publish=results.append)
    runners = [run(a)]
    try:
        wait_until(lambda: revs(client) == [1], "a published 1")
        runners.append(run(b))
        wait_until(lambda: b._idle is not None and len(results) == 1, "b found 1")
        mount_b.write({KEY: rev(2)})
        wait_until(lambda: len(results) == 2, "b published 2")
        assert (results[1].written, results[1].behind, results[1].version) == (False, True, 2)
        assert revs(client) == [1, 3]
        assert b.metrics.behind.labels(KEY)._value.get() == 1
        b._intake.mark()  # a resync: the same content, with what b had seen before it read it
        wait_until(lambda: len(results) == 3, "b's resync")
        assert (results[2].written, results[2].behind) == (False, True)
        mount_b.write({KEY: rev(3)})  # b's kubelet catches up: a's entry found
        wait_until(lambda: len(results) == 4, "b found 3")
        assert (results[3].written, results[3].version) == (False, 2)
        mount_b.write({KEY: rev(4)})  # read after 3: written at once
        wait_until(lambda: len(results) == 5, "b published 4")
        assert (results[4].written, results[4].version) == (True, 3)
        assert revs(client) == [1, 3, 4]
    finally:
        for daemon in (a, b):
            daemon.request_stop()
        for runner in runners:
            runner.join(10)
    assert not any(runner.is_alive() for runner in runners)


def test_the_newest_entry_id_comes_with_the_floor(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """``EarlyFloor``: the request sent while kubelet writes, and the loop's read, hand out
    the stream's newest entry id once ('0-0': none), from the head while it matches the
    stream; an entry appended without the head is read (sent) or unknown (the loop's read).
    A user whose ACL predates the head still gets floor and id from the request."""
    early = EarlyFloor("hotreload")
    try:
        early.ready(client)
        assert early.send([KEY])
        assert (early.take(KEY), early.seen(KEY), early.seen(KEY)) == (0, "0-0", "")
        written = Publisher(client).publish(KEY, rev(1))
        assert early.send([KEY])
        assert early.seen(KEY) == written.entry_id
        early.read(client, [KEY])
        assert early.seen(KEY) == written.entry_id
        headless = cast("bytes", client.xadd(stream_keys(KEY).events, {"version": "2"})).decode()
        assert early.send([KEY])
        assert early.seen(KEY) == headless
        early.read(client, [KEY])
        assert early.seen(KEY) == ""  # the head is stale: unknown, not its older id
    finally:
        early.close()
    keys = ["~hotreload:{*}:workers", "~hotreload:{*}:events"]  # an ACL from before the head
    client.acl_setuser("old", enabled=True, passwords=["+pw"], commands=["+@all"], keys=keys)
    old = redis.Redis.from_url(redis_server.url, username="old", password="pw")
    early = EarlyFloor("hotreload")
    try:
        early.ready(old)
        assert early.send([KEY])
        assert (early.take(KEY), early.seen(KEY)) == (0, headless)
        log = cast("list[dict[str, str]]", client.acl_log())
        denied = {(entry["username"], entry["object"]) for entry in log}
        assert denied == {("old", "hotreload:{app.yaml}:head")}  # the head alone refused
    finally:
        early.close()
        old.close()


def test_two_daemons_on_one_mount_the_coalescing_one_wins(
    redis_server: RedisServer,
    client: redis.Redis,
    kubelet_mount: KubeletMount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fault soak's case: two real daemons on ONE kubelet-written mount going 1 -> 2 -> 3.
    Daemon a is held while kubelet writes 2 (its watchdog thread waits in its pre-read
    hook), so it reads the mount only after 3 is swapped in: it coalesces and publishes 3.
    Daemon b reads 2 and is held between its read and its publish until a has appended 3
    (kubelet writes 3 from b's hold). b's publish of 2 says what b knew before the read (1's
    entry): behind, not written above 3; then b finds 3."""
    kubelet_mount.write({KEY: rev(1)})
    results: list[PublishResult] = []
    three_written = threading.Event()
    coming: Callable[[Daemon, str], None] = Daemon._coming
    held: list[str] = []

    def a_waits_for_three(daemon: Daemon, directory: str) -> None:
        if daemon is a and not held:
            held.append("a")
            three_written.wait(20)  # a's thread: the swap to 2 is read after 3's
        coming(daemon, directory)

    monkeypatch.setattr(Daemon, "_coming", a_waits_for_three)
    url, mount = redis_server.url, [kubelet_mount.directory]
    a = Daemon(mount, redis_url=url, check_interval=3600)
    b = Daemon(mount, redis_url=url, check_interval=3600, on_publish=results.append)
    publish = b._release.publish

    def b_publishes_two_after_three(*args: Any, **kwargs: Any) -> PublishResult:
        if args[2] == rev(2):
            kubelet_mount.write({KEY: rev(3)})
            three_written.set()
            wait_until(lambda: revs(client) == [1, 3], "a published 3")
        return publish(*args, **kwargs)

    monkeypatch.setattr(b._release, "publish", b_publishes_two_after_three)
    runners = [run(a)]
    try:
        wait_until(lambda: revs(client) == [1] and a._idle is not None, "a published 1")
        runners.append(run(b))
        wait_until(lambda: b._idle is not None and len(results) == 1, "b found 1")
        kubelet_mount.write({KEY: rev(2)})
        wait_until(lambda: any(r.sha256 == sha256_hex(rev(3)) for r in results), "b on 3")
        by_rev = {r.sha256: r for r in results}
        two, three = by_rev[sha256_hex(rev(2))], by_rev[sha256_hex(rev(3))]
        assert (two.written, two.behind) == (False, True)
        assert (three.written, three.version) == (False, 2)
        assert revs(client) == [1, 3]
        assert held == ["a"]
    finally:
        three_written.set()
        for daemon in (a, b):
            daemon.request_stop()
        for runner in runners:
            runner.join(10)
    assert not any(runner.is_alive() for runner in runners)
