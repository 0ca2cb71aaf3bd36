"""Issue 22: a process's Subscribers share one connection and one thread (``subscriber._hub``)
and each key still behaves as a Subscriber of its own: its callback, acks, heartbeats,
failures, stop and recovery. Real redis-server processes throughout; connections are counted
with ``CLIENT LIST``, threads with ``threading.active_count()``.
"""

from __future__ import annotations

import logging
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from subscriber import AsyncSubscriber, Subscriber, _hub
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisCluster, RedisServer, append_event, free_port
from tests.conftest import REPO
from tests.helpers import Recorder, settles, wait_until
from tests.workers.harness import acks, worker_states

if TYPE_CHECKING:
    from tests.conftest import Processes

KEYS = [f"k{index:02d}.yaml" for index in range(20)]
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3, "metrics": False}


def publish_all(url: str, version: int, keys: list[str] = KEYS, text: str = "v") -> None:
    for key in keys:
        append_event(url, key, f"{key} {text}{version}".encode(), version=version)


def our_connections(url: str, worker: str) -> list[dict[str, Any]]:
    admin = connect(url, socket_timeout=5)
    try:
        clients = cast(list[dict[str, Any]], admin.client_list())
    finally:
        admin.close()
    return [c for c in clients if c["name"] == f"hotreload-sub:{worker}"]


def our_connections_any(url: str) -> list[dict[str, Any]]:
    admin = connect(url, socket_timeout=5)
    try:
        clients = cast(list[dict[str, Any]], admin.client_list())
    finally:
        admin.close()
    return [c for c in clients if c["name"].startswith("hotreload-sub:")]


def blocked_reads(url: str, worker: str) -> list[dict[str, Any]]:
    return [c for c in our_connections(url, worker) if c["cmd"] == "xread" and "b" in c["flags"]]


def at_version(sub: Subscriber | AsyncSubscriber, version: int) -> Callable[[], bool]:
    return lambda: sub.version == version


def hub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hotreload-hub"]


class Started:
    """Subscribers started for a test, stopped whatever happens."""

    def __init__(self) -> None:
        self.subs: list[Subscriber] = []

    def add(self, key: str, callback: Any, url: str, **options: Any) -> Subscriber:
        sub = Subscriber(key, callback, redis_url=url, **options)
        self.subs.append(sub)
        return sub.start()

    def stop(self) -> None:
        for sub in self.subs:
            sub.stop()


@pytest.fixture(autouse=True)
def no_hub_left_over() -> None:
    """The counts below are this test's: a shared follower still running from an earlier
    test (one that did not stop its Subscribers) is named here rather than miscounted."""
    wait_until(lambda: not hub_threads(), "no shared follower left by an earlier test")


@pytest.fixture
def started() -> Iterator[Started]:
    subs = Started()
    try:
        yield subs
    finally:
        subs.stop()
    wait_until(lambda: not hub_threads(), "the hub's thread ends with its last key")


def test_twenty_subscribers_hold_one_connection_and_one_thread_and_each_acts_alone(
    redis_server: RedisServer, started: Started
) -> None:
    url = redis_server.url
    publish_all(url, 1)
    threads = threading.active_count()
    recorders = {key: Recorder() for key in KEYS}
    subs = [started.add(key, recorders[key], url, worker_id="w:1", **FAST) for key in KEYS]
    assert threading.active_count() - threads == 1  # the hub's thread, for all 20
    assert _hub.hub_count() == 1
    # the replays' connections are closed; the hub holds one (and a waker: at most 2)
    wait_until(lambda: len(our_connections(url, "w:1")) <= 2, "at most 2 connections")
    wait_until(lambda: len(blocked_reads(url, "w:1")) == 1, "one XREAD blocks for all keys")

    publish_all(url, 2)
    for key in KEYS:
        wait_until(partial(lambda k: recorders[k].applied[-1:] == [f"{k} v2"], key), key)
        assert recorders[key].applied == [f"{key} v1", f"{key} v2"]
        assert recorders[key].threads == {"MainThread", "hotreload-hub"}
    assert [sub.version for sub in subs] == [2] * 20
    # each key's acks and heartbeat, as 20 separate Subscribers wrote them
    for key in KEYS:
        wait_until(partial(lambda k: len(acks(url, k)) == 2, key), f"{key}: 2 acks")
        assert [(a.version, a.status, a.worker) for a in acks(url, key)] == [
            (1, "applied", "w:1"),
            (2, "applied", "w:1"),
        ]
    beats = {key: worker_states(url, key)["w:1"].heartbeat for key in KEYS}
    for key in KEYS:
        wait_until(
            partial(lambda k: worker_states(url, k)["w:1"].heartbeat > beats[k], key),
            f"{key}: heartbeat refreshed",
        )
        state = worker_states(url, key)["w:1"]
        assert (state.status, state.version, state.heartbeat_interval) == ("applied", 2, 0.3)
    assert len(our_connections(url, "w:1")) <= 2
    assert threading.active_count() - threads == 1


