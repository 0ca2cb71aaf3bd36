"""Issue 22 on a Redis Cluster: a process's Subscribers share, per master, one pub/sub
connection (SSUBSCRIBEd to every key's notify channel) and one command connection
(``subscriber._clusterhub``), and each key still behaves as a Subscriber of its own. Real
6-node clusters throughout; connections are counted with ``CLIENT LIST`` on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import pytest
from redis.cluster import RedisCluster as ClusterClient

from publisher._admin import connect_any
from publisher.publish import Publisher
from subscriber import AsyncSubscriber, Subscriber, _aioclusterhub, _clusterhub, _reports
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import ClusterNode, RedisCluster, append_event
from tests.helpers import Recorder, wait_until
from tests.workers.harness import acks, worker_states

pytestmark = pytest.mark.slow

KEYS = [f"c{index:02d}.yaml" for index in range(20)]
# Rounds (and catch-up reads) once per block time: 10 s here, so a change seen within 2 s
# was notified, not found by the catch-up read.
SLOW: dict[str, Any] = {"block_ms": 10_000, "heartbeat_interval": 10.0, "metrics": False}
NOTIFIED_WITHIN = 2.0


def names(tag: str, count: int) -> list[str]:
    """Keys of one test (the module's cluster is shared: each test its own streams)."""
    return [f"{tag}{index:02d}.yaml" for index in range(count)]


def spread(cluster: RedisCluster, tag: str, per_master: int) -> list[str]:
    """Keys of one test, ``per_master`` on each master (names hash anywhere)."""
    chosen: dict[int, list[str]] = {}
    for index in range(1000):
        key = f"{tag}-{index}.yaml"
        port = cluster.master_for(stream_keys(key).events).port
        if len(chosen.setdefault(port, [])) < per_master:
            chosen[port].append(key)
        if len(chosen) == 3 and all(len(keys) == per_master for keys in chosen.values()):
            break
    return [key for keys in chosen.values() for key in keys]


def hub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hotreload-hub"]


def connections(node_url: str, worker: str) -> list[dict[str, Any]]:
    admin = connect(node_url, socket_timeout=5)
    try:
        clients = cast(list[dict[str, Any]], admin.client_list())
    finally:
        admin.close()
    return [c for c in clients if c["name"] == f"hotreload-sub:{worker}"]


def manual_failover(replica: ClusterNode) -> None:
    """``CLUSTER FAILOVER`` on ``replica``: it takes its master's slots over, in agreement."""
    admin = connect(replica.url, socket_timeout=5)
    try:
        cast(Any, admin).execute_command("CLUSTER", "FAILOVER")
    finally:
        admin.close()


class Cluster:
    """A publisher (the real script, which notifies) and Subscribers started for a test,
    all stopped whatever happens."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.subs: list[Subscriber] = []
        self._client: Any = None
        self._publisher: Publisher | None = None

    def publish(self, key: str, text: str) -> None:
        if self._publisher is None:
            self._client = connect_any(self.cluster.url, socket_timeout=5)
            assert isinstance(self._client, ClusterClient)
            self._publisher = Publisher(self._client)  # type: ignore[arg-type]
        assert self._publisher.publish(key, text.encode()).written

    def start(self, key: str, worker: str = "c:1", **options: Any) -> Subscriber:
        sub = Subscriber(key, Recorder(), redis_url=self.cluster.url, worker_id=worker,
                         **{**SLOW, **options})  # fmt: skip
        self.subs.append(sub)
        return sub.start()

    def close(self) -> None:
        for sub in self.subs:
            sub.stop()
        if self._client is not None:
            self._client.close()


@pytest.fixture
def shared(redis_cluster_module: RedisCluster) -> Iterator[Cluster]:
    wait_until(lambda: not hub_threads(), "no shared follower left by an earlier test")
    started = Cluster(redis_cluster_module)
    try:
        yield started
    finally:
        started.close()
    wait_until(lambda: not hub_threads(), "the hub's thread ends with its last key")


def at(sub: Subscriber, version: int, text: str) -> bool:
    return sub.version == version and sub.content == text.encode()


def acked(url: str, key: str, version: int) -> bool:
    applied = any(a.version == version and a.status == "applied" for a in acks(url, key))
    return applied and worker_states(url, key)["c:1"].version == version


def test_twenty_keys_hold_at_most_two_connections_per_master_and_each_acts_alone(
    shared: Cluster,
) -> None:
    cluster = shared.cluster
    for key in KEYS:
        shared.publish(key, f"{key} v1")
    threads = threading.active_count()
    subs = [shared.start(key) for key in KEYS]
    assert all(isinstance(sub._hub[0], _clusterhub.ClusterHub) for sub in subs if sub._hub)
    assert all(sub._hub is not None for sub in subs)
    assert threading.active_count() - threads == 1  # the hub's thread, for all 20 keys
    masters = {cluster.master_for(stream_keys(key).events).url for key in KEYS}
    assert len(masters) > 1  # the keys are spread over several masters
    wait_until(
        lambda: all(len(connections(url, "c:1")) == 2 for url in masters),
        "a pub/sub and a command connection on each master",
    )
    for url in masters:
        (pubsub,) = [c for c in connections(url, "c:1") if c["cmd"] == "ssubscribe"]
        assert int(pubsub.get("ssub", 0)) > 0 or "P" in pubsub["flags"] or pubsub["flags"]

    # one key changes: only it runs its callback, within the notification's time
    shared.publish(KEYS[7], f"{KEYS[7]} v2")
    wait_until(lambda: at(subs[7], 2, f"{KEYS[7]} v2"), "notified", timeout=NOTIFIED_WITHIN)
    assert all(sub.version == 1 for index, sub in enumerate(subs) if index != 7)
    # every key changes: each applies its own, acks it and says so in :workers
    for key in KEYS:
        shared.publish(key, f"{key} v3")
    for key, sub in zip(KEYS, subs, strict=True):
        version = 3 if key == KEYS[7] else 2
        wait_until(partial(at, sub, version, f"{key} v3"), key, timeout=5)
    for key, sub in zip(KEYS, subs, strict=True):
        url = cluster.master_for(stream_keys(key).events).url
        wait_until(partial(acked, url, key, sub.version), f"{key}'s ack and state")
    assert max(len(connections(url, "c:1")) for url in masters) <= 2


def test_a_daemon_that_does_not_notify_is_still_followed_within_the_block_time(
    shared: Cluster,
) -> None:
    """An older daemon XADDs without SPUBLISH: the catch-up read (once per block time)
    finds the change."""
    (key,) = names("silent", 1)
    url = shared.cluster.master_for(stream_keys(key).events).url
    shared.publish(key, "v1")
    sub = shared.start(key, block_ms=1000)
    wait_until(lambda: any(c["cmd"] == "ssubscribe" for c in connections(url, "c:1")), "subscribed")
    time.sleep(0.3)  # past the read every (re)subscription makes
    started = time.monotonic()
    append_event(url, key, b"silent v2", version=2)
    wait_until(lambda: at(sub, 2, "silent v2"), "found by the catch-up read", timeout=3)
    assert time.monotonic() - started < 2.5


def test_a_user_without_the_channel_permission_is_read_once_per_block_time(
    shared: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL file older than the announcements (no ``&<prefix>:{*}:notify``): SSUBSCRIBE
    is refused, said once, and the key is still followed, by the read once per block."""
    caplog.set_level(logging.INFO, logger="subscriber.client")
    cluster = shared.cluster
    for node in cluster.nodes:  # every node: a replica may be promoted
        admin = connect(node.url, socket_timeout=5)
        try:
            admin.acl_setuser(
                "oldsub", enabled=True, passwords=["+old-subscriber-pw"], keys=["*"],
                commands=["+@all"], reset_channels=True,
            )  # fmt: skip
        finally:
            admin.close()
    (key,) = names("noperm", 1)
    shared.publish(key, "v1")
    node = cluster.master_for(stream_keys(key).events)
    url = f"redis://oldsub:old-subscriber-pw@{node.host}:{node.port}/0"
    sub = Subscriber(key, Recorder(), redis_url=url, worker_id="c:1", **{**SLOW, "block_ms": 1000})
    shared.subs.append(sub.start())
    wait_until(lambda: "cannot SSUBSCRIBE" in caplog.text, "the refusal said")
    started = time.monotonic()
    shared.publish(key, "v2")
    wait_until(lambda: at(sub, 2, "v2"), "read by the catch-up read", timeout=3)
    assert time.monotonic() - started < 2.5
    assert caplog.text.count("cannot SSUBSCRIBE") == 1


def test_a_key_joining_later_is_read_at_once_and_follows_its_notifications(
    shared: Cluster,
) -> None:
    KEYS = names("late", 4)
    for key in KEYS[:4]:
        shared.publish(key, f"{key} v1")
    first = [shared.start(key) for key in KEYS[:3]]
    late_key = KEYS[3]
    shared.publish(late_key, f"{late_key} v2")
    late = shared.start(late_key)
    assert at(late, 2, f"{late_key} v2")
    shared.publish(late_key, f"{late_key} v3")
    wait_until(lambda: at(late, 3, f"{late_key} v3"), "notified", timeout=NOTIFIED_WITHIN)
    shared.publish(KEYS[0], f"{KEYS[0]} v2")
    wait_until(lambda: at(first[0], 2, f"{KEYS[0]} v2"), "notified", timeout=NOTIFIED_WITHIN)


def test_shared_false_keeps_a_connection_and_a_thread_per_key(shared: Cluster) -> None:
    KEYS = names("own", 3)
    for key in KEYS[:3]:
        shared.publish(key, f"{key} v1")
    subs = [shared.start(key, shared=False, block_ms=300) for key in KEYS[:3]]
    assert all(sub._hub is None for sub in subs)
    assert not hub_threads()
    shared.publish(KEYS[1], f"{KEYS[1]} v2")
    wait_until(lambda: at(subs[1], 2, f"{KEYS[1]} v2"), KEYS[1])


def test_stopping_one_key_ends_only_that_key(shared: Cluster) -> None:
    KEYS = names("stop", 3)
    for key in KEYS[:3]:
        shared.publish(key, f"{key} v1")
    subs = [shared.start(key) for key in KEYS[:3]]
    subs[1].stop()
    shared.publish(KEYS[0], f"{KEYS[0]} v2")
    wait_until(lambda: at(subs[0], 2, f"{KEYS[0]} v2"), "the others follow on")
    url = shared.cluster.master_for(stream_keys(KEYS[1]).events).url
    assert worker_states(url, KEYS[1])["c:1"].status == "stopped"


def test_a_master_killed_every_key_gets_its_next_change(redis_cluster: RedisCluster) -> None:
    """A failover: the dead master's keys are routed to the promoted replica and resync
    there; the other masters' keys are not disturbed."""
    started = Cluster(redis_cluster)
    keys = spread(redis_cluster, "killed", 3)
    try:
        for key in keys:
            started.publish(key, f"{key} v1")
        subs = [started.start(key, heartbeat_interval=1.0, block_ms=1000) for key in keys]
        victim = redis_cluster.master_for(stream_keys(keys[0]).events)
        redis_cluster.kill(victim)
        redis_cluster.wait_failover(victim, stream_keys(keys[0]).events)
        started._publisher = None  # a new cluster client: the old one knew the dead master
        for key in keys:
            started.publish(key, f"{key} v2")
        for key, sub in zip(keys, subs, strict=True):
            wait_until(partial(at, sub, 2, f"{key} v2"), key, timeout=20)
        new_master = redis_cluster.master_for(stream_keys(keys[0]).events)
        assert subs[0]._topology.node.port == new_master.port
        for key in keys:
            started.publish(key, f"{key} v3")
        for key, sub in zip(keys, subs, strict=True):
            wait_until(partial(at, sub, 3, f"{key} v3"), key, timeout=5)
    finally:
        started.close()


def test_a_manual_failover_moves_the_keys_without_a_lost_connection(
    redis_cluster: RedisCluster,
) -> None:
    """CLUSTER FAILOVER on a replica: the old master stays up, drops the shard channels of
    the slots it lost (``sunsubscribe``) and answers MOVED; its keys follow the new master,
    the other masters' keys are untouched."""
    started = Cluster(redis_cluster)
    keys = spread(redis_cluster, "moved", 3)
    try:
        for key in keys:
            started.publish(key, f"{key} v1")
        subs = [started.start(key) for key in keys]  # rounds every 10 s: notified only
        old = redis_cluster.master_for(stream_keys(keys[0]).events)
        (replica, *_) = redis_cluster.replicas_of(old)
        manual_failover(replica)
        wait_until(
            lambda: redis_cluster.master_for(stream_keys(keys[0]).events).port == replica.port,
            "the replica promoted",
        )
        redis_cluster.wait_ok()
        started._publisher = None
        for key in keys:
            started.publish(key, f"{key} v2")
        for key, sub in zip(keys, subs, strict=True):
            wait_until(partial(at, sub, 2, f"{key} v2"), key, timeout=5)
        moved = [sub for sub in subs if sub._topology.node.port == replica.port]
        assert moved  # the keys of the old master's slots now follow the new master
        assert max(len(connections(node.url, "c:1")) for node in redis_cluster.nodes) <= 2
    finally:
        started.close()


def test_a_killed_pubsub_connection_is_made_again_and_its_keys_caught_up(
    shared: Cluster,
) -> None:
    """A notification sent while the pub/sub connection is gone is lost (at-most-once):
    the connection is made again at once and every key of that master read once."""
    keys = names("kill", 6)
    for key in keys:
        shared.publish(key, f"{key} v1")
    subs = [shared.start(key) for key in keys]
    url = shared.cluster.master_for(stream_keys(keys[0]).events).url
    (pubsub,) = [c for c in connections(url, "c:1") if c["cmd"] == "ssubscribe"]
    admin = connect(url, socket_timeout=5)
    try:
        admin.client_kill_filter(_id=pubsub["id"])
    finally:
        admin.close()
    for key in keys:
        shared.publish(key, f"{key} v2")
    for key, sub in zip(keys, subs, strict=True):
        wait_until(partial(at, sub, 2, f"{key} v2"), key, timeout=NOTIFIED_WITHIN + 1)
    wait_until(lambda: len(connections(url, "c:1")) == 2, "two connections again")


def test_a_frozen_master_every_key_follows_on_after_the_failover(
    redis_cluster: RedisCluster,
) -> None:
    """A master that answers nothing (SIGSTOP): the hub's reads of it time out (3 s, the
    command connection's socket timeout), the cluster answers CLUSTERDOWN everywhere until
    the replica took over; then every key, of every master, gets its next change."""
    started = Cluster(redis_cluster)
    keys = spread(redis_cluster, "frozen", 3)
    frozen = redis_cluster.master_for(stream_keys(keys[0]).events)
    try:
        for key in keys:
            started.publish(key, f"{key} v1")
        subs = [started.start(key, heartbeat_interval=1.0, block_ms=1000) for key in keys]
        redis_cluster.freeze(frozen)
        redis_cluster.wait_failover(frozen, stream_keys(keys[0]).events)
        started._publisher = None
        for key in keys:
            started.publish(key, f"{key} v2")
        for key, sub in zip(keys, subs, strict=True):
            wait_until(partial(at, sub, 2, f"{key} v2"), key, timeout=20)
        assert max(len(connections(n.url, "c:1")) for n in redis_cluster.nodes if n != frozen) <= 2
    finally:
        started.close()
        with contextlib.suppress(Exception):
            redis_cluster.kill(frozen)


# -- AsyncSubscriber: the same per event loop (subscriber._aioclusterhub) ------------------------


async def _async_keys(started: Cluster, keys: list[str], after: Any = None) -> None:
    """Start an AsyncSubscriber per key; check sharing; change every key (v2); run
    ``after`` (blocking, in a thread) and change every key again (v3)."""
    cluster = started.cluster
    subs = [
        AsyncSubscriber(key, Recorder(), redis_url=cluster.url, worker_id="a:1", **SLOW)
        for key in keys
    ]
    try:
        for key in keys:
            await asyncio.to_thread(started.publish, key, f"{key} v1")
        for sub in subs:
            await sub.start()
        assert all(
            isinstance(sub._hub[0], _aioclusterhub.AioClusterHub) for sub in subs if sub._hub
        )
        assert all(sub._hub is not None for sub in subs)
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("hotreload-")]
        assert [t.get_name() for t in tasks] == ["hotreload-hub"]  # (+ a reader per master)
        masters = {cluster.master_for(stream_keys(key).events).url for key in keys}
        assert len(masters) > 1
        for url in masters:
            await asyncio.to_thread(
                wait_until, lambda url=url: len(connections(url, "a:1")) == 2, url
            )
        for version in (2, 3) if after else (2,):
            if version == 3:
                await asyncio.to_thread(after)
            for key in keys:
                await asyncio.to_thread(started.publish, key, f"{key} v{version}")
            for key, sub in zip(keys, subs, strict=True):
                text = f"{key} v{version}".encode()
                timeout = NOTIFIED_WITHIN if version == 2 else 20
                await asyncio.to_thread(
                    wait_until, lambda sub=sub, text=text: sub.content == text, key, timeout
                )
    finally:
        for sub in subs:
            await sub.stop()
    assert _aioclusterhub.hub_count() == 0


