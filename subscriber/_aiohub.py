"""One connection and one task for all of an event loop's ``AsyncSubscriber`` objects on one
Redis: ``_hub`` for asyncio (read its docstring: who shares, how keys join, leave and fail).

The decisions are ``_hubplan``'s, shared with the thread's hub; this is the I/O shell. The
differences are asyncio's: one hub per (event loop, Redis, client name), since a task and
its connection belong to one loop; callbacks run in the loop anyway, so a slow one delays
the other keys as it delays everything else in the loop; ``stop()`` takes its key out at
once (nothing can run concurrently with a decision) and the last key's stop cancels the
task; a loop shut down without ``stop()`` cancels the task, which still records
``stopped`` for each of its keys, as each key's own task did.

A decision's held reports are waited out before the next read, and while other hubs of
the same loop are still deciding, until the loop is quiet (``_aiohold``): the reports of
an update go out after the loop's decisions of it, not among them.
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

from subscriber import _redis, _sentinel
from subscriber._aiohold import HOLD_CAP, Hold, held_for, wait_held
from subscriber._aiopool import HeldPool, aclose, execute, stalled_until, time_out
from subscriber._hub import NUDGE_FOR, WAKER_TIMEOUT, cannot_wake
from subscriber._hubplan import Followed, Member, dispatch, failed, lost, plan_cycle
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch
from subscriber.defaults import BACKOFF_CAP, CONNECT_TIMEOUT, SOCKET_TIMEOUT_MARGIN

if TYPE_CHECKING:
    from subscriber._target import Target

# held_for and HOLD_CAP: _aiohold's, imported from here by _aioclusterblock
__all__ = ["HOLD_CAP", "AioHub", "AsyncFollowed", "held_for", "join"]

_NUDGE_POLL = 0.01


class AsyncFollowed(Followed, Protocol):
    """What the task's hub uses of an ``AsyncSubscriber`` besides the shared part."""

    async def _resync(self, client: redis.asyncio.Redis) -> None: ...
    async def _write_final_state(self) -> None: ...
    def _hub_died(self, exc: BaseException) -> None: ...


def _sub(member: Member) -> AsyncFollowed:
    return cast("AsyncFollowed", member.sub)


