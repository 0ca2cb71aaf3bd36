"""One connection and one thread for all of a process's ``Subscriber`` objects on one Redis.

Measured before this module (issue 22): 20 ``Subscriber`` objects -- 20 keys of one
ConfigMap -- held 20 Redis connections and 20 follower threads per process, 160 connections
per pod at 8 gunicorn workers. A :class:`Hub` follows them all: one thread, one connection
(plus, lazily, a second one to wake the first, below), one ``XREAD BLOCK`` over every key's
stream, each key at its own cursor. Each key keeps everything else of its own: its core
(verification, walk-back, acks, the rollout audience), its reports and heartbeat (queued on
the same round trip, before the read: ``_transport._queue_cycle_head``), its resync, its
logs and metrics. tests/test_hub.py counts connections (``CLIENT LIST``) and threads.

Measured (tests/benchmarks/bench_hub.py, 20 keys in one worker process, unix socket, this
project's shared 2-core machine, 2 rounds per mode alternating, 30 s idle window, 50
changes of one key per row): ``Subscriber`` 20 connections and 21 threads -> 2 and 2 (the
main thread and the hub's); idle ``XREAD`` round trips 4.0/s -> 0.2/s; idle CPU of the
process 0.04-0.08 % -> 0.01-0.02 % of a core; one key's change (``XADD`` -> callback) p50
1.55-1.87 ms own vs 1.63-1.80 ms shared (p99 is this machine's noise: 3-154 ms in either
mode). ``AsyncSubscriber``: 20 connections and 20 tasks -> 2 and 1, 0.05-0.06 % ->
0.02-0.03 %, p50 1.74-2.01 vs 1.92-1.94 ms. At 200 keys (one quick round): 200 -> 2
connections, idle 0.88 % -> 0.06 %, one key p50 1.58 -> 2.12 ms: each shared cycle names
every stream and cursor, a cost that grows with the keys (packing the read once per set of
cursors would be the next step if that ever matters).

- Who shares: the Subscribers of one process with the same Redis (the parsed ``Target``)
  and the same client name (worker id), once the URL is known to be a standalone Redis
  (``redis://``, ``rediss://``, ``unix://``) or a sentinel master. In a Redis Cluster every
  key has its own slot (its ``{KEY}`` hash tag), and one ``XREAD`` may not name keys of
  several slots (``CROSSSLOT``): a blocking read cannot wait on two slots, so each key
  keeps its own connection and thread there, as before; so does one made with
  ``shared=False``. A Subscriber started from its fallback file before its ``redis://``
  URL ever answered (it could be a cluster) starts alone and moves into the hub once its
  Redis answered as a standalone one (``Subscriber._moved_to_hub``).
- A callback runs on the hub's thread, so a slow callback delays the other keys' reads and
  heartbeats (never their correctness: cursors are per key). A key whose callback must not
  wait for others, or that may block, takes ``shared=False``: its own connection and thread.
- Failing keys stay alone: a callback that raises is a rejection of that key's content (the
  core's rule); a command Redis refuses for one key (``WRONGTYPE``: an operator overwrote the
  stream) makes that key resync with its own backoff, out of the shared read meanwhile -- a
  refused shared ``XREAD`` resyncs every key, one ``XREVRANGE`` each, which finds the key to
  leave out. A lost connection is lost for every key: each logs it, counts it in its metrics
  and resyncs, as it did alone.
- Joining: a key that starts while the hub is blocked in ``XREAD`` must be read at once,
  not a block time later. The joiner sends ``CLIENT UNBLOCK <hub's id>`` (the read returns
  as if it timed out) on a second connection made on the first join and kept: hence at
  most 2 connections. The subscriber ACL user (``deploy/redis/gen-users-acl.sh``) needs
  ``+client|id +client|unblock`` for it; without them (an older ACL file) the joiner is
  read after the current block (``block_ms``, 5 s) instead, and nothing else changes.
- Leaving: ``stop()`` takes its key out at once (the key's lock; it waits only for a running
  callback, as before) and writes the final state itself; the shared read is not cut, its
  reply for that key is ignored. The last key to leave ends the hub (its read is cut) and
  its ``stop()`` returns once the thread ended.
- Idle cost: one round trip per block time for all keys, not per key: a heartbeat due
  within half an interval rides on the current round trip, so the keys' heartbeats fall into
  step after the first one (each key still refreshes within its interval).
- Held reports (``_reports``: a decision's ack and state wait 30 ms, out of the way of the
  other workers applying the same entry) are waited out on the thread's wake event, no read
  in flight, and go with the next read (``_hubplan.held_for``, as ``_aiohub`` does); a key
  joining or the last one leaving ends the wait. Before, a read blocked until the hold's
  end, timed out and was sent again: one ``XREAD`` more per update, sent right after the
  callback, i.e. inside the propagation's window, and Redis woken for its timeout.
  Measured (issue 21, ``profile_worker --gap 0.15``, 300 events, alternating with main,
  load 3-8): the worker's CPU from the ``XADD`` to 5 ms after its callback 0.39-0.45 ->
  0.35-0.39 ms (the floor worker 0.31-0.35); system calls per update (strace) 4.75 ``poll``
  + 2.9 ``recvfrom`` + 1.9 ``sendto`` -> 3 + 2 + 1 and one ``futex`` (the wait). Its CPU
  per update in all stays 0.65-0.75 ms: the wait's timer wakes the thread as the timed-out
  read did.
- After a fork (gunicorn ``preload_app``) the child does not inherit hubs: the registry is
  emptied in the child (``os.register_at_fork``), so its first ``start()`` makes a new one.

The decisions (what one round trip carries, which replies are whose, whose failure it is)
are ``_hubplan``'s, I/O-free and shared with ``_aiohub``: the ``AsyncSubscriber`` objects of
one event loop share one connection and one task the same way.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Protocol, cast

import redis

from subscriber import _light, _redis, _sentinel
from subscriber._hubplan import (
    Followed,
    Member,
    dispatch,
    failed,
    held_for,
    lost,
    plan_cycle,
)
from subscriber._pool import InterruptiblePool, close, execute, join_interrupting
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch
from subscriber.defaults import BACKOFF_CAP, CONNECT_TIMEOUT, SOCKET_TIMEOUT_MARGIN

if TYPE_CHECKING:
    import logging

    from subscriber._target import Target

__all__ = ["ENABLED", "Hub", "SyncFollowed", "hub_count", "join"]

# The internal switch: False makes every Subscriber follow on its own (as with shared=False).
ENABLED = True
# A joiner retries CLIENT UNBLOCK this long while the hub is between planning and blocking.
NUDGE_FOR = 1.0
_NUDGE_POLL = 0.01
# Socket timeouts of the waker connection (CLIENT UNBLOCK).
WAKER_TIMEOUT = 1.0


class SyncFollowed(Followed, Protocol):
    """What the thread's hub uses of a ``Subscriber`` besides the shared part."""

    def _resync(self, client: redis.Redis) -> None: ...
    def _write_final_state(self, *, acks: bool = True) -> None: ...
    def _hub_died(self, exc: BaseException) -> None: ...