def test_async_subscribers_share_two_connections_per_master_and_follow_notifications(
    shared: Cluster,
) -> None:
    asyncio.run(_async_keys(shared, spread(shared.cluster, "async", 4)))


def test_async_subscribers_follow_a_killed_master_to_its_replica(
    redis_cluster: RedisCluster,
) -> None:
    started = Cluster(redis_cluster)
    keys = spread(redis_cluster, "akilled", 2)
    victim = redis_cluster.master_for(stream_keys(keys[0]).events)

    def kill() -> None:
        redis_cluster.kill(victim)
        redis_cluster.wait_failover(victim, stream_keys(keys[0]).events)
        started._publisher = None

    try:
        asyncio.run(_async_keys(started, keys, after=kill))
    finally:
        started.close()


def _applied_acks(url: str, key: str) -> list[int]:
    return [a.version for a in acks(url, key) if a.status == "applied"]


def test_a_key_holds_its_reports_and_the_stop_writes_each_once(
    shared: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reports held (``_reports``) are not sent by the round after the entry (as they were
    before issue 21 on a cluster: one more round trip per key and update): v2's ack is
    still held after v3 was read and applied; stop() writes both, once."""
    monkeypatch.setattr(_reports, "REPORT_DELAY", 30.0)  # held until stop()
    (key,) = names("held", 1)
    url = shared.cluster.master_for(stream_keys(key).events).url
    shared.publish(key, "held v1")
    sub = shared.start(key)
    wait_until(lambda: _applied_acks(url, key) == [1], "start()'s ack (never held)")
    for version in (2, 3):
        shared.publish(key, f"held v{version}")
        wait_until(partial(at, sub, version, f"held v{version}"), f"v{version} notified")
    assert _applied_acks(url, key) == [1]
    sub.stop()
    assert _applied_acks(url, key) == [1, 2, 3]


def test_held_reports_go_out_on_a_round_of_their_own_when_due(
    shared: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No other change, no catch-up read within the block time (10 s): the key's round at
    the end of its hold writes its ack and state, for Subscriber and AsyncSubscriber."""
    monkeypatch.setattr(_reports, "REPORT_DELAY", 0.2)
    sync_key, async_key = names("due", 2)
    for key in (sync_key, async_key):
        shared.publish(key, f"{key} v1")
    sub = shared.start(sync_key)
    shared.publish(sync_key, f"{sync_key} v2")
    url = shared.cluster.master_for(stream_keys(sync_key).events).url
    wait_until(partial(acked, url, sync_key, 2), "the held ack and state", timeout=3)

    async def follow() -> None:
        asub = AsyncSubscriber(async_key, Recorder(), redis_url=shared.cluster.url,
                               worker_id="c:1", **SLOW)  # fmt: skip
        await asub.start()
        try:
            await asyncio.to_thread(shared.publish, async_key, f"{async_key} v2")
            aurl = shared.cluster.master_for(stream_keys(async_key).events).url
            await asyncio.to_thread(
                wait_until, partial(acked, aurl, async_key, 2), "the held ack", timeout=3
            )
        finally:
            await asub.stop()

    asyncio.run(follow())
    assert sub.version == 2