class AioHub:
    """The follower task of one (event loop, Redis, client name); see the module."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, key: _Key, target: Target, client_name: str
    ) -> None:
        self._loop = loop
        self._key = key
        self._target = target
        self._client_name = client_name
        self._members: list[Member] = []
        self._version = 0  # bumped by each join
        self._planned = 0  # the version the current cycle was planned at
        self._reading = False  # a read is in flight
        self._block_cap = 1.0
        self._client_id: int | None = None
        self._node: Target = target
        self._closing = False
        self._waker: redis.asyncio.Redis | None = None
        self._can_unblock = True
        self._wake = asyncio.Event()
        self._backoff = _redis.Backoff(cap=BACKOFF_CAP)
        self._held: Any = None  # the reading connection
        self._timeout = 0.0  # its socket timeout: a cycle's replies within it
        self._deadline = math.inf
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self._hold = Hold(loop)
        self.task: asyncio.Task[None] | None = None

    # -- joining and leaving --------------------------------------------------------------

    def _add(self, member: Member) -> int:
        self._members.append(member)
        self._version += 1
        self._wake.set()
        self._hold.end()  # its first read is not held up by the others' reports
        return self._version

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

    async def nudge(self, version: int) -> None:
        """Make the read in flight (planned before ``version``) return now: CLIENT UNBLOCK."""
        deadline = time.monotonic() + NUDGE_FOR
        while self._can_unblock and time.monotonic() < deadline:
            if self._planned >= version or self._closing:
                return
            if self._reading:
                if self._client_id is None:
                    return
                if await self._unblock(self._node, self._client_id):
                    return
            await asyncio.sleep(_NUDGE_POLL)

    async def _unblock(self, node: Target, client_id: int) -> bool:
        try:
            if self._waker is None:
                self._waker = _redis.connect_async(
                    node,
                    socket_timeout=WAKER_TIMEOUT,
                    connect_timeout=WAKER_TIMEOUT,
                    client_name=self._client_name,
                    pool_class=HeldPool,
                )
            batch = Batch()
            batch.command("CLIENT", "UNBLOCK", client_id)
            (reply,) = await execute(self._waker, batch, raise_on_error=True)
        except redis.ResponseError as exc:
            self._can_unblock = False
            if self._members:
                cannot_wake(self._members[0].sub._log, exc)
            return True
        except (redis.RedisError, OSError):
            waker, self._waker = self._waker, None
            await aclose(waker)
            return True
        return bool(reply)

    # -- the task -------------------------------------------------------------------------

    def _active(self) -> list[Member] | None:
        # Python 3.11's asyncio.wait_for (redis-py's send_packed_command) can swallow a
        # cancellation that arrives as the write completes (fixed in 3.12): a cancelled
        # task ends here anyway. Seen in tests: a loop shut down without stop() hung.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        if self._closing:
            return None
        self._planned = self._version
        return [m for m in self._members if not m.gone]

    async def _run(self) -> None:
        client: redis.asyncio.Redis | None = None
        try:
            while (members := self._active()) is not None:
                try:
                    if client is None:
                        client = await self._connect(members)
                    await self._resync_due(client, members)
                    if not await self._cycle(client, members):
                        await self._wait(self._retry_delay(members))
                    self._backoff.reset()
                except DISCONNECTED as exc:
                    await aclose(client)
                    client = None
                    self._reading = False
                    if self._active() is None:
                        break
                    lost(members, exc)
                    sub = members[0].sub if members else None
                    await self._wait(sub._reconnect_delay(self._backoff) if sub else 0.0)
                except Exception:  # noqa: BLE001 -- a bug must not end the task silently
                    if members:
                        members[0].sub._log.exception(
                            "hotreload: shared follower failed; reconnecting"
                        )
                    await aclose(client)
                    client = None
                    for member in members:
                        member.resync = True
                    await self._wait(self._backoff.next_delay())
        except asyncio.CancelledError:
            raise  # the last stop(), or the loop shutting down: the normal end
        except BaseException as exc:  # the task ends: never silently
            for member in self._members:
                with contextlib.suppress(Exception):
                    _sub(member)._hub_died(exc)
            raise
        finally:
            # Also reached when cancelled: the keys still here (a loop shut down without
            # stop()) record "stopped", each as its own task did.
            self._closing = True
            if self._watchdog is not None:
                self._watchdog.cancel()
            await aclose(client)
            await aclose(self._waker)
            self._forget()
            for member in list(self._members):
                if not member.gone:
                    member.gone = True
                    await _sub(member)._write_final_state()

    def _forget(self) -> None:
        loop_hubs = _hubs.get(self._loop)
        if loop_hubs is not None and loop_hubs.get(self._key) is self:
            del loop_hubs[self._key]

    async def _wait(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    @staticmethod
    def _retry_delay(members: list[Member]) -> float:
        now = time.monotonic()
        due = min((m.retry_at for m in members if m.resync), default=now + 1.0)
        return max(0.0, due - now)

    async def _connect(self, members: list[Member]) -> redis.asyncio.Redis:
        block = max((m.sub._block for m in members), default=1.0)
        timeout = block + SOCKET_TIMEOUT_MARGIN
        node = self._target
        if node.sentinel:
            node = await _sentinel.master_async(node, timeout=min(CONNECT_TIMEOUT, timeout))
        client = _redis.connect_async(
            node,
            socket_timeout=timeout,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            client_name=self._client_name,
            pool_class=HeldPool,
        )
        batch = Batch()
        batch.command("CLIENT", "ID")  # for CLIENT UNBLOCK; refused by an older ACL
        try:
            (reply,) = await execute(client, batch)
        except BaseException:
            await aclose(client)
            raise
        if isinstance(reply, Exception) and self._can_unblock and members:
            self._can_unblock = False  # NOPERM: keys joining later wait out the block
            cannot_wake(members[0].sub._log, reply)
        self._client_id = reply if isinstance(reply, int) else None
        self._node = node
        self._block_cap = block
        self._timeout = timeout
        self._held = await cast("HeldPool", client.connection_pool).held()
        return client

    async def _resync_due(self, client: redis.asyncio.Redis, members: list[Member]) -> None:
        for member in members:
            if not member.resync_due(time.monotonic()):
                continue
            try:
                await _sub(member)._resync(client)
            except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                failed(member, exc)
            else:
                member.resynced()
            if member.stopping:
                await self._ended(member)

    async def _cycle(self, client: redis.asyncio.Redis, members: list[Member]) -> bool:
        cycle = plan_cycle(members, self._block_cap)
        if cycle is None:
            return False
        self._reading = True
        self._watch(time.monotonic() + self._timeout)
        try:
            results = await execute(client, cycle.batch, timeout=math.inf)
        finally:
            self._reading = False
            self._deadline = math.inf
        ended: list[Member] = []
        try:
            dispatch(cycle, results, ended)
        finally:
            for member in ended:
                await self._ended(member)
        await wait_held(cycle.reading, results[-1], self._hold.sleep, self._joined)
        return True

    def _joined(self) -> bool:
        return self._version != self._planned

    def _watch(self, deadline: float) -> None:
        """Fail the cycle in flight if its replies are not in by ``deadline`` (a frozen
        Redis): one timer, kept while it rings no later, not an ``asyncio.timeout`` per
        read (a timer made and cancelled twice per key and update: ~8 % of the task's
        time under cProfile, ``profile_async``)."""
        self._deadline = deadline
        if self._watchdog is not None:
            if self._watch_at <= deadline:
                return
            self._watchdog.cancel()
        self._watch_at = deadline
        self._watchdog = self._loop.call_at(
            self._loop.time() + deadline - time.monotonic(), self._check
        )

    def _check(self) -> None:
        self._watchdog = None
        if not self._reading or self._deadline == math.inf:
            return
        # a reply still arriving (read, or read past: _aioreplycap) is no frozen Redis
        self._deadline = stalled_until(self._held, self._deadline, self._timeout)
        if time.monotonic() < self._deadline:
            self._watch(self._deadline)
            return
        # the read raises it (naming the peer as redis-py does); the hub drops the connection
        time_out(self._held)

    async def _ended(self, member: Member) -> None:
        if member.gone:
            return
        await self.leave(member)
        await _sub(member)._write_final_state()


# -- each loop's hubs -------------------------------------------------------------------------

_Key = tuple["Target", str]
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, AioHub]] = (
    weakref.WeakKeyDictionary()
)


def _forget_after_fork() -> None:
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def join(
    sub: AsyncFollowed, target: Target, client_name: str, *, resync: bool
) -> tuple[AioHub, Member, int]:
    """Add ``sub`` to the running loop's hub for (``target``, ``client_name``), making it
    (and its task) if needed; then ``await hub.nudge(version)``."""
    loop = asyncio.get_running_loop()
    member = Member(sub, resync=resync)
    key: _Key = (target, client_name)
    loop_hubs = _hubs.setdefault(loop, {})
    hub = loop_hubs.get(key)
    made = hub is None
    if hub is None:
        hub = loop_hubs[key] = AioHub(loop, key, target, client_name)
    version = hub._add(member)
    if made:
        hub.task = loop.create_task(hub._run(), name="hotreload-hub")
        hub.task.add_done_callback(_task_ended)
    return hub, member, version


def _task_ended(task: asyncio.Task[None]) -> None:
    # Retrieve what ended the task (the keys were told in _run): no "never retrieved".
    if not task.cancelled():
        task.exception()


def hub_count() -> int:
    """Hubs alive on the running loop (tests)."""
    return len(_hubs.get(asyncio.get_running_loop(), {}))