class Hub:
    """The follower thread of one (Redis, client name) in this process; see the module."""

    def __init__(self, key: tuple[Target, str], target: Target, client_name: str) -> None:
        self._key = key
        self._target = target
        self._client_name = client_name
        self._lock = threading.Lock()  # guards the fields below up to _nudge_lock
        self._members: list[Member] = []
        self._version = 0  # bumped by each join
        self._planned = 0  # the version the hub's current cycle was planned at
        self._reading = False  # a read is in flight
        self._block_cap = 1.0  # the longest block the connection's socket timeout allows
        self._client_id: int | None = None  # of the hub's connection, for CLIENT UNBLOCK
        self._node: Target = target
        self._closing = False
        self._pool: InterruptiblePool | None = None
        self._nudge_lock = threading.Lock()  # guards the waker connection
        self._waker: redis.Redis | None = None
        self._can_unblock = True
        self._wake = threading.Event()
        self._backoff = _redis.Backoff(cap=BACKOFF_CAP)
        self.thread = threading.Thread(target=self._run, name="hotreload-hub", daemon=True)

    # -- joining and leaving (any thread) ------------------------------------------------

    def _add(self, member: Member) -> int:
        with self._lock:
            self._members.append(member)
            self._version += 1
            version = self._version
        self._wake.set()
        return version

    def leave(self, member: Member, timeout: float) -> bool:
        """Take ``member`` out; False if its callback is still running after ``timeout``.
        The last key to leave also waits (within ``timeout``) for the thread to end."""
        deadline = time.monotonic() + timeout
        if not member.lock.acquire(timeout=max(timeout, 0.0)):
            return False
        member.gone = True
        member.lock.release()
        self._discard(member)
        self._wait_ended(deadline - time.monotonic())
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
            pool = self._pool
        self._wake.set()
        if pool is not None:
            pool.interrupt()  # nobody left to disturb: end the read now

    def _wait_ended(self, within: float) -> None:
        """Once the last key left: wait (cutting its read short) until the thread ended, so
        that the process's last ``stop()`` leaves no thread behind, as a key's own thread did
        (without it, the thread outlived ``stop()`` by a moment, seen in 1 of 20 runs of
        test_stop_is_prompt_even_with_a_long_block_and_records_stopped)."""
        with self._lock:
            if not self._closing or self.thread is threading.current_thread():
                return
        join_interrupting(self.thread, lambda: self._pool, within)

    def nudge(self, version: int) -> None:
        """Make the read in flight (planned before ``version``) return now: CLIENT UNBLOCK."""
        deadline = time.monotonic() + NUDGE_FOR
        with self._nudge_lock:
            while self._can_unblock and time.monotonic() < deadline:
                with self._lock:
                    planned, reading = self._planned, self._reading
                    client_id, node = self._client_id, self._node
                if planned >= version or self._closing:
                    return  # the hub's cycle already reads the new key
                if reading:
                    if client_id is None:
                        return  # no CLIENT ID (an older ACL): read after this block
                    if self._unblock(node, client_id):
                        return
                time.sleep(_NUDGE_POLL)

    def _unblock(self, node: Target, client_id: int) -> bool:
        """Send CLIENT UNBLOCK; True when done trying (it worked, or it cannot)."""
        try:
            if self._waker is None:
                self._waker = _light.connect(
                    node,
                    socket_timeout=WAKER_TIMEOUT,
                    connect_timeout=WAKER_TIMEOUT,
                    client_name=self._client_name,
                )
            batch = Batch()
            batch.command("CLIENT", "UNBLOCK", client_id)
            (reply,) = execute(self._waker, batch, raise_on_error=True)
        except redis.ResponseError as exc:  # NOPERM: an ACL without +client|unblock
            self._can_unblock = False
            cannot_wake(self._log(), exc)
            return True
        except (redis.RedisError, OSError):
            close(self._waker)
            self._waker = None
            return True
        return bool(reply)

    # -- the thread ----------------------------------------------------------------------

    def _log(self) -> logging.Logger:
        with self._lock:
            members = list(self._members)
        return members[0].sub._log if members else _fallback_logger()

    def _active(self) -> list[Member] | None:
        self._wake.clear()  # what a join or the last leave set is read below, under the lock
        with self._lock:
            if self._closing:
                return None
            self._planned = self._version
            return [m for m in self._members if not m.gone]

    def _run(self) -> None:
        client: redis.Redis | None = None
        try:
            while (members := self._active()) is not None:
                try:
                    if client is None:
                        client = self._connect(members)
                    self._resync_due(client, members)
                    if not self._cycle(client, members):
                        self._wait_for_retry(members)
                    self._backoff.reset()
                except DISCONNECTED as exc:
                    close(client)
                    client = None
                    with self._lock:
                        self._reading = False
                    if self._active() is None:
                        break
                    lost(members, exc)
                    delay = members[0].sub._reconnect_delay(self._backoff) if members else 0.0
                    self._wake.wait(delay)
                    self._wake.clear()
                except Exception:  # noqa: BLE001 -- a bug must not end the thread silently
                    self._log().exception("hotreload: shared follower failed; reconnecting")
                    close(client)
                    client = None
                    for member in members:
                        member.resync = True
                    self._wake.wait(self._backoff.next_delay())
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 -- the thread ends: never silently
            self._died(exc)
        finally:
            close(client)
            with self._nudge_lock:
                close(self._waker)
                self._waker = None

    def _connect(self, members: list[Member]) -> redis.Redis:
        block = max((m.sub._block for m in members), default=1.0)
        timeout = block + SOCKET_TIMEOUT_MARGIN
        node = self._target
        if node.sentinel:  # the master now, from the sentinels
            node = _sentinel.master(node, timeout=min(CONNECT_TIMEOUT, timeout))
        client = _light.connect(
            node,
            socket_timeout=timeout,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            client_name=self._client_name,
        )
        pool = cast("InterruptiblePool", client.connection_pool)
        with self._lock:
            self._pool = pool
            closing = self._closing
        if closing:
            pool.interrupt()
        batch = Batch()
        batch.command("CLIENT", "ID")  # for CLIENT UNBLOCK; refused by an older ACL
        (reply,) = execute(client, batch)
        if isinstance(reply, Exception) and self._can_unblock:
            self._can_unblock = False  # NOPERM: keys joining later wait out the block
            cannot_wake(self._log(), reply)
        with self._lock:
            self._client_id = reply if isinstance(reply, int) else None
            self._node = node
            self._block_cap = block
        return client

    def _resync_due(self, client: redis.Redis, members: list[Member]) -> None:
        """Walk back every key that must (joined from the fallback, lost, refused)."""
        for member in members:
            if not member.resync_due(time.monotonic()):
                continue
            with member.lock:
                if member.stopping:
                    continue
                try:
                    cast("SyncFollowed", member.sub)._resync(client)
                except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                    failed(member, exc)
                else:
                    member.resynced()
            if member.stopping:
                self._ended(member)

    def _cycle(self, client: redis.Redis, members: list[Member]) -> bool:
        """One round trip for every key in step: reports, checks, one XREAD. False: none."""
        cycle = plan_cycle(members, self._block_cap)
        if cycle is None:
            return False
        with self._lock:
            self._reading = True
        try:
            results = execute(client, cycle.batch)
        finally:
            with self._lock:
                self._reading = False
        ended: list[Member] = []
        try:
            dispatch(cycle, results, ended)
        finally:
            for member in ended:
                self._ended(member)
        hold = held_for(cycle.reading, results[-1])
        if hold > 0:  # the next read goes with the held reports, not before them
            self._wake.wait(hold)  # a key joining or the last one leaving ends it
            self._wake.clear()
        return True

    def _ended(self, member: Member) -> None:
        """A ``stop()`` from the key's callback (or one that gave up waiting for it) is
        completed here, after the callback, as the key's own thread did."""
        with member.lock:
            if member.gone:
                return
            member.gone = True
        self._discard(member)
        cast("SyncFollowed", member.sub)._write_final_state()

    def _wait_for_retry(self, members: list[Member]) -> None:
        """No key can be read now (all wait to retry a resync): sleep until the first may."""
        now = time.monotonic()
        due = min((m.retry_at for m in members if m.resync), default=now + 1.0)
        self._wake.wait(max(0.0, due - now))
        self._wake.clear()

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
                cast("SyncFollowed", member.sub)._hub_died(exc)