def test_shared_false_keeps_a_connection_and_a_thread_per_key(
    redis_server: RedisServer, started: Started
) -> None:
    url = redis_server.url
    keys = KEYS[:5]
    publish_all(url, 1, KEYS[:6])
    threads = threading.active_count()
    for key in keys:
        started.add(key, Recorder(), url, worker_id="own:1", shared=False, **FAST)
    assert threading.active_count() - threads == 5
    assert not hub_threads()
    wait_until(lambda: len(blocked_reads(url, "own:1")) == 5, "five XREADs block")
    # one shared key beside them gets the hub
    started.add(KEYS[5], Recorder(), redis_server.url, worker_id="own:1", **FAST)
    assert len(hub_threads()) == 1


def test_stopping_one_key_leaves_the_others_following_and_the_last_ends_the_hub(
    redis_server: RedisServer, started: Started
) -> None:
    url = redis_server.url
    keys = KEYS[:4]
    publish_all(url, 1, keys)
    recorders = {key: Recorder() for key in keys}
    subs = {key: started.add(key, recorders[key], url, worker_id="w:2", **FAST) for key in keys}
    wait_until(lambda: blocked_reads(url, "w:2"), "the hub blocks")
    began = time.monotonic()
    subs[keys[0]].stop()
    assert time.monotonic() - began < 1.0  # not a block time: the shared read is not waited for
    assert worker_states(url, keys[0])["w:2"].status == "stopped"
    publish_all(url, 2, keys)
    for key in keys[1:]:
        wait_until(at_version(subs[key], 2), key)
    time.sleep(0.5)  # a few cycles: the stopped key's entry is read by nobody
    assert recorders[keys[0]].applied == [f"{keys[0]} v1"]
    assert worker_states(url, keys[0])["w:2"].status == "stopped"
    assert len(hub_threads()) == 1
    for key in keys[1:]:
        subs[key].stop()
    wait_until(lambda: not hub_threads(), "the last stop ends the hub's thread")
    assert _hub.hub_count() == 0
    wait_until(lambda: not our_connections(url, "w:2"), "its connections are closed")
    assert {worker_states(url, key)["w:2"].status for key in keys} == {"stopped"}


