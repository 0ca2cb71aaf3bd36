"""``_clusterhub`` for asyncio: an event loop's ``AsyncSubscriber`` objects on one Redis Cluster
share, per master, one pub/sub connection and one command connection (read ``_clusterhub``'s
docstring: the announcements, the rounds, the catch-up read, routing and failures).

The decisions are ``_clusterplan``'s, shared with the thread's hub; this is the I/O shell.
The differences are asyncio's: one hub per (event loop, cluster URL, client name); each
master's pub/sub connection is read by a task of its own (it only marks keys notified, or
moved, and wakes the hub's task), so the hub's task never waits on a socket but its own
round trips; ``stop()`` takes its key out at once and the last key's stop cancels the tasks;
a loop shut down without ``stop()`` cancels them, and each key still records ``stopped``.

Measured (tests/benchmarks/bench_hub.py ``--cluster --async``, 20 keys, 3 masters, 2 rounds
alternating): 20 connections and 20 tasks -> 6 and 1 (+ a reader per master); idle CPU
0.06-0.07 % -> 0.05 %; one key's change p50 1.28-1.32 ms own vs 2.02-2.04 ms shared (the
announcement's hop, and the reader task waking the hub's task).

Rounds and announcements are read on ``_aiopool``'s one-pass fast path and written without
redis-py's task per write; the task's waits share one timer. With the reports held as
elsewhere (``_clusterplan.dispatch_round``), 250 keys of one process (``profile_async
--cluster``, issue 21) cost 237-273 us of CPU per key and update instead of 396-440 (the
floor's raw ``XREAD BLOCK`` loops: 150); docs/performance.md says where the rest goes.

A master whose keys here are all in one slot (one key per process, or one per master) has
no rounds: ``_aioclusterblock`` follows it with one blocking ``XREAD``, as ``_aiohub`` does
a standalone Redis (its docstring: why, and how moves, failures and joins end the read).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis
import redis.asyncio
from redis.exceptions import ResponseError

from subscriber import _aiohub, _redis
from subscriber._aioclusterblock import blocks, follow, unblock
from subscriber._aiohub import AioHub, AsyncFollowed
from subscriber._aiopool import HeldPool, aclose, execute, read_push, read_reply, send
from subscriber._cluster import TopologyChanged, is_wrong_node
from subscriber._clusterhub import TIMEOUT
from subscriber._clusterlink import AioLink
from subscriber._clusterplan import (
    ClusterMember,
    cannot_subscribe,
    dispatch_round,
    plan_round,
    push_kind,
)
from subscriber._hubplan import Member, failed, lost
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch
from subscriber.defaults import CONNECT_TIMEOUT

if TYPE_CHECKING:
    from subscriber._cluster import Topology
    from subscriber._target import Target

__all__ = ["AioClusterHub", "hub_count", "join", "join_any"]


class AsyncClusterFollowed(AsyncFollowed, Protocol):
    _topology: Topology


def _sub(member: Member) -> AsyncClusterFollowed:
    return cast("AsyncClusterFollowed", member.sub)


class AioClusterHub:
    """The follower task of one (event loop, cluster URL, client name); see the module."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: _Key, client_name: str) -> None:
        self._loop = loop
        self._key = key
        self._client_name = client_name
        self._members: list[ClusterMember] = []
        self._joining: list[ClusterMember] = []
        self._closing = False
        self._links: dict[Target, AioLink] = {}
        self._unrouted: list[ClusterMember] = []
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def _add(self, member: ClusterMember) -> int:
        self._members.append(member)
        self._joining.append(member)
        self._wake.set()
        return 0

    async def nudge(self, version: int) -> None:
        """Nothing to do: ``_add`` woke the task."""

    async def leave(self, member: Member) -> None:
        """Take ``member`` out (at once); the last one ends the task."""
        member.gone = True
        if member in self._members:
            self._members.remove(member)
        if self._members or self._closing:
            return
        self._closing = True
        self._forget()
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})

    # -- the task -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                task = asyncio.current_task()  # see _aiohub._active (Python 3.11)
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                joining, self._joining = self._joining, []
                for member in joining:
                    self._link(_sub(member)._topology.node, member)
                if self._unrouted:
                    await self._route()
                for link in list(self._links.values()):
                    await self._serve(link)
                await self._wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the task ends: never silently
            for member in self._members:
                with contextlib.suppress(Exception):
                    _sub(member)._hub_died(exc)
            raise
        finally:
            self._closing = True
            if self._timer is not None:
                self._timer.cancel()
            for link in list(self._links.values()):
                await link.close()
            self._forget()
            for member in list(self._members):
                if not member.gone:
                    member.gone = True
                    await _sub(member)._write_final_state()

    def _forget(self) -> None:
        loop_hubs = _hubs.get(self._loop)
        if loop_hubs is not None and loop_hubs.get(self._key) is self:
            del loop_hubs[self._key]

    def _link(self, node: Target, member: ClusterMember) -> None:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = AioLink(node)
        link.members.append(member)
        self._want(link)

    def _want(self, link: AioLink) -> None:
        """The hub's task wants ``link``'s command connection back from its blocking read."""
        if not link.following():
            return
        link.wanted = True
        if link.waking is None or link.waking.done():
            link.waking = self._loop.create_task(unblock(link, lambda: self._connect_to(link.node)))

    async def _serve(self, link: AioLink) -> None:
        link.members = [m for m in link.members if not m.gone]
        if not link.members:
            await link.close()
            del self._links[link.node]
            return
        try:
            if link.failure is not None:
                raise link.failure
            if link.follower is not None:  # the blocking read's task (_aioclusterblock)
                if not link.follower.done():
                    if time.monotonic() >= link.deadline:  # a frozen master
                        node = f"{link.node.host}:{link.node.port}"
                        raise redis.TimeoutError(f"Timeout reading from {node}")
                    return
                link.follower = None
                link.wanted = False
            if link.client is None:
                await self._connect(link)
            ended, link.ended = link.ended, []
            for member in ended:
                await self._ended(member)
            moved, link.moved = link.moved, []
            for member in moved:
                self._reroute(link, member, TopologyChanged("the slot moved"))
            if any(member.resync for member in link.members):
                await self._resync_due(link)
            if blocks(link):
                link.notified = set()
                link.next_round = math.inf  # no rounds: a catch-up one if they come back
                for member in link.members:
                    member.held_until = math.inf  # the blocking read sends the reports
                if any(not member.resync for member in link.members):
                    link.follower = self._loop.create_task(follow(link, self._wake.set, self._arm))
                return
            if link.next_round == math.inf:
                link.next_round = 0.0
            if any(member.channel not in link.subscribed for member in link.members):
                await self._subscribe(link)
            chosen = link.chosen(time.monotonic())
            if chosen is None or chosen:
                await self._round(link, chosen)
        except DISCONNECTED as exc:
            await self._lose(link, exc)
        except Exception:  # noqa: BLE001 -- a bug must not end the task silently
            if link.members:
                link.members[0].sub._log.exception(
                    "hotreload: shared cluster follower failed; reconnecting"
                )
            await self._lose(link, None)

    def _connect_to(self, node: Target) -> redis.asyncio.Redis:
        return _redis.connect_async(
            node,
            socket_timeout=TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            client_name=self._client_name,
            pool_class=HeldPool,
        )

    async def _connect(self, link: AioLink) -> None:
        """The command connection; the pub/sub one when rounds first need it."""
        link.client = self._connect_to(link.node)
        link.failure = None
        link.next_round = 0.0  # (re)connected: every key is read once (catch-up)

    async def _listen_on(self, link: AioLink) -> None:
        link.pubsub = self._connect_to(link.node)
        connection = await cast("HeldPool", link.pubsub.connection_pool).held()
        link.next_round = 0.0  # (re)subscribed: every key is read once (catch-up)
        link.reader = self._loop.create_task(self._listen(link, connection))

    async def _listen(self, link: AioLink, connection: Any) -> None:
        """The pub/sub connection's reader: marks keys notified or moved, wakes the hub."""
        try:
            while True:
                try:
                    reply = await read_push(connection)
                except ResponseError as exc:  # an SSUBSCRIBE refused, in order
                    member = link.awaiting.popleft() if link.awaiting else None
                    if member is not None and is_wrong_node(exc):
                        link.subscribed.discard(member.channel)
                        link.moved.append(member)
                    elif member is not None:
                        cannot_subscribe(member, exc)
                    self._wake.set()
                    continue
                push = push_kind(reply)
                if push is None:
                    continue
                kind, channel = push
                if kind == b"ssubscribe" and link.awaiting:
                    link.notified.add(link.awaiting.popleft())
                members = [m for m in link.members if m.channel == channel]
                if kind == b"smessage":
                    if link.follower is not None:
                        continue  # its blocking read has the entry
                    link.notified.update(members)
                elif kind == b"sunsubscribe":
                    link.subscribed.discard(channel)
                    link.moved.extend(members)
                    self._want(link)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the hub's task decides (_serve)
            link.failure = exc
            self._wake.set()

    async def _subscribe(self, link: AioLink) -> None:
        pending = [m for m in link.members if m.channel not in link.subscribed]
        if not pending:
            return
        if link.pubsub is None:
            await self._listen_on(link)
        batch = Batch()
        for member in pending:
            batch.command("SSUBSCRIBE", member.channel)
            link.subscribed.add(member.channel)
            link.awaiting.append(member)
        connection = await cast(
            "HeldPool", cast("redis.asyncio.Redis", link.pubsub).connection_pool
        ).held()
        await send(connection, batch.pack())

    async def _resync_due(self, link: AioLink) -> None:
        client = cast("redis.asyncio.Redis", link.client)
        for member in list(link.members):
            if not member.resync_due(time.monotonic()):
                continue
            try:
                await _sub(member)._resync(client)
            except TopologyChanged as exc:
                self._reroute(link, member, exc)
                continue
            except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                failed(member, exc)
            else:
                member.resynced()
            if member.stopping:
                await self._ended(member)

    async def _round(self, link: AioLink, chosen: set[ClusterMember] | None) -> None:
        cycle = plan_round(link.members, chosen)
        link.notified = set()
        if chosen is None:
            link.next_round = cycle.next_due if cycle else time.monotonic() + 1.0
        if cycle is None:
            return
        pool = cast("HeldPool", cast("redis.asyncio.Redis", link.client).connection_pool)
        held = await pool.held()
        await send(held, cycle.batch.pack())
        results: list[Any] = []
        for index in range(len(cycle.batch)):
            try:
                results.append(cycle.batch.reply(index, await read_reply(held)))
            except ResponseError as exc:
                results.append(cycle.batch.refused(index, exc))
        ended: list[ClusterMember] = []
        advanced: list[ClusterMember] = []
        try:
            moved = dispatch_round(cycle, results, ended, advanced)
        finally:
            for member in ended:
                await self._ended(member)
        for member in moved:
            self._reroute(link, member, TopologyChanged("its slot moved"))
        link.notified.update(m for m in advanced if m in link.members)

    # -- failures and routing ---------------------------------------------------------------

    def _reroute(self, link: AioLink, member: ClusterMember, exc: TopologyChanged) -> None:
        if member in link.members:
            link.members.remove(member)
        link.notified.discard(member)
        if member.gone:
            return
        member.resync = True
        member.lost_at = member.sub._connection_lost(exc, member.lost_at)
        member.retry_at = time.monotonic() + member.sub._reconnect_delay(member.backoff)
        self._unrouted.append(member)

    async def _lose(self, link: AioLink, exc: BaseException | None) -> None:
        await link.close()
        self._links.pop(link.node, None)
        members = [m for m in link.members if not m.gone]
        if exc is not None:
            lost(cast("list[Member]", members), exc)
        for member in members:
            member.resync = True
            member.retry_at = time.monotonic() + member.sub._reconnect_delay(member.backoff)
            self._unrouted.append(member)

    async def _route(self) -> None:
        self._unrouted = [m for m in self._unrouted if not m.gone]
        now = time.monotonic()
        ready = [m for m in self._unrouted if m.retry_at <= now]
        if not ready:
            return
        answer = await self._slots(ready[0])
        for member in ready:
            try:
                if answer is None:
                    raise TopologyChanged("no cluster node answered CLUSTER SLOTS")
                node = _sub(member)._topology.follow(*answer)
            except TopologyChanged:
                member.retry_at = now + member.sub._reconnect_delay(member.backoff)
                continue
            self._unrouted.remove(member)
            self._link(node, member)

    async def _slots(self, member: ClusterMember) -> tuple[Any, Target] | None:
        batch = Batch()
        batch.command("CLUSTER", "SLOTS")
        for link in list(self._links.values()):
            if link.client is not None and link.failure is None and link.follower is None:
                with contextlib.suppress(*DISCONNECTED, redis.RedisError):
                    (reply,) = await execute(link.client, batch, raise_on_error=True)
                    return reply, link.node
        for node in _sub(member)._topology.known():
            client = self._connect_to(node)
            try:
                (reply,) = await execute(client, batch, raise_on_error=True)
            except (*DISCONNECTED, redis.RedisError):
                continue
            finally:
                await aclose(client)
            return reply, node
        return None

    async def _wait(self) -> None:
        if any(link.busy() for link in self._links.values()) or self._joining:
            return
        now = time.monotonic()
        due = [link.due() for link in self._links.values()]
        due += [m.retry_at for m in self._unrouted]
        due += [m.retry_at for link in self._links.values() for m in link.members if m.resync]
        delay = max(0.0, min(due, default=now + 1.0) - now)
        if not self._wake.is_set():
            self._arm(now + min(delay, 60.0))
            await self._wake.wait()
        self._wake.clear()

    def _arm(self, when: float) -> None:
        """Wake the task at ``when`` (monotonic) at the latest. One timer, kept while it
        rings no later than that: not a timeout per wait (``asyncio.wait_for`` made a task
        per wait, two waits per key and update; measured, ``profile_async --cluster``)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return
            timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(self._loop.time() + when - time.monotonic(), self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._wake.set()

    async def _ended(self, member: Member) -> None:
        if member.gone:
            return
        await self.leave(member)
        await _sub(member)._write_final_state()


# -- each loop's cluster hubs -----------------------------------------------------------------

_Key = tuple["Target", str]
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, AioClusterHub]] = (
    weakref.WeakKeyDictionary()
)


def _forget_after_fork() -> None:
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def join(
    sub: AsyncClusterFollowed, target: Target, client_name: str, *, resync: bool
) -> tuple[AioClusterHub, ClusterMember, int]:
    """Add ``sub`` (routed by its start) to the running loop's cluster hub for
    (``target``, ``client_name``), making it and its task if needed."""
    loop = asyncio.get_running_loop()
    member = ClusterMember(sub, resync=resync)
    key: _Key = (target, client_name)
    loop_hubs = _hubs.setdefault(loop, {})
    hub = loop_hubs.get(key)
    made = hub is None
    if hub is None:
        hub = loop_hubs[key] = AioClusterHub(loop, key, client_name)
    version = hub._add(member)
    if made:
        hub.task = loop.create_task(hub._run(), name="hotreload-hub")
        hub.task.add_done_callback(_aiohub._task_ended)
    return hub, member, version


def join_any(
    sub: AsyncClusterFollowed, target: Target, client_name: str, resync: bool
) -> tuple[AioHub | AioClusterHub, Member, int]:
    """The seam of ``AsyncSubscriber``: ``_aiohub.join`` on a standalone Redis, else
    :func:`join`."""
    if sub._topology.standalone:
        return _aiohub.join(sub, target, client_name, resync=resync)
    return join(sub, target, client_name, resync=resync)


def hub_count() -> int:
    """Cluster hubs alive on the running loop (tests)."""
    return len(_hubs.get(asyncio.get_running_loop(), {}))
