"""Connections per master, not per key, for a process's ``Subscriber`` objects on a Redis Cluster.

Before this module every config key on a cluster had its own connection and thread (one
``XREAD BLOCK`` cannot wait on two slots, and every key has its own slot): 20 keys, 20
connections and 20 threads per process. A :class:`ClusterHub` follows them all from one
thread with, per master, one pub/sub connection and one command connection
(tests/test_cluster_hub.py counts them with ``CLIENT LIST`` on every node):

- The publish script announces every entry on the key's shard channel (``SPUBLISH
  <prefix>:{KEY}:notify``, same slot as the stream). The pub/sub connection of a master is
  SSUBSCRIBEd to every local key of that master, one channel per call (a call may not span
  slots).
- A notification makes a *round* on the command connection: for each notified key, its
  reports and checks and a non-blocking ``XREAD`` from its own cursor, all pipelined
  (``_clusterplan``); then each key decides alone, exactly as its own follower would. A
  key's reports are held as elsewhere (``_reports``): it gets a round of its own when they
  are due, not a second round trip right after each entry.
- Notifications are at-most-once (a pub/sub message to a connection being re-made is
  lost), so every key is also read once per block time (``block_ms``, 5 s by default, the
  round its heartbeat rides on) and once after every (re)subscription. A daemon that does
  not notify (older than this) is thus still followed, within one block time instead of at
  once; that is the latency of a mixed-version upgrade.
- A key whose slot moved (a ``MOVED`` or ``CLUSTERDOWN`` reply, a ``sunsubscribe`` push from
  its node) is routed again by a ``CLUSTER SLOTS`` reply from any node and resyncs from its
  new master; a lost connection is lost for that master's keys only (each logs it, counts
  it and resyncs, as it did alone). Other keys are not disturbed, but one thread serves
  all masters: a master that does not answer delays the others' rounds by at most the
  command connection's socket timeout (``SOCKET_TIMEOUT_MARGIN``, 3 s) per attempt (a
  full-coverage cluster answers CLUSTERDOWN everywhere until its failover anyway).
- A callback runs on the hub's thread, as in ``_hub``: a key that may block takes
  ``shared=False`` (its own connection and thread, as before).

Measured (tests/benchmarks/bench_hub.py ``--cluster``, 6-node cluster on loopback, 3
masters, 20 keys in one process, 2 rounds alternating): 20 connections (10-12 on one node)
and 21 threads -> 6 (2 per node) and 2; idle CPU 0.06-0.07 % -> 0.03 %; one key's change
p50 1.11-1.13 ms own vs 1.53-1.65 ms shared (the announcement is one more hop); unannounced
(an older daemon) 4.8 s p50, within the 5 s block time.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis
from redis.exceptions import ResponseError

from subscriber import _hub, _redis
from subscriber._cluster import TopologyChanged, is_wrong_node
from subscriber._clusterlink import Link
from subscriber._clusterplan import (
    ClusterMember,
    cannot_subscribe,
    dispatch_round,
    plan_round,
    push_kind,
    replies,
)
from subscriber._hub import Hub, SyncFollowed
from subscriber._hubplan import Member, failed, lost
from subscriber._pool import InterruptiblePool, close, execute
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch
from subscriber.defaults import CONNECT_TIMEOUT, SOCKET_TIMEOUT_MARGIN

if TYPE_CHECKING:
    import logging

    from subscriber._cluster import Topology
    from subscriber._target import Target

__all__ = ["ENABLED", "ClusterHub", "hub_count", "join", "join_any", "shares"]

# The internal switch: False keeps a connection and a thread per cluster key (as before).
ENABLED = True
# Socket timeouts of both connections of a master: no read blocks on either.
TIMEOUT = SOCKET_TIMEOUT_MARGIN


class ClusterFollowed(SyncFollowed, Protocol):
    """What the cluster hub uses of a ``Subscriber`` besides the hub's part."""

    _topology: Topology


