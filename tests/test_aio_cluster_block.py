"""AsyncSubscriber on a Redis Cluster, a master whose keys (of one event loop and worker id)
are all in one slot: followed by one blocking ``XREAD`` on its command connection
(``subscriber._aioclusterblock``), not by the announcements and a read per entry; and the
reports held by a decision waited out before the next read is sent (``_aiohub.held_for``),
on one Redis and on a cluster. Real redis-server processes and 6-node clusters; the
connections are seen with ``CLIENT LIST``, the commands with ``INFO commandstats``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest

from subscriber import AsyncSubscriber, _aioclusterhub
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisCluster, RedisServer, append_event
from tests.helpers import Recorder, wait_until
from tests.test_cluster_hub import (
    NOTIFIED_WITHIN,
    SLOW,
    Cluster,
    connections,
    manual_failover,
    names,
    shared,  # noqa: F401 -- the fixture
    spread,
)
from tests.test_hub import blocked_reads

pytestmark = pytest.mark.slow

WORKER = "b:1"


def blocked(url: str) -> list[dict[str, Any]]:
    """``WORKER``'s connections to ``url`` blocked in an ``XREAD``."""
    return blocked_reads(url, WORKER)


def owner(cluster: RedisCluster, key: str) -> str:
    return cluster.master_for(stream_keys(key).events).url


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    await asyncio.to_thread(wait_until, check, what, timeout)


async def applied(sub: AsyncSubscriber, text: str, timeout: float = 10.0) -> None:
    await until(lambda: sub.content == text.encode(), text, timeout)


def subscriber(cluster: RedisCluster, key: str, **options: Any) -> AsyncSubscriber:
    return AsyncSubscriber(key, Recorder(), redis_url=cluster.url, worker_id=WORKER,
                           **{**SLOW, **options})  # fmt: skip


def test_a_key_alone_on_its_master_waits_in_a_blocking_read_and_needs_no_announcement(
    shared: Cluster,  # noqa: F811
) -> None:
    """One connection to its master, blocked in XREAD (no pub/sub connection); an entry
    nobody announced (an older daemon) is applied at once, not at the 10 s catch-up."""
    (key,) = names("alone", 1)
    shared.publish(key, f"{key} v1")
    url = owner(shared.cluster, key)

    async def follow() -> None:
        sub = subscriber(shared.cluster, key)
        await sub.start()
        try:
            await until(lambda: len(blocked(url)) == 1, "a blocked read")
            assert len(connections(url, WORKER)) == 1
            await asyncio.to_thread(append_event, url, key, f"{key} v2".encode(), version=2)
            await applied(sub, f"{key} v2", NOTIFIED_WITHIN)
        finally:
            await sub.stop()
        assert _aioclusterhub.hub_count() == 0

    asyncio.run(follow())


def test_a_key_joining_a_blocked_master_ends_the_read_and_both_follow(
    shared: Cluster,  # noqa: F811
) -> None:
    """A second key of the same master (another slot) joins while the first one's read
    blocks (10 s): CLIENT UNBLOCK hands the master back, it is followed by rounds (two
    connections), and both keys get their changes as announced."""
    first, second = spread(shared.cluster, "join", 2)[:2]
    url = owner(shared.cluster, first)
    assert owner(shared.cluster, second) == url
    for key in (first, second):
        shared.publish(key, f"{key} v1")

    async def follow() -> None:
        subs = [subscriber(shared.cluster, first), subscriber(shared.cluster, second)]
        try:
            await subs[0].start()
            await until(lambda: len(blocked(url)) == 1, "a blocked read")
            await subs[1].start()
            for key, sub in zip((second, first), subs[::-1], strict=True):  # the joiner first
                await asyncio.to_thread(shared.publish, key, f"{key} v2")
                await applied(sub, f"{key} v2", NOTIFIED_WITHIN)
            await until(lambda: len(connections(url, WORKER)) == 2, "rounds: two connections")
            assert not blocked(url)
        finally:
            for sub in subs:
                await sub.stop()

    asyncio.run(follow())


