"""The workers' floor kept in ``:floor`` (a sorted set): written by every worker's reports,
read inside the publish script, trusted by the daemon once every ``:workers`` row writes it.

What it must keep: a publish after the stream lost its entries is numbered above what a
worker saw although nobody read ``:workers`` for it; a ``:workers`` row of a worker that
does not write ``:floor`` (older than this) keeps the daemon's per-publish ``:workers``
read; a worker forgotten from ``:workers`` leaves ``:floor`` too. Real redis-server, real
Subscribers (each transport), a real daemon on a kubelet-style mount.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster as RedisClusterClient

from publisher import _earlyfloor
from publisher._earlyfloor import EarlyFloor
from publisher.daemon import Daemon
from publisher.publish import Publisher
from publisher.upkeep import Upkeep
from subscriber import AsyncSubscriber, Subscriber
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, decode_worker_state, encode_worker_state
from subscriber.testing import RedisCluster, RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.conftest import KubeletMount
from tests.helpers import events, wait_until

KEY = "app.yaml"
KEYS = stream_keys(KEY)
SIGNING_KEY = b"a3f1c0de9b7e4f2a8c6d5e4f3a2b1c0d"
LARGE = 64 * 1024  # a publish of this size goes around Lua (publisher._fast): decide mode


def rev(n: int, size: int = 0) -> bytes:
    text = f"rev: {n}\n".encode()
    return text + b"#" * max(0, size - len(text))


def publish_revs(client: redis.Redis, upto: int) -> None:
    publisher = Publisher(client)
    for n in range(1, upto + 1):
        assert publisher.publish(KEY, rev(n)).version == n


def score(client: redis.Redis, worker: str) -> float | None:
    return client.zscore(KEYS.floor, worker)


# ------------------------------------------------------------- every report path writes it


def _async_follow(url: str, worker: str, client: redis.Redis) -> None:
    async def follow() -> None:
        async with AsyncSubscriber(KEY, lambda _: None, redis_url=url, worker_id=worker,
                                   metrics=False) as sub:  # fmt: skip
            assert sub.version == 3
            Publisher(client).publish(KEY, rev(4))
            while score(client, worker) != 4:
                await asyncio.sleep(0.02)

    asyncio.run(follow())


@pytest.mark.parametrize("transport", ["shared", "own", "asyncio"])
def test_every_report_writes_what_the_worker_has_seen_to_floor(
    redis_server: RedisServer, client: redis.Redis, transport: str
) -> None:
    """The one place a report's state is built (``Transport._queue_state``) writes ``ZADD GT``
    before its ``HSET``: the threaded hub, a subscriber of its own and the asyncio one."""
    publish_revs(client, 3)
    worker = f"{transport}:1"
    if transport == "asyncio":
        _async_follow(redis_server.url, worker, client)
    else:
        with Subscriber(KEY, lambda _: None, redis_url=redis_server.url, worker_id=worker,
                        metrics=False, shared=transport == "shared") as sub:  # fmt: skip
            assert sub.version == 3
            Publisher(client).publish(KEY, rev(4))
            wait_until(lambda: score(client, worker) == 4, "v4's report on :floor")
    row = decode_worker_state(cast(bytes, client.hget(KEYS.workers, worker)))
    assert (row.floor, row.seen, row.status) == (True, 4, "stopped")
    assert score(client, worker) == 4
    client.zadd(KEYS.floor, {worker: 40})  # a score never goes down (GT): reports of v4
    with Subscriber(KEY, lambda _: None, redis_url=redis_server.url, worker_id=worker,
                    metrics=False) as sub:  # fmt: skip
        assert sub.version == 4
    assert score(client, worker) == 40


def test_a_cluster_hub_writes_floor(redis_cluster_module: RedisCluster) -> None:
    node = redis.Redis.from_url(redis_cluster_module.master_for(KEYS.events).url)
    try:
        Publisher(node).publish(KEY, rev(1))  # the key's master, the script as on any
        with Subscriber(KEY, lambda _: None, redis_url=redis_cluster_module.url,
                        worker_id="cluster:1", metrics=False) as sub:  # fmt: skip
            assert sub.version == 1
        assert score(node, "cluster:1") == 1
        # the publish script reads :floor there too (not a declared key: the same slot)
        node.zadd(KEYS.floor, {"cluster:1": 40})
        node.delete(KEYS.events, KEYS.events.replace(":events", ":head"))
        cluster = RedisClusterClient.from_url(redis_cluster_module.url)
        try:
            publisher = Publisher(cluster)  # type: ignore[arg-type]
            assert publisher.publish(KEY, rev(2), above=0).version == 41
        finally:
            cluster.close()
    finally:
        node.delete(KEYS.events, KEYS.workers, KEYS.floor, KEYS.acks)
        node.close()


# ------------------------------------------------------- the publish script reads :floor


@pytest.mark.parametrize(
    ("size", "signing_key"),
    [(0, None), (LARGE, None), (0, SIGNING_KEY)],
    ids=["through-lua", "around-lua", "signed"],
)
def test_a_publish_after_the_stream_lost_its_entries_is_numbered_above_floor(
    redis_server: RedisServer, client: redis.Redis, size: int, signing_key: bytes | None
) -> None:
    """No ``above`` passed (the daemon passes none once ``:floor`` covers the workers): the
    script's read of ``:floor`` numbers the entry above what the worker saw, and it applies
    it (numbered at 1, it would hold its config: a replay)."""
    publish_revs(client, 5)
    applied: list[bytes] = []
    with Subscriber(KEY, applied.append, redis_url=redis_server.url, worker_id="w:1",
                    metrics=False, decode=False) as sub:  # fmt: skip
        assert sub.version == 5
        wait_until(lambda: score(client, "w:1") == 5)
        client.delete(KEYS.events, KEYS.events.replace(":events", ":head"))  # restored empty
        publisher = Publisher(client, signing_key=signing_key)  # signed: re-signs for v6
        result = publisher.publish(KEY, rev(6, size), above=0)
        assert (result.written, result.version) == (True, 6)
        wait_until(lambda: sub.version == 6, "the worker applied v6")
        assert applied[-1] == rev(6, size)


def test_junk_on_floor_never_blocks_or_lowers_the_next_version(client: redis.Redis) -> None:
    publish_revs(client, 2)
    client.zadd(KEYS.floor, {"junk": 2**60, "half": 6.5, "w": 5, "neg": -3})
    assert Publisher(client).publish(KEY, rev(3), above=0).version == 7  # 6.5 counts as 6
    client.delete(KEYS.floor)
    client.set(KEYS.floor, "not a sorted set")  # WRONGTYPE: the argument alone
    assert Publisher(client).publish(KEY, rev(4), above=9).version == 10


# ----------------------------------------------------------------- the daemon's choice


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each read of a :workers floor the daemon makes for a publish (the loop's, the
    publish's, the early request's), recorded; the reads themselves run unchanged."""
    made: list[str] = []

    def counted(name: str, read: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            made.append(name)
            return read(*args)

        return wrapper

    for name in ("read_workers_seen", "first_page_seen"):
        monkeypatch.setattr(_earlyfloor, name, counted(name, getattr(_earlyfloor, name)))
    receive = EarlyFloor._receive

    def received(self: EarlyFloor, connection: Any) -> None:
        assert self._pending is not None  # the request also asks each key's newest entry id
        names, _, only_seen = self._pending
        made.extend(f"early {name}" for name in names if name not in only_seen)
        receive(self, connection)

    monkeypatch.setattr(EarlyFloor, "_receive", received)
    return made


def swap(mount: KubeletMount, client: redis.Redis, content: bytes) -> int:
    count = len(events(client, KEY))
    atomic_write(str(mount.directory), {KEY: content})
    wait_until(lambda: len(events(client, KEY)) == count + 1, "the swap published")
    return events(client, KEY)[-1].version


def from_workers(daemon: Daemon) -> float | None:
    sample = "hotreload_floor_from_workers"
    return daemon.metrics.registry.get_sample_value(sample, {"key": KEY})


def test_the_daemon_reads_no_workers_while_floor_covers_them_and_again_for_an_old_row(
    redis_server: RedisServer,
    client: redis.Redis,
    kubelet_mount: KubeletMount,
    reads: list[str],
) -> None:
    kubelet_mount.write({KEY: rev(1)})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, check_interval=0.05)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_until(lambda: [e.version for e in events(client, KEY)] == [1])
        with Subscriber(KEY, lambda _: None, redis_url=redis_server.url, worker_id="new:1",
                        metrics=False, heartbeat_interval=0.2) as sub:  # fmt: skip
            wait_until(lambda: daemon._upkeep.covered.get(KEY), "a sweep found :floor covers")
            reads.clear()
            assert swap(kubelet_mount, client, rev(2)) == 2
            wait_until(lambda: sub.version == 2)
            assert reads == []  # publish.lua read :floor; nobody read :workers
            assert from_workers(daemon) == 0
            # a worker older than :floor (its row says nothing of it), having seen v2
            old = WorkerState(worker="old:1", status="applied", version=2, seen=2)
            client.hset(KEYS.workers, "old:1", encode_worker_state(old))
            wait_until(lambda: daemon._upkeep.covered.get(KEY) is False, "the old row seen")
            reads.clear()
            assert swap(kubelet_mount, client, rev(3)) == 3
            assert reads  # read for the publish again (early, by the loop or at publish)
            assert from_workers(daemon) == 1
            # the old row's floor counts: it saw v30 (a stream since lost), the new one v3
            client.hset(KEYS.workers, "old:1", encode_worker_state(
                WorkerState(worker="old:1", status="holding", version=30, seen=30)))  # fmt: skip
            # published above it (the sweep finds it holding; read from :floor: not written)
            wait_until(lambda: events(client, KEY)[-1].version == 31, "published above v30")
    finally:
        daemon.request_stop()
        runner.join(10)
    assert not runner.is_alive()