class ClusterHub:
    """The follower thread of one (cluster seed, client name) in this process."""

    def __init__(self, key: tuple[Target, str], client_name: str) -> None:
        self._key = key
        self._client_name = client_name
        self._lock = threading.Lock()  # guards _joining, _members, _closing
        self._joining: list[ClusterMember] = []
        self._members: list[ClusterMember] = []
        self._closing = False
        self._links: dict[Target, Link] = {}  # the thread's own, as everything below
        self._unrouted: list[ClusterMember] = []
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_lock = threading.Lock()  # no write to a closed (maybe reused) descriptor
        self.thread = threading.Thread(target=self._run, name="hotreload-hub", daemon=True)

    # -- joining and leaving (any thread) ------------------------------------------------

    def _add(self, member: ClusterMember) -> int:
        with self._lock:
            self._members.append(member)
            self._joining.append(member)
        self._wake()
        return 0

    def nudge(self, version: int) -> None:
        """Nothing to do: ``_add`` woke the thread (it waits on its pipe too)."""

    def leave(self, member: Member, timeout: float) -> bool:
        """Take ``member`` out; False if its callback is still running after ``timeout``."""
        if not member.lock.acquire(timeout=max(timeout, 0.0)):
            return False
        member.gone = True
        member.lock.release()
        self._discard(member)
        return True

    def _discard(self, member: Member) -> None:
        with _registry_lock, self._lock:
            if member in self._members:
                self._members.remove(member)
            if self._members:
                return
            self._closing = True
            if _hubs.get(self._key) is self:
                del _hubs[self._key]
        self._wake()

    def _wake(self) -> None:
        with self._pipe_lock, contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    joining, self._joining = self._joining, []
                for member in joining:  # routed by its start: the master it replayed from
                    self._link(cast("ClusterFollowed", member.sub)._topology.node, member)
                self._route()
                for link in list(self._links.values()):
                    self._serve(link)
                self._wait()
        except BaseException as exc:  # noqa: BLE001 -- the thread ends: never silently
            self._died(exc)
        finally:
            for link in self._links.values():
                link.close()
            with self._pipe_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def _link(self, node: Target, member: ClusterMember) -> None:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = Link(node)
        link.members.append(member)

    def _serve(self, link: Link) -> None:
        """Everything due on one master; a lost connection is its keys' alone."""
        link.members = [m for m in link.members if not m.gone]
        if not link.members:
            link.close()
            del self._links[link.node]
            return
        try:
            if link.client is None:
                self._connect(link)
            self._subscribe(link)
            self._drain(link)
            self._resync_due(link)
            now = time.monotonic()
            chosen = link.chosen(now)
            if chosen is None or chosen:
                self._round(link, chosen)
        except DISCONNECTED as exc:
            self._lose(link, exc)
        except Exception:  # noqa: BLE001 -- a bug must not end the thread silently
            self._log().exception("hotreload: shared cluster follower failed; reconnecting")
            self._lose(link, None)

    def _connect(self, link: Link) -> None:
        def connect() -> redis.Redis:
            return _redis.connect(
                link.node,
                socket_timeout=TIMEOUT,
                connect_timeout=CONNECT_TIMEOUT,
                client_name=self._client_name,
                pool_class=InterruptiblePool,
            )

        link.client, link.pubsub = connect(), connect()
        link.connection()  # connects now: a dead master fails here, not while waiting
        link.next_round = 0.0  # (re)subscribed: every key is read once (catch-up)

    def _subscribe(self, link: Link) -> None:
        """SSUBSCRIBE the channels not yet subscribed, one per command (one slot each),
        pipelined. A key refused with MOVED is routed again; one refused otherwise (an
        ACL without ``&<prefix>:*``) is still read once per block time."""
        pending = [m for m in link.members if m.channel not in link.subscribed]
        if not pending:
            return
        connection = link.connection()
        batch = Batch()
        for member in pending:
            batch.command("SSUBSCRIBE", member.channel)
            link.subscribed.add(member.channel)
        connection.send_packed_command(batch.pack())
        answered = 0
        while answered < len(pending):
            member = pending[answered]
            try:
                push = push_kind(connection.read_response(push_request=True))
            except ResponseError as exc:
                answered += 1
                if is_wrong_node(exc):
                    link.subscribed.discard(member.channel)
                    self._reroute(link, member, TopologyChanged(str(exc), reply=exc))
                else:
                    cannot_subscribe(member, exc)
                continue
            if push is not None and push[0] == b"ssubscribe":
                answered += 1
                link.notified.add(member)  # a change just before it is read now
            elif push is not None:
                self._pushed(link, *push)

    def _drain(self, link: Link) -> None:
        """Take the pushes waiting on the pub/sub connection (no waiting)."""
        connection = link.connection()
        while connection.can_read(timeout=0):
            push = push_kind(connection.read_response(push_request=True))
            if push is not None:
                self._pushed(link, *push)

    def _pushed(self, link: Link, kind: bytes, channel: bytes) -> None:
        members = [m for m in link.members if m.channel == channel]
        if kind == b"smessage":
            link.notified.update(members)
        elif kind == b"sunsubscribe":  # the node no longer serves the slot
            link.subscribed.discard(channel)
            for member in members:
                self._reroute(link, member, TopologyChanged("the slot moved (sunsubscribe)"))

    def _resync_due(self, link: Link) -> None:
        """Walk back every key that must (routed again, lost, refused)."""
        client = cast("redis.Redis", link.client)
        for member in list(link.members):
            if not member.resync_due(time.monotonic()):
                continue
            moved: TopologyChanged | None = None
            with member.lock:
                if member.stopping:
                    continue
                try:
                    cast("ClusterFollowed", member.sub)._resync(client)
                except TopologyChanged as exc:
                    moved = exc
                except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                    failed(member, exc)
                else:
                    member.resynced()
            if moved is not None:
                self._reroute(link, member, moved)
            elif member.stopping:
                self._ended(member)

    def _round(self, link: Link, chosen: set[ClusterMember] | None) -> None:
        cycle = plan_round(link.members, chosen)
        link.notified = set()
        if chosen is None:  # the catch-up read: the next one a block time on at most
            link.next_round = cycle.next_due if cycle else time.monotonic() + 1.0
        if cycle is None:
            return
        held = cast("InterruptiblePool", cast("redis.Redis", link.client).connection_pool).held()
        held.send_packed_command(cycle.batch.pack())
        results = replies(cycle.batch, held.read_response)
        ended: list[ClusterMember] = []
        advanced: list[ClusterMember] = []
        try:
            moved = dispatch_round(cycle, results, ended, advanced)
        finally:
            for member in ended:
                self._ended(member)
        for member in moved:
            self._reroute(link, member, TopologyChanged("its slot moved"))
        link.notified.update(m for m in advanced if m in link.members)

    # -- failures and routing --------------------------------------------------------------

    def _reroute(self, link: Link, member: ClusterMember, exc: TopologyChanged) -> None:
        """The key's slot is served elsewhere now: out of ``link``, routed again soon."""
        if member in link.members:
            link.members.remove(member)
        link.notified.discard(member)
        with member.lock:
            if member.gone:
                return
            member.resync = True
            member.lost_at = member.sub._connection_lost(exc, member.lost_at)
            member.retry_at = time.monotonic() + member.sub._reconnect_delay(member.backoff)
        self._unrouted.append(member)

    def _lose(self, link: Link, exc: BaseException | None) -> None:
        """The master's connections failed: its keys log it, and are routed again (a
        failover promotes a replica)."""
        link.close()
        del self._links[link.node]
        members = [m for m in link.members if not m.gone]
        if exc is not None:
            lost(cast("list[Member]", members), exc)
        for member in members:
            with member.lock:
                member.resync = True
                member.retry_at = time.monotonic() + member.sub._reconnect_delay(member.backoff)
            self._unrouted.append(member)

    def _route(self) -> None:
        """Route the keys whose retry time came, from one ``CLUSTER SLOTS`` reply."""
        self._unrouted = [m for m in self._unrouted if not m.gone]
        now = time.monotonic()
        ready = [m for m in self._unrouted if m.retry_at <= now]
        if not ready:
            return
        answer = self._slots(ready[0])
        for member in ready:
            try:
                if answer is None:
                    raise TopologyChanged("no cluster node answered CLUSTER SLOTS")
                node = cast("ClusterFollowed", member.sub)._topology.follow(*answer)
            except TopologyChanged:
                with member.lock:
                    member.retry_at = now + member.sub._reconnect_delay(member.backoff)
                continue
            self._unrouted.remove(member)
            self._link(node, member)

    def _slots(self, member: ClusterMember) -> tuple[Any, Target] | None:
        """A ``CLUSTER SLOTS`` reply and the node that gave it: a connected master's, else
        the first of the seed and the nodes last named that answers."""
        batch = Batch()
        batch.command("CLUSTER", "SLOTS")
        for link in self._links.values():
            if link.client is not None:
                with contextlib.suppress(*DISCONNECTED, redis.RedisError):
                    (reply,) = execute(link.client, batch, raise_on_error=True)
                    return reply, link.node
        for node in cast("ClusterFollowed", member.sub)._topology.known():
            client = _redis.connect(
                node,
                socket_timeout=TIMEOUT,
                connect_timeout=min(CONNECT_TIMEOUT, 1.0),
                client_name=self._client_name,
                pool_class=InterruptiblePool,
            )
            try:
                (reply,) = execute(client, batch, raise_on_error=True)
            except (*DISCONNECTED, redis.RedisError):
                continue
            finally:
                close(client)
            return reply, node
        return None

    def _wait(self) -> None:
        """Until a push arrives, a key joins or leaves, or the first timer is due."""
        now = time.monotonic()
        due = [link.due() for link in self._links.values()]
        due += [m.retry_at for m in self._unrouted]
        due += [m.retry_at for link in self._links.values() for m in link.members if m.resync]
        if any(link.notified for link in self._links.values()):
            return
        poller = select.poll()  # not select(): a worker may hold descriptors above 1024
        poller.register(self._wake_r, select.POLLIN)
        for link in self._links.values():
            if link.pubsub is not None:
                connection = link.connection()
                if connection.can_read(timeout=0):
                    return
                poller.register(connection._sock, select.POLLIN)
        timeout = max(0.0, min(due, default=now + 1.0) - now)
        ready = poller.poll(int(min(timeout, 60.0) * 1000) + 1)
        if any(fd == self._wake_r for fd, _events in ready):
            os.read(self._wake_r, 4096)

    def _ended(self, member: ClusterMember) -> None:
        """A ``stop()`` from the key's callback is completed here, after the callback."""
        with member.lock:
            if member.gone:
                return
            member.gone = True
        self._discard(member)
        cast("ClusterFollowed", member.sub)._write_final_state()

    def _log(self) -> logging.Logger:
        with self._lock:
            members = list(self._members)
        return members[0].sub._log if members else _hub._fallback_logger()

    def _died(self, exc: BaseException) -> None:
        with self._lock:
            members = list(self._members)
            self._members.clear()
            self._closing = True
        with _registry_lock:
            if _hubs.get(self._key) is self:
                del _hubs[self._key]
        for member in members:
            member.gone = True
            with contextlib.suppress(Exception):  # each key is told, whatever one does
                cast("ClusterFollowed", member.sub)._hub_died(exc)