def test_the_last_stop_returns_once_the_hub_s_thread_ended(
    redis_server: RedisServer, started: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like a key's own thread, the shared one is gone when the last ``stop()`` returns, also
    when it takes a while to end (here: closing its connection takes 0.3 s)."""
    url = redis_server.url
    publish_all(url, 1, KEYS[:2])
    subs = [started.add(key, Recorder(), url, worker_id="w:9", **FAST) for key in KEYS[:2]]
    wait_until(lambda: blocked_reads(url, "w:9"), "the hub blocks")
    from subscriber._pool import close as real_close

    def slow_close(client: Any) -> None:
        time.sleep(0.3)
        real_close(client)

    monkeypatch.setattr(_hub, "close", slow_close)
    subs[0].stop()
    assert len(hub_threads()) == 1  # another key still follows
    subs[1].stop()
    assert not hub_threads()


def test_a_rejecting_callback_or_junk_on_one_key_does_not_touch_the_others(
    redis_server: RedisServer, started: Started
) -> None:
    url = redis_server.url
    keys = KEYS[:3]
    publish_all(url, 1, keys)
    bad = 0

    def explode(text: str) -> None:
        nonlocal bad
        if "v1" not in text:
            bad += 1
            raise SystemExit("validator gave up")  # a BaseException: still a rejection

    subs = [
        started.add(keys[0], explode, url, worker_id="w:3", **FAST),
        started.add(keys[1], Recorder(), url, worker_id="w:3", **FAST),
        started.add(keys[2], Recorder(), url, worker_id="w:3", **FAST),
    ]
    client = connect(url, socket_timeout=5)
    try:
        client.xadd(stream_keys(keys[1]).events, {"junk": "x"})  # malformed: key 1's only
    finally:
        client.close()
    # decided before v2 comes: a read that times out under load resyncs from the newest
    # entry, which would pass over a junk entry older than v2 without deciding it
    wait_until(lambda: subs[1].error_count == 1, "key 1 refuses the junk entry")
    publish_all(url, 2, keys)
    wait_until(lambda: subs[0].status == "rejected", "key 0 rejects v2")
    wait_until(lambda: subs[1].version == 2 and subs[2].version == 2, "keys 1, 2 apply v2")
    assert subs[1].error_count == 1  # the junk entry, reported as malformed, once
    assert (subs[0].error_count, subs[2].error_count, bad) == (1, 0, 1)
    publish_all(url, 3, keys)
    wait_until(lambda: subs[1].version == 3 and subs[2].version == 3, "all keep following")
    wait_until(lambda: bad == 2, "key 0 decided v3 too")
    assert subs[0].version == 1


def test_a_deleted_or_overwritten_stream_affects_only_its_own_key(
    redis_server: RedisServer, started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    keys = KEYS[:3]
    publish_all(url, 1, keys)
    subs = [
        started.add(key, Recorder(), url, worker_id="w:4", resync_interval=0.3, **FAST)
        for key in keys
    ]
    client = connect(url, socket_timeout=5)
    try:
        # an operator overwrote key 0's stream: the shared XREAD is refused (WRONGTYPE)
        events = stream_keys(keys[0]).events
        client.delete(events)
        client.set(events, "not a stream")
        with caplog.at_level(logging.WARNING, logger="subscriber.client"):
            publish_all(url, 2, keys[1:])
            for sub in subs[1:]:
                wait_until(at_version(sub, 2), sub.key)
            wait_until(lambda: "refused a command" in caplog.text, "key 0 says why")
        refusals = [r for r in caplog.records if "refused a command" in r.getMessage()]
        assert {r.getMessage().split(":")[0] for r in refusals} == {keys[0]}
        assert "lost Redis" not in caplog.text  # nobody lost the connection
        assert subs[0].version == 1  # keeps its config
        # key 1's stream deleted: it alone holds; the others follow on
        client.delete(events)
        client.delete(stream_keys(keys[1]).events)
        publish_all(url, 3, [keys[0], keys[2]])
        wait_until(lambda: subs[0].version == 3, "key 0 follows again")
        wait_until(lambda: subs[2].version == 3, "key 2 follows on")
        assert subs[1].version == 2
        publish_all(url, 4, keys)
        for sub in subs:
            wait_until(at_version(sub, 4), sub.key)
    finally:
        client.close()


def test_two_subscribers_of_one_key_at_different_positions_each_get_every_entry(
    redis_server: RedisServer, started: Started
) -> None:
    """One stream, two cursors: the shared read starts at the lower one, each sub is handed
    only what follows its own (the newer one must not make the older one skip v3)."""
    url = redis_server.url
    key = KEYS[0]
    publish_all(url, 1, [key])
    inside, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def slow(text: str) -> None:
        seen.append(text)
        if text.endswith("v2"):
            inside.set()
            release.wait(10)

    first = started.add(key, slow, url, worker_id="w:8", **FAST)
    try:
        publish_all(url, 2, [key])
        assert inside.wait(10)  # the hub is held in first's callback for v2
        publish_all(url, 3, [key])
        later = Recorder()
        second = started.add(key, later, url, worker_id="w:8", **FAST)  # replays v3
        assert second.version == 3
    finally:
        release.set()
    wait_until(at_version(first, 3), "first reads v3 although second started past it")
    assert seen == [f"{key} v1", f"{key} v2", f"{key} v3"]
    publish_all(url, 4, [key])
    wait_until(lambda: first.version == 4 and second.version == 4, "both read v4")
    assert later.applied == [f"{key} v3", f"{key} v4"]


def test_a_bug_deciding_for_one_key_makes_it_alone_retry(
    redis_server: RedisServer, started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    keys = KEYS[:3]
    publish_all(url, 1, keys)
    subs = [started.add(key, Recorder(), url, worker_id="w:9", **FAST) for key in keys]
    broken = subs[0]
    real = broken._cycle_done
    failures = 0

    def buggy(plan: Any, results: list[Any]) -> bool:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("a bug in one key's decision")
        return real(plan, results)

    with caplog.at_level(logging.WARNING, logger="subscriber.client"):
        broken._cycle_done = buggy  # type: ignore[method-assign]
        publish_all(url, 2, keys)
        for sub in subs:
            wait_until(at_version(sub, 2), sub.key)  # key 0 by its resync
        wait_until(lambda: failures == 2, "the bug strikes again on key 0's next cycle")
        publish_all(url, 3, keys)
        for sub in subs:
            wait_until(at_version(sub, 3), sub.key)
    errors = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert {r.getMessage().split(":")[0] for r in errors} == {keys[0]}
    assert "lost Redis" not in caplog.text


def test_if_the_shared_thread_ever_dies_every_key_says_so(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = redis_server.url
    keys = KEYS[:2]
    publish_all(url, 1, keys)
    subs = [Subscriber(key, Recorder(), redis_url=url, worker_id="w:10", **FAST) for key in keys]
    try:
        for sub in subs:
            sub.start()

        def dies(*args: Any) -> None:
            raise SystemExit("the hub's thread ends")  # not an Exception: nothing catches it

        monkeypatch.setattr(_hub, "plan_cycle", dies)
        for sub in subs:
            wait_until(partial(lambda s: s.status == "stopped", sub), sub.key)
        for key in keys:
            # the dying follower writes each key's final state after the key says stopped
            stopped = settles(
                partial(lambda k: worker_states(url, k)["w:10"].status, key), "stopped"
            )
            assert stopped == "stopped"
            state = worker_states(url, key)["w:10"]
            assert "the follower ended" in state.error, state.error
        wait_until(lambda: not hub_threads(), "the thread is gone")
    finally:
        for sub in subs:
            sub.stop()


def test_all_keys_recover_after_a_redis_restart(
    redis_tcp: RedisServer, started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_tcp.url
    publish_all(url, 1)
    subs = [started.add(key, Recorder(), url, worker_id="w:5", **FAST) for key in KEYS]
    with caplog.at_level(logging.INFO, logger="subscriber.client"):
        redis_tcp.restart()  # no persistence: the history is gone too
        publish_all(url, 2)
        for sub in subs:
            wait_until(at_version(sub, 2), sub.key)
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
    assert sorted(r.getMessage().split(":")[0] for r in lost) == KEYS  # each once, as alone
    assert sorted(r.getMessage().split(":")[0] for r in back) == KEYS
    wait_until(lambda: len(our_connections(url, "w:5")) <= 2, "at most 2 connections again")
    assert len(hub_threads()) == 1


def test_a_key_started_from_its_fallback_joins_the_hub_once_redis_answers(
    redis_tcp: RedisServer, started: Started, tmp_path: Path
) -> None:
    """Redis down at boot: a redis:// URL never reached is not known to be standalone (it
    could be a cluster), so the key starts alone; once its Redis answered as a standalone
    one, it moves into the hub and its own thread ends."""
    url = redis_tcp.url
    redis_tcp.stop()
    fallback = tmp_path / "k00.yaml"
    fallback.write_text("from the mount")
    rec = Recorder()
    sub = started.add(
        KEYS[0], rec, url, worker_id="w:11", fallback_path=fallback, start_timeout=0.5, **FAST
    )
    assert (sub.status, sub._hub) == ("fallback", None)
    assert [t.name for t in threading.enumerate()].count(f"hotreload-{KEYS[0]}") == 1
    redis_tcp.start()
    publish_all(url, 1, KEYS[:2])
    wait_until(at_version(sub, 1), "applied from Redis")
    wait_until(lambda: sub._hub is not None, "moved into the hub")
    wait_until(
        lambda: f"hotreload-{KEYS[0]}" not in [t.name for t in threading.enumerate()],
        "its own thread ends",
    )
    other = started.add(KEYS[1], Recorder(), url, worker_id="w:11", **FAST)
    assert other._hub is not None
    assert sub._hub is not None
    assert other._hub[0] is sub._hub[0]
    publish_all(url, 2, KEYS[:2])
    wait_until(lambda: sub.version == 2 and other.version == 2, "both follow in the hub")
    assert rec.applied == ["from the mount", "k00.yaml v1", "k00.yaml v2"]
    wait_until(lambda: len(our_connections(url, "w:11")) <= 2, "at most 2 connections")
    sub.stop()
    assert worker_states(url, KEYS[0])["w:11"].status == "stopped"


def test_a_key_started_during_a_long_block_is_read_at_once(
    redis_server: RedisServer, started: Started
) -> None:
    url = redis_server.url
    publish_all(url, 1, KEYS[:2])
    slow: dict[str, Any] = {"block_ms": 60_000, "heartbeat_interval": 30.0, "metrics": False}
    first = started.add(KEYS[0], Recorder(), url, worker_id="w:6", **slow)
    wait_until(lambda: blocked_reads(url, "w:6"), "the hub blocks for a minute")
    second = started.add(KEYS[1], Recorder(), url, worker_id="w:6", **slow)
    publish_all(url, 2, KEYS[1:2])
    # woken by CLIENT UNBLOCK: not a minute later
    wait_until(lambda: second.version == 2, "the new key is read at once")
    publish_all(url, 2, KEYS[:1])
    wait_until(lambda: first.version == 2, "and the first one too")
    assert len(our_connections(url, "w:6")) == 2  # the hub's and the waker


def test_without_client_unblock_a_new_key_waits_for_the_block_and_nothing_else_changes(
    redis_server: RedisServer, started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL file older than the hub refuses CLIENT ID/UNBLOCK: no denial breaks anything."""
    url = redis_server.url
    admin = connect(url, socket_timeout=5)
    try:
        admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "sub", "on", ">sub-password-0123", "+ping", "+client|setname",
            "+cluster|slots", "+xrevrange", "+xrange", "+xread", "+xadd", "+hset", "~*",
        )  # fmt: skip
    finally:
        admin.close()
    user_url = url.replace("unix://", "unix://sub:sub-password-0123@")
    publish_all(url, 1, KEYS[:2])
    opts: dict[str, Any] = {"block_ms": 1500, "heartbeat_interval": 5.0, "metrics": False}
    with caplog.at_level(logging.INFO, logger="subscriber.client"):
        first = started.add(KEYS[0], Recorder(), user_url, worker_id="w:7", **opts)
        wait_until(lambda: blocked_reads(url, "w:7"), "the hub blocks")
        second = started.add(KEYS[1], Recorder(), user_url, worker_id="w:7", **opts)
        publish_all(url, 2, KEYS[:2])
        wait_until(lambda: second.version == 2 and first.version == 2, "read after the block")
    assert len(our_connections(url, "w:7")) == 1  # no waker: it could not wake
    told = [r.getMessage() for r in caplog.records if "cannot wake" in r.getMessage()]
    assert len(told) == 1, told
    assert "+client|id +client|unblock" in told[0]
    assert "lost Redis" not in caplog.text


