"""The decisions of a shared follower, none of them I/O: shared by ``_hub`` (a thread on
redis-py, for ``Subscriber``) and ``_aiohub`` (a task on ``redis.asyncio``, for
``AsyncSubscriber``), as ``_transport`` is shared by the two clients.

A :class:`Member` is one key in a hub. Per cycle, :func:`plan_cycle` queues every member's
reports and checks (``_transport._queue_cycle_head``) and one ``XREAD`` over all their
streams; the transport sends the batch and :func:`dispatch` hands each member its slice of
the replies, in the shape its own cycle would have had (``_cycle_done``). Failures are sorted
here too: a lost connection is every member's (:func:`lost`); a command refused or a bug while
deciding for one key is that key's alone (:func:`failed`): it resyncs after its own backoff
and stays out of the shared read meanwhile.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis

from subscriber import _redis
from subscriber._stream import stream_entries
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch, CyclePlan
from subscriber.defaults import BACKOFF_CAP

if TYPE_CHECKING:
    import logging

    from subscriber._core import SubscriberCore
    from subscriber._reports import Reports
    from subscriber.keys import StreamKeys

__all__ = [
    "HOLD_CAP", "CycleBatch", "Followed", "Member", "dispatch", "failed", "held_for",
    "hold_after", "lost", "plan_cycle",
]  # fmt: skip


class Followed(Protocol):
    """What a hub uses of a subscriber (``Subscriber`` or ``AsyncSubscriber``)."""

    key: str
    _log: logging.Logger
    _keys: StreamKeys
    _core: SubscriberCore
    _block: float
    _batch_size: int
    _heartbeat_interval: float
    _reports: Reports

    @property
    def _phase(self) -> str: ...

    def _queue_cycle_head(self, pipe: Batch, *, early: float = ...) -> tuple[CyclePlan, int]: ...
    def _cycle_done(self, plan: CyclePlan, results: list[Any]) -> bool: ...
    def _connection_lost(self, exc: BaseException, lost_at: float | None) -> float: ...
    def _reconnected(self, lost_at: float) -> None: ...
    def _reconnect_delay(self, backoff: _redis.Backoff) -> float: ...
    def _command_refused(self, exc: redis.RedisError) -> None: ...
    def _unexpected_error(self) -> None: ...


class Member:
    """One key in a hub. ``lock`` is held while the hub queues, decides or resyncs for it
    (a ``stop()`` from another thread takes it to leave; asyncio never contends for it)."""

    __slots__ = (
        "backoff", "events", "gone", "lock", "lost_at", "plan", "resync", "retry_at", "sub"
    )  # fmt: skip

    def __init__(self, sub: Followed, *, resync: bool) -> None:
        self.sub = sub
        self.events = sub._keys.events.encode()
        self.lock = threading.Lock()
        self.resync = resync  # walk back before reading (a start from the fallback, a loss)
        self.lost_at: float | None = None
        self.backoff = _redis.Backoff(cap=BACKOFF_CAP)
        self.retry_at = 0.0  # a refused key resyncs no earlier
        self.gone = False  # stopped: the hub never touches it again
        # (plan, first reply, count, cursor): its part of the cycle in flight
        self.plan: tuple[CyclePlan, int, int, str] | None = None

    @property
    def stopping(self) -> bool:
        return self.gone or self.sub._phase == "stopped"

    def resync_due(self, now: float) -> bool:
        return self.resync and self.retry_at <= now and not self.stopping

    def resynced(self) -> None:
        """Its resync walk succeeded: back in the shared read."""
        self.resync = False
        self.backoff.reset()
        if self.lost_at is not None:
            self.sub._reconnected(self.lost_at)
            self.lost_at = None


@dataclass(slots=True)
class CycleBatch:
    """A cycle's round trip: ``batch`` for ``reading``, its read the last command, from
    ``streams`` (stream -> the id read after)."""

    batch: Batch
    reading: list[Member]
    streams: dict[str, str]


def _entry_id(value: object) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else str(value)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _after(entries: list[Any], cursor: str) -> list[Any]:
    """The entries after ``cursor``: for two keys of one stream at different positions (two
    Subscribers of one key in a process), the read starts at the lower one."""
    floor = _entry_id(cursor)
    return [e for e in entries if e[0] is None or _entry_id(e[0]) > floor]


def plan_cycle(members: list[Member], block_cap: float) -> CycleBatch | None:
    """Queue every member in step (not resyncing, not stopping); ``None`` if there is none.

    The read blocks until the first heartbeat due, a key waiting to retry its resync, or
    ``block_cap`` (what the connection's socket timeout allows). A heartbeat due within half
    an interval rides on this round trip (``early``): the keys' heartbeats fall into step,
    so an idle hub makes one round trip per block time, not one per key."""
    batch = Batch()
    streams: dict[str, str] = {}
    block = int(block_cap * 1000)
    count: int | None = None
    reading: list[Member] = []
    now = time.monotonic()
    for member in members:
        if member.resync:
            if member.retry_at > now:
                block = min(block, max(1, int((member.retry_at - now) * 1000)))
            continue
        with member.lock:
            if member.stopping:
                continue
            sub = member.sub
            first = len(batch)
            plan, key_block = sub._queue_cycle_head(batch, early=sub._heartbeat_interval / 2)
            cursor, name = sub._core.cursor.entry_id, sub._keys.events
            member.plan = (plan, first, len(batch) - first, cursor)
            held = streams.get(name)
            if held is None or _entry_id(cursor) < _entry_id(held):
                streams[name] = cursor
            block = min(block, key_block)
            count = sub._batch_size if count is None else min(count, sub._batch_size)
            reading.append(member)
    if not reading:
        return None
    batch.xread(streams, count=count, block=max(1, block))
    return CycleBatch(batch, reading, streams)


def dispatch(cycle: CycleBatch, results: list[Any], ended: list[Member]) -> None:
    """Hand each member its replies (its reports, its check, its entries of the shared
    read) and let it decide, key by key in join order. A refused shared read (``WRONGTYPE``:
    an operator overwrote one key's stream) makes every key resync: each walks its own
    stream, which finds the culprit. Members stopped meanwhile are appended to ``ended``."""
    read = results[-1]
    refused = isinstance(read, Exception)
    by_stream: dict[bytes, Any] = {}
    if not refused:
        for stream, entries in read or []:
            name = stream if isinstance(stream, bytes) else str(stream).encode()
            by_stream[name] = entries
    for member in cycle.reading:
        with member.lock:
            if member.gone or member.plan is None:
                continue
            plan, first, size, cursor = member.plan
            member.plan = None
            entries = by_stream.get(member.events)
            if entries and cycle.streams[member.events.decode()] != cursor:
                entries = _after(entries, cursor)
            mine = results[first : first + size]
            mine.append([[member.events, entries]] if entries else [])
            try:
                member.resync = member.sub._cycle_done(plan, mine) or refused
            except DISCONNECTED:
                raise
            except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                failed(member, exc)
        if member.stopping:
            ended.append(member)


# The longest hold waited out without a read in flight (``held_for``): the reports' own
# (``_reports.REPORT_DELAY``, 30 ms); a longer one (a test's) is waited in the read.
HOLD_CAP = 0.05


def held_for(reading: list[Member], read: object) -> float:
    """How long, from now, the reports of the keys that just decided are held
    (``_reports``): the threaded hub waits that out *before* it sends the next read, with
    the reports, rather than sending a read that blocks until the hold's end, times out and
    is sent again (the asyncio hubs too, through ``_aiohold.held_for``). 0 after a full batch (a
    backlog is read on at once) or with nothing held.

    The cost: an entry appended during the hold is read at its end (30 ms at most after the
    one before). What it saves per key and update: the read that times out -- one message
    each way, a wake-up of the worker and of Redis (its block timer), a reply parsed and a
    cycle planned. Measured for the threaded worker (issue 21, ``profile_worker --gap
    0.15``: in the update's window 0.39-0.45 -> 0.35-0.39 ms of CPU, the floor worker's
    0.31-0.35; docs/performance.md "Session 9: the threaded worker waits out its held
    reports")."""
    due = min((member.sub._reports.due for member in reading), default=math.inf)
    size = min((member.sub._batch_size for member in reading), default=1)
    return hold_after(due, size, read)


def hold_after(due: float, batch_size: int, read: object) -> float:
    """``held_for`` of reports due at ``due`` after ``read`` (a read of ``batch_size``);
    also the rule of a ``Subscriber`` on its own thread (``client.Subscriber._cycle``)."""
    if due == math.inf or _full(batch_size, read):
        return 0.0
    return min(max(0.0, due - time.monotonic()), HOLD_CAP)


def _full(size: int, read: object) -> bool:
    return isinstance(read, list) and any(len(stream_entries([pair])) >= size for pair in read)


def failed(member: Member, exc: Exception) -> None:
    """Deciding or resyncing for ``member`` failed (its lock held): it alone resyncs, after
    its own backoff, as its own follower did; a lost connection is raised on."""
    if isinstance(exc, DISCONNECTED):
        raise exc
    if isinstance(exc, redis.RedisError):
        member.sub._command_refused(exc)
    else:
        member.sub._unexpected_error()  # logs the exception being handled
    member.resync = True
    member.retry_at = time.monotonic() + member.backoff.next_delay()


def lost(members: list[Member], exc: BaseException) -> None:
    """The shared connection is lost: for every key, as for each alone, count it, log it
    (once per outage) and resync once reconnected."""
    for member in members:
        with member.lock:
            if member.gone:
                continue
            member.resync = True
            member.lost_at = member.sub._connection_lost(exc, member.lost_at)