# -- the process's cluster hubs ---------------------------------------------------------------

_registry_lock = threading.Lock()
_hubs: dict[tuple[Target, str], ClusterHub] = {}


def _forget_after_fork() -> None:
    global _registry_lock  # noqa: PLW0603 -- a lock held at fork time would never be released
    _registry_lock = threading.Lock()
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def join(
    sub: ClusterFollowed, target: Target, client_name: str, *, resync: bool
) -> tuple[ClusterHub, ClusterMember, int]:
    """Add ``sub`` (its ``_topology`` routed: its start found its master) to this process's
    cluster hub for (``target``, ``client_name``), making it and its thread if needed."""
    member = ClusterMember(sub, resync=resync)
    key = (target, client_name)
    with _registry_lock:
        hub = _hubs.get(key)
        made = hub is None
        if hub is None:
            hub = _hubs[key] = ClusterHub(key, client_name)
        version = hub._add(member)
        if made:
            hub.thread.start()
        return hub, member, version


def shares(topology: Topology) -> bool:
    """Whether a key at ``topology`` may follow in a hub: a standalone (or sentinel) Redis
    (``_hub``), or one that answered as a cluster (this module)."""
    return topology.standalone or (ENABLED and topology.cluster)


def join_any(
    sub: ClusterFollowed, target: Target, client_name: str, resync: bool
) -> tuple[Hub | ClusterHub, Member, int]:
    """The seam of ``Subscriber._join_hub``: ``_hub.join`` on a standalone Redis, else
    :func:`join`."""
    if sub._topology.standalone:
        return _hub.join(sub, target, client_name, resync=resync)
    return join(sub, target, client_name, resync=resync)


def hub_count() -> int:
    """Cluster hubs alive in this process (tests)."""
    with _registry_lock:
        return len(_hubs)