def cannot_wake(log: logging.Logger, exc: BaseException) -> None:
    log.info(
        "hotreload: cannot wake the shared read for a new key (%s): it is read after the "
        "current block; grant the subscriber user +client|id +client|unblock",
        exc,
    )


def _fallback_logger() -> logging.Logger:
    import logging

    return logging.getLogger("subscriber.client")


# -- the process's hubs ---------------------------------------------------------------------

_registry_lock = threading.Lock()
_hubs: dict[tuple[Target, str], Hub] = {}


def _forget_after_fork() -> None:
    global _registry_lock  # noqa: PLW0603 -- a lock held at fork time would never be released
    _registry_lock = threading.Lock()
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def join(
    sub: SyncFollowed, target: Target, client_name: str, *, resync: bool
) -> tuple[Hub, Member, int]:
    """Add ``sub`` to this process's hub for (``target``, ``client_name``), making it (and
    its thread) if needed. Then call ``hub.nudge(version)`` (holding no lock): the read in
    flight is woken, so that the new key is read now."""
    member = Member(sub, resync=resync)
    key = (target, client_name)
    with _registry_lock:
        hub = _hubs.get(key)
        made = hub is None
        if hub is None:
            hub = _hubs[key] = Hub(key, target, client_name)
        version = hub._add(member)
        if made:
            hub.thread.start()
        return hub, member, version


def hub_count() -> int:
    """Hubs alive in this process (tests)."""
    with _registry_lock:
        return len(_hubs)