def _move_slot(cluster: RedisCluster, key: str, to: Any) -> None:
    """Migrate ``key``'s slot (and its keys) to master ``to``, as ``redis-cli --cluster
    reshard`` does: IMPORTING, MIGRATING, MIGRATE, then SETSLOT NODE on every master."""
    source = cluster.master_for(stream_keys(key).events)
    slot = cluster.slot_of(stream_keys(key).events)
    admins = {node: connect(node.url, socket_timeout=5) for node in cluster.master_nodes()}
    try:
        ids = {node: cast(Any, admin).execute_command("CLUSTER", "MYID").decode()
               for node, admin in admins.items()}  # fmt: skip
        run = {node: cast(Any, admin).execute_command for node, admin in admins.items()}
        run[to]("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        run[source]("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
        while keys := run[source]("CLUSTER", "GETKEYSINSLOT", slot, 100):
            run[source]("MIGRATE", to.host, to.port, "", 0, 5000, "KEYS", *keys)
        for node in (to, source, *[n for n in admins if n not in (to, source)]):
            run[node]("CLUSTER", "SETSLOT", slot, "NODE", ids[to])
    finally:
        for admin in admins.values():
            admin.close()


@pytest.mark.parametrize(
    "move", ["slot migrated", "manual failover", "master killed", "master frozen"]
)
def test_a_blocked_key_follows_its_slot_to_its_new_master(
    redis_cluster: RedisCluster, move: str
) -> None:
    """The slot moves while the key's read blocks (10 s): the server redirects the blocked
    read (MOVED; a killed master: the connection is lost; a frozen one: the read times out
    at the block (1 s here) + 3 s), the key is routed to the new master, blocks there,
    and gets the next change."""
    started = Cluster(redis_cluster)
    (key,) = names("moving", 1)
    old = redis_cluster.master_for(stream_keys(key).events)
    started.publish(key, f"{key} v1")

    def moved() -> Any:
        if move == "slot migrated":
            new = next(n for n in redis_cluster.master_nodes() if n != old)
            _move_slot(redis_cluster, key, new)
        elif move == "manual failover":
            (new, *_) = redis_cluster.replicas_of(old)
            manual_failover(new)
        elif move == "master killed":
            redis_cluster.kill(old)
            redis_cluster.wait_failover(old, stream_keys(key).events)
        else:
            redis_cluster.freeze(old)
            redis_cluster.wait_failover(old, stream_keys(key).events)
        wait_until(lambda: owner(redis_cluster, key) != old.url, "the slot moved")
        redis_cluster.wait_ok()
        started._publisher = None  # a new cluster client
        return redis_cluster.master_for(stream_keys(key).events)

    async def follow() -> None:
        block = {"block_ms": 1000} if move == "master frozen" else {}
        sub = subscriber(redis_cluster, key, heartbeat_interval=30.0, **block)
        await sub.start()
        try:
            await until(lambda: len(blocked(old.url)) == 1, "a blocked read")
            new = await asyncio.to_thread(moved)
            await asyncio.to_thread(started.publish, key, f"{key} v2")
            await applied(sub, f"{key} v2", 10.0)
            assert sub._topology.node.port == new.port
            await until(lambda: len(blocked(new.url)) == 1, "blocked on the new master")
        finally:
            await sub.stop()

    try:
        asyncio.run(follow())
    finally:
        started.close()
        if move == "master frozen":
            redis_cluster.kill(old)


def _xread_calls(url: str) -> int:
    admin = connect(url, socket_timeout=5)
    try:
        stats = admin.info("commandstats")
    finally:
        admin.close()
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


async def _reads_per_change(url: str, key: str, sub: AsyncSubscriber, writer: str) -> int:
    """The XREADs that completed for one change: from the read that returns it to the one
    that carries its held reports (then blocking, not counted yet)."""
    await sub.start()
    try:
        await until(lambda: len(blocked(writer)) == 1, "a blocked read")
        before = _xread_calls(writer)
        await asyncio.to_thread(append_event, writer, key, f"{key} v2".encode(), version=2)
        await applied(sub, f"{key} v2")
        # the reports (held 30 ms) written, the next read blocking again
        await until(lambda: int(sub._reports.due == float("inf")) == 1, "reports sent")
        await until(lambda: len(blocked(writer)) == 1, "blocked again")
        return _xread_calls(writer) - before
    finally:
        await sub.stop()


def test_held_reports_are_waited_out_before_the_next_read_on_one_redis(
    redis_server: RedisServer,
) -> None:
    """A change costs one read that returns (its entry) and the next one (blocking, with
    the reports): no read in between that times out at the end of the hold."""
    key = "held.yaml"
    append_event(redis_server.url, key, b"v1", version=1)
    sub = AsyncSubscriber(key, Recorder(), redis_url=redis_server.url, worker_id=WORKER, **SLOW)
    assert asyncio.run(_reads_per_change(redis_server.url, key, sub, redis_server.url)) == 1


def test_held_reports_are_waited_out_before_the_next_read_on_a_cluster(
    shared: Cluster,  # noqa: F811
) -> None:
    (key,) = names("heldc", 1)
    shared.publish(key, f"{key} v1")
    url = owner(shared.cluster, key)
    sub = subscriber(shared.cluster, key)
    assert asyncio.run(_reads_per_change(url, key, sub, url)) == 1


def _followers() -> list[asyncio.Task[None]]:
    """The blocking reads' tasks of the running loop's cluster hubs."""
    hubs = _aioclusterhub._hubs.get(asyncio.get_running_loop(), {})
    return [
        link.follower
        for hub in hubs.values()
        for link in hub._links.values()
        if link.follower is not None
    ]


def test_a_follower_cancelled_in_its_connection_s_handshake_ends(
    shared: Cluster,  # noqa: F811
) -> None:
    """The follower's task cancelled as ``AioLink.close`` does it (a stop, a loop shut down,
    a lost link) at each step of the event loop from its start: it ends, whatever step
    the cancel came at. Python 3.11's ``asyncio.wait_for`` (redis-py's writes in the
    connection's handshake) swallowed a cancel arriving as a write completed (cancel at the
    6th-20th step of 40, in every round tried): the follower went on into its 10 s blocking
    read, and again for good while its keys stayed (a loop shut down without ``stop()``
    hung, ``close`` awaiting it)."""
    (key,) = names("cancel", 1)
    shared.publish(key, f"{key} v1")

    async def cancelled_at(step: int) -> bool:
        sub = subscriber(shared.cluster, key)
        await sub.start()
        try:
            while not (followers := _followers()):
                await asyncio.sleep(0)
            (task,) = followers
            for _ in range(step):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5.0)  # the read blocks 10 s
            return bool(done)
        finally:
            await sub.stop()

    async def each_step() -> list[int]:
        return [step for step in range(40) if not await cancelled_at(step)]

    assert asyncio.run(each_step()) == []