def test_a_stopped_old_row_does_not_keep_the_workers_read(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """An older worker's row that says ``stopped`` reads nothing more: it does not count
    against ``:floor`` (after an upgrade the old rows stay for ``--forget-workers-after``)."""
    publish_revs(client, 3)
    with Subscriber(KEY, lambda _: None, redis_url=redis_server.url, worker_id="new:1",
                    metrics=False):  # fmt: skip
        wait_until(lambda: score(client, "new:1") == 3)
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    old = WorkerState(worker="old:1", status="stopped", version=3, seen=3)
    client.hset(KEYS.workers, "old:1", encode_worker_state(old))
    upkeep.due(client, [KEY], {KEY: 3})
    assert upkeep.covered == {KEY: True}
    client.hset(KEYS.workers, "old:1", encode_worker_state(
        WorkerState(worker="old:1", status="applied", version=3, seen=3)))  # fmt: skip
    upkeep.due(client, [KEY], {KEY: 3})
    assert upkeep.covered == {KEY: False}
    # a new worker's row whose score is missing (its ZADD refused, or deleted) is not covered
    client.hdel(KEYS.workers, "old:1")
    upkeep.due(client, [KEY], {KEY: 3})
    assert upkeep.covered == {KEY: True}
    client.zrem(KEYS.floor, "new:1")
    upkeep.due(client, [KEY], {KEY: 3})
    assert upkeep.covered == {KEY: False}


# ---------------------------------------------------------------------- forgetting


def test_a_forgotten_worker_leaves_floor_too(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    publish_revs(client, 2)
    for worker in ("gone:1", "here:1"):
        with Subscriber(KEY, lambda _: None, redis_url=redis_server.url, worker_id=worker,
                        metrics=False):  # fmt: skip
            pass
    assert score(client, "gone:1") == score(client, "here:1") == 2
    gone = decode_worker_state(cast(bytes, client.hget(KEYS.workers, "gone:1")))
    client.hset(KEYS.workers, "gone:1", encode_worker_state(  # silent for two hours
        WorkerState(**{**_fields(gone), "heartbeat": gone.heartbeat - 7_200_000})))  # fmt: skip
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=3600)
    upkeep.due(client, [KEY], {KEY: 2})
    assert client.hkeys(KEYS.workers) == [b"here:1"]
    assert client.zrange(KEYS.floor, 0, -1) == [b"here:1"]


def _fields(state: WorkerState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in state.__struct_fields__}


def test_a_worker_refused_zadd_says_so_once_and_keeps_the_workers_read(
    redis_server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers upgraded before the ACL (no ``+zadd``): one warning, no ``ZADD`` again, and
    its state says ``floor: false``, so the daemon keeps reading ``:workers`` for the key."""
    publish_revs(client, 2)
    client.acl_setuser("oldacl", enabled=True, passwords=["+" + "p" * 16], keys=["*"],
                       commands=["+@all", "-zadd"])  # fmt: skip
    url = redis_server.url.replace("unix://", f"unix://oldacl:{'p' * 16}@")
    with Subscriber(KEY, lambda _: None, redis_url=url, worker_id="w:1", metrics=False,
                    heartbeat_interval=0.1) as sub:  # fmt: skip
        assert sub.version == 2
        wait_until(lambda: not decode_worker_state(
            cast(bytes, client.hget(KEYS.workers, "w:1"))).floor)  # fmt: skip
        time.sleep(0.3)  # heartbeats: no ZADD sent again
        upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
        upkeep.due(client, [KEY], {KEY: 2})
        assert upkeep.covered == {KEY: False}  # (stopped, it no longer counts)
    assert score(client, "w:1") is None
    refused = [r for r in caplog.records if ":floor" in r.getMessage()]
    assert len(refused) == 1, refused
    assert not [r for r in caplog.records if "refused a report" in r.getMessage()]
    (denied,) = cast(list[dict[str, Any]], client.acl_log())
    assert int(denied["count"]) == 1  # one ZADD refused, none after