_PROCESS = """
import sys, threading, time
from subscriber import Subscriber
url, count = sys.argv[1], int(sys.argv[2])
before = threading.active_count()
subs = [Subscriber(f"k{i:02d}.yaml", lambda text: None, redis_url=url, worker_id="proc:1",
                   heartbeat_interval=0.5, metrics=False).start() for i in range(count)]
print(threading.active_count() - before, flush=True)
sys.stdin.readline()
"""


def test_a_process_with_twenty_keys_holds_at_most_two_connections_and_three_threads(
    redis_server: RedisServer, processes: Processes
) -> None:
    import subprocess

    url = redis_server.url
    publish_all(url, 1)
    child = processes.python(
        "-c",
        textwrap.dedent(_PROCESS),
        url,
        "20",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    child.stdout.close()
    assert int(line) <= 3 - 1, line  # the main thread and at most 2 more
    wait_until(lambda: len(our_connections(url, "proc:1")) <= 2, "at most 2 connections")
    publish_all(url, 2)
    for key in KEYS:
        wait_until(partial(lambda k: worker_states(url, k)["proc:1"].version == 2, key), key)
    assert len(our_connections(url, "proc:1")) <= 2
    assert child.stdin is not None
    child.stdin.close()  # the child exits: atexit stops every key
    assert child.wait(20) == 0
    assert {worker_states(url, key)["proc:1"].status for key in KEYS} == {"stopped"}


def test_a_forked_child_does_not_inherit_the_hub(redis_server: RedisServer) -> None:
    """gunicorn preload: a parent that started a key forks; the child's first start() makes a
    hub of its own (the parent's thread does not exist there)."""
    import os

    url = redis_server.url
    publish_all(url, 1, KEYS[:2])
    parent = Subscriber(KEYS[0], Recorder(), redis_url=url, worker_id="parent:1", **FAST)
    parent.start()
    try:
        assert _hub.hub_count() == 1
        read, write = os.pipe()
        with warnings.catch_warnings():  # 3.12+: fork() of a process with threads warns
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's atexit
            code = 1
            try:
                fresh = _hub.hub_count() == 0
                child = Subscriber(KEYS[1], Recorder(), redis_url=url, worker_id="child:1")
                child.start()
                code = 0 if fresh and child._hub is not None and _hub.hub_count() == 1 else 2
                child.stop()
            finally:
                os.write(write, bytes([code]))
                os._exit(code)
        os.close(write)
        try:
            assert os.read(read, 1) == b"\x00"
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        assert worker_states(url, KEYS[1])["child:1"].status == "stopped"
        assert (parent.version, parent.status) == (1, "applied")
    finally:
        parent.stop()


@pytest.mark.slow
def test_cluster_keys_keep_a_connection_each(redis_cluster: RedisCluster) -> None:
    """With shared=False a cluster key follows on its own (shared: tests/test_cluster_hub.py)."""
    url = redis_cluster.url
    keys = KEYS[:3]
    masters = {key: redis_cluster.master_for(stream_keys(key).events).url for key in keys}
    subs: list[Subscriber] = []
    try:
        for key in keys:
            append_event(masters[key], key, f"{key} v1".encode(), version=1)
            sub = Subscriber(key, Recorder(), redis_url=url, worker_id="c:1", shared=False, **FAST)
            subs.append(sub.start())
        assert all(sub._hub is None for sub in subs)
        assert len(set(masters.values())) > 1  # keys on different masters
        for key in keys:
            append_event(masters[key], key, f"{key} v2".encode(), version=2)
        for sub in subs:
            wait_until(at_version(sub, 2), sub.key)
    finally:
        for sub in subs:
            sub.stop()


def test_gunicorn_preload_workers_with_twenty_keys_hold_two_connections_each(
    tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    """The master creates the 20 Subscribers (preload) and holds no connection or thread;
    each worker starts them after the fork in one hub of its own."""
    import json
    import subprocess
    import urllib.request

    url = redis_server.url
    publish_all(url, 1)
    port = free_port()
    env = {
        "HOTRELOAD_REDIS_URL": url,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "WORKER_CLASS": "sync",
    }
    conf = REPO / "deploy" / "example" / "gunicorn.conf.py"
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as fh:
        gunicorn = processes.python(
            "-m", "gunicorn", "-c", str(conf), "--chdir", str(REPO),
            "tests.workers.many_keys_app:app", env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def workers() -> dict[int, str]:
        """pid -> worker id of the live workers that follow every key."""
        assert gunicorn.poll() is None, log.read_text()
        states = [worker_states(url, key) for key in KEYS]
        ids = set.intersection(*(set(s) for s in states)) if states else set()
        live = {w for w in ids if all(s[w].status == "applied" for s in states)}
        return {int(w.rsplit(":", 1)[1]): w for w in live}

    def two_workers() -> dict[int, str] | None:
        found = workers()
        return found if len(found) == 2 else None

    pids = wait_until(two_workers, "2 workers running every key", timeout=60)
    publish_all(url, 2)
    for key in KEYS:
        wait_until(
            partial(lambda k: {s.version for s in worker_states(url, k).values()} == {2}, key),
            key,
        )
    for worker in pids.values():
        wait_until(partial(lambda w: 1 <= len(our_connections(url, w)) <= 2, worker), worker)
    # the master: no connection of its own (it never started anything)
    master = {c["name"] for c in our_connections_any(url)} - {
        f"hotreload-sub:{w}" for w in pids.values()
    }
    assert master == set(), master
    seen: dict[int, dict[str, Any]] = {}

    def both_answered() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
        seen[int(body["pid"])] = body
        return set(seen) == set(pids)

    wait_until(both_answered, "both workers answer")
    for body in seen.values():
        assert set(body["versions"].values()) == {2}
        assert body["threads"] <= 3, body  # the worker's own thread(s) and the hub
