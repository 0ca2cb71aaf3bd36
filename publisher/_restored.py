"""A freshly started daemon's first publish of a key, held while its ``:workers`` rows are all
older than the Redis server's start.

Why: a daemon numbers every version above max(what the workers report in ``:workers``, what it
wrote itself) (``publisher._floor``). A daemon restarted together with a Redis restored from
a backup wrote nothing yet, and the ``:workers`` rows it reads are the backup's: older than
what the running workers have seen. When its first publish of a key came before those workers
wrote their rows again, it numbered the mount's content from the restored rows, at or below
what they had seen (each rejected it as a replay and held), and the next upkeep sweep
published the same content again above them: the stream carried one content twice in a row
(v5 and v7, the workers at v6). The fault suite's older-RDB scenario saw it in 2 of 7
fresh-clone runs of session 7; ``tests/test_restored_first_publish.py`` reproduces it every
time by holding the workers (SIGSTOP) until the daemon's first publish.

So a key's first publish by this daemon (``Publisher.highest_version`` has no entry for it:
it wrote and found nothing of that key yet) reads the key's rows first. Each row carries its
worker's ``heartbeat`` (unix ms, the worker's clock) and ``heartbeat_interval``; the server's
start is its clock minus its uptime (``INFO server``: ``server_time_usec`` and
``uptime_in_seconds``, of the node holding the key in a Redis Cluster; through Sentinel the
client's master). When every row is older than that start, nothing tells yet what the live
workers have seen: the publish waits, for a row written since the start (its heartbeat at or
after it, or a row new or rewritten since the daemon's first look) or at most
``STALE_AFTER_BEATS`` of the rows' (longest) heartbeat interval plus the subscribers'
reconnect backoff cap counted from the server's start (a worker back on a restarted Redis
writes its row at its first pass, its backoff after the start; a connected one at least
every interval), capped at ``WAIT_CAP``. Hence:

- no rows, or a row written since the start (a daemon restarted alone, or a new key): no wait;
- a server that started longer ago than that bound: its rows older than its start belong to
  workers that never came back (the bound counts from the start, not from the daemon's);
- a Redis restarted with the daemon, from a restored backup or not: the first publish waits
  until the first worker is back, about its reconnect delay, at most the bound (default
  heartbeats, 5 s: 18 s). Measured (session 8, load 3-27): the fault suite's older-RDB
  scenario (6 workers, 1 s heartbeats), every worker on a version above what it saw 0.81-2.59
  s after the restore with the daemon restarted (25 runs; main 0.98-2.28 s in the 6 of 8
  alternated runs that did not publish at or below the workers); restarted empty with 0.5 s
  heartbeats 0.63-0.90 s against main's 0.33-0.44 (4 rounds alternating: rows written in
  the second Redis started count as old, so the wait lasts until their next heartbeat).

A Redis restarted empty cannot be told from a restored one: ``INFO persistence``'s
``rdb_last_load_keys_loaded`` counts an RDB's keys, but is 0 after an AOF restore (the rows
replayed as commands) and after a backup restored by a tool (``RESTORE``), measured on 7.0
(``test_info_persistence_cannot_tell_that_nothing_was_restored``); skipping the wait on it
would bring the defect back for those. So rows written in its first second wait for their
next heartbeat, as above.

The start a waiting key's rows were found older than stays its reference while it waits,
across a failover of its slot (redis-py's cluster client follows it; a killed master's,
through ``reset``: the key keeps it) and a Sentinel's: the promoted replica holds the same
rows (replicated) and may have started long before (one that ran on while its master
restarted, within the node timeout, from an older RDB, and resynced it). Compared with its
start the restored rows looked written since, and the key was published at once, numbered
from them (``tests/test_restored_cluster.py``, both ways). A later start (the new master
restarted since) is taken: the reference is the latest start seen while the key waits.

Rows gone while the key waits (the upkeep forgets rows silent for an hour, so a day-old
backup's go at its first sweep) end nothing: the wait goes on as for the rows first read.
Not waited for: workers whose rows the backup does not hold at all (no rows: no wait). The
start is known to the second (``uptime_in_seconds``), rounded so that it is never before
the real one: ``uptime_in_seconds`` is the whole seconds of its clock minus those of its start
(measured: 1 s half a second after a start), so the start is taken as the end of the second
it began in. A row written within that second counts as old, and the wait ends at its next
heartbeat. A worker whose clock runs behind Redis's by more than the time since the start
looks old too (a longer wait, bounded); one ahead by more than Redis was down would make a
restored row look new (the old behaviour, for that key).

The waiting key is deferred, never slept on: the daemon's loop is one thread, and its other
keys, its upkeep and its shutdown go on (``next_check``, a float the loop reads without the
lock a watcher's publish holds). The key leaves the pending set and comes back
through ``due`` every ``RECHECK`` s until it may go; one INFO line says why it waits. A key
deferred on a watcher's thread (an idle daemon publishes a kubelet swap there) wakes the
loop, whose idle wait was computed before: unwoken, it slept to its next stream check (up
to ``check_interval``, 1 s, late; ``tests/test_restored_daemon.py``).
A key this daemon writes meanwhile by other means (an operator's ``:control`` rollback,
promote or halt; a canary judged) leaves the wait (``forget``): left in it, it was due for
good, and the loop spun re-marking it (thousands of "skipped" lines a second, measured) with
the initial publish never done. So does a key whose content went back to one refused as too
large (nothing to publish: 44,261 loop steps in a second without it, measured,
``tests/test_restored_daemon.py``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import redis

from publisher._floor import bounded, read_workers
from publisher._link import CONNECTION_ERRORS
from subscriber.defaults import BACKOFF_CAP, MIN_HEARTBEAT_INTERVAL, STALE_AFTER_BEATS
from subscriber.keys import stream_keys

if TYPE_CHECKING:
    from collections.abc import Iterable

    from publisher._admin import AnyRedis

__all__ = ["RECHECK", "WAIT_CAP", "FirstPublish", "Rows", "rows_of", "wait_left", "written_since"]

logger = logging.getLogger(__name__)

WAIT_CAP = 30.0  # seconds after the server's start a first publish waits, at most
RECHECK = 0.25  # seconds between two reads of a waiting key's rows
_SCAN_COUNT = 500  # an HSCAN page (as publisher._floor's)


class _Beat(msgspec.Struct):
    """The fields of a ``WorkerState`` read here, decoded loosely (as ``publisher._floor``)."""

    heartbeat: int = 0
    heartbeat_interval: float = 0.0


_decoder = msgspec.json.Decoder(_Beat)


@dataclass(frozen=True, slots=True)
class Rows:
    """A key's ``:workers`` rows as far as the wait goes: how many have a heartbeat, the newest
    heartbeat (unix ms) and the longest interval (seconds, at least the stale rule's floor)."""

    count: int = 0
    newest: int = 0
    interval: float = MIN_HEARTBEAT_INTERVAL
    beats: frozenset[tuple[bytes, int]] = frozenset()  # (field, heartbeat) of each row


def rows_of(pairs: Iterable[tuple[bytes, bytes | None]]) -> Rows:
    """``Rows`` of a hash's fields and values as ``read_workers`` yields them; a value that is
    oversized, does not decode or has no heartbeat is no worker's row."""
    count, newest, interval = 0, 0, MIN_HEARTBEAT_INTERVAL
    beats = set()
    for field, value in pairs:
        if value is None:
            continue
        try:
            beat = _decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if beat.heartbeat <= 0:
            continue
        count += 1
        newest = max(newest, beat.heartbeat)
        beats.add((field, beat.heartbeat))
        if math.isfinite(beat.heartbeat_interval):
            interval = max(interval, beat.heartbeat_interval)
    return Rows(count, newest, interval, frozenset(beats))


def written_since(rows: Rows, server_start_ms: int, first: Rows | None = None) -> bool:
    """Whether a row was written since the server's start: its heartbeat is not older, or
    it is new or rewritten since ``first`` (the rows at this daemon's first look on it)."""
    return rows.newest >= server_start_ms or bool(first and rows.beats - first.beats)


def wait_left(rows: Rows, server_start_ms: int, now_ms: int, first: Rows | None = None) -> float:
    """Seconds a first publish still waits (0: publish now), Redis's clock ``now_ms``."""
    if rows.count == 0 or written_since(rows, server_start_ms, first):
        return 0.0
    bound = min(WAIT_CAP, STALE_AFTER_BEATS * rows.interval + BACKOFF_CAP)
    return max(0.0, (server_start_ms + bound * 1000 - now_ms) / 1000)


@dataclass(frozen=True, slots=True)
class _Server:
    start_ms: int  # the server's start, by its clock (never before the real one)
    now_ms: int  # its clock when read ...
    read_at: float  # ... at this time.monotonic()

    def now(self) -> int:
        return self.now_ms + int((time.monotonic() - self.read_at) * 1000)


class FirstPublish:
    """Which keys' first publish waits, and when to look again (see the module docstring).

    Used on the daemon's loop thread (or a watcher's, with the loop's lock held)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._servers: dict[str, _Server] = {}  # node name ("" standalone) -> its start
        # key -> (look again at, since, its rows at the first look, the start they predate)
        self._waiting: dict[str, tuple[float, float, Rows, int]] = {}
        # key -> the start it waited on when the connection was lost (see ``reset``)
        self._kept: dict[str, int] = {}
        # key -> its rows, read with another due key's (one round trip), and when
        self._read: dict[str, tuple[Rows, float]] = {}
        # the earliest "look again at": read by the loop without the lock a watcher's
        # publish holds while it changes _waiting (a float, never a dict being changed)
        self.next_check = math.inf

    def reset(self) -> None:
        """A new connection: the server may have restarted; every key is published anyway.
        A waiting key keeps the start it waited on: a cluster's failover (a killed master)
        hands its slot to a replica that may have started earlier, holding the same rows."""
        self._servers.clear()
        self._read.clear()
        self._kept = {name: start for name, (_, _, _, start) in self._waiting.items()}
        self._waiting.clear()
        self.next_check = math.inf

    def forget(self, name: str) -> None:
        """``name`` was written or found meanwhile by something else than its first publish
        (an operator's ``:control`` rollback, promote or halt; a canary judged): its first
        publish is behind it, it waits no more. Left waiting, it was due for good: the loop
        spun re-marking it (its recheck time past) and the initial publish was never done."""
        self._kept.pop(name, None)
        self._read.pop(name, None)
        if self._waiting.pop(name, None) is not None:
            self._next()

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def due(self) -> list[str]:
        """The waiting keys whose time to look again has come (publish them again: each
        look sets its next). ``next_check`` becomes the others' earliest: it is kept only
        lowered between two calls (a look, a key added), never recomputed per key (a pass
        over 1,000 waiting keys recomputed it 1,000 times: 4.0 of 7.0 s of the loop)."""
        now = time.monotonic()
        due, later = [], math.inf
        for name, (at, _, _, _) in self._waiting.items():
            if at <= now:
                due.append(name)
            elif at < later:
                later = at
        self.next_check = later
        return due

    def holds(self, client: AnyRedis, name: str) -> bool:
        """Whether this daemon's first publish of ``name`` waits now (the caller defers it:
        ``due`` names it again). Raises what a lost connection raises; a refused ``INFO``
        (an ACL) or a row read refused never holds a publish."""
        workers = stream_keys(name, self.prefix).workers
        was = self._waiting.pop(name, None)
        first = None if was is None else was[2]
        kept = self._kept.pop(name, 0) if was is None else was[3]
        try:
            rows = self._rows(client, name) if was is not None else self._rows_now(client, name)
            # rows gone meanwhile (the upkeep forgets rows over an hour old: a day-old
            # backup's) tell nothing of the live workers: waited for as they were
            rows = first if first is not None and not rows.count else rows
            server = self._server(client, workers) if rows.count else None
        except CONNECTION_ERRORS:
            raise  # READONLY, MOVED, ... are ResponseErrors too: the loop's, as ever
        except redis.ResponseError as exc:
            logger.debug("%s: not waiting for its workers' rows: %s", name, exc)
            self._next()
            return False
        # the latest start it waited on: a slot failed over to a replica that started
        # earlier (it holds the same rows, replicated) ends nothing (see the docstring)
        start = 0 if server is None else max(server.start_ms, kept)
        left = 0.0 if server is None else wait_left(rows, start, server.now(), first)
        if left <= 0:
            if was is not None:
                fresh = server is not None and written_since(rows, start, first)
                logger.info(
                    "%s: %s after %.1f s; publishing above what its workers report",
                    name,
                    "a worker reported since Redis started" if fresh else "no worker reported",
                    time.monotonic() - was[1],
                )
            self._next()
            return False
        now = time.monotonic()
        since = now if was is None else was[1]
        at = now + min(RECHECK, left)
        self._waiting[name] = (at, since, rows if first is None else first, start)
        self.next_check = min(self.next_check, at)
        if was is None:
            logger.info(
                "%s: its first publish waits up to %.1f s for its workers to report: all %d "
                "rows of its :workers predate the Redis server's start (restored or restarted "
                "with this daemon), so what the running workers have seen is not known yet",
                name,
                left,
                rows.count,
            )
        return True

    def _rows_now(self, client: AnyRedis, name: str) -> Rows:
        return rows_of(read_workers(client, stream_keys(name, self.prefix).workers))

    def _rows(self, client: AnyRedis, name: str) -> Rows:
        """A due key's rows: read with every other key due now, their first ``HSCAN`` pages
        pipelined (one round trip; per node in a cluster), the others' kept for their own
        look in the same pass (the loop marks the due keys and looks at each in turn).
        A round trip per key (and ``next_check`` recomputed at each look): 67-86 % of a core
        with 1,000 keys waiting, 23-34 % now (docs/performance.md). Another key's read
        refused (a ``:workers`` that is no hash) is that key's, met in its own look."""
        now = time.monotonic()
        read = self._read.pop(name, None)
        if read is not None and now - read[1] < RECHECK:
            return read[0]
        names = [name, *(n for n, (at, _, _, _) in self._waiting.items() if at <= now)]
        if len(names) == 1:
            return self._rows_now(client, name)
        pipe = client.pipeline(transaction=False)
        for each in names:
            pipe.hscan(stream_keys(each, self.prefix).workers, 0, count=_SCAN_COUNT)
        rows = Rows()
        for each, reply in zip(names, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                if each == name:
                    raise reply
                continue
            cursor, page = reply
            # more than a page: read whole (as read_workers), in that key's own look
            found = rows_of(bounded(page.items())) if not int(cursor) else None
            if each == name:
                rows = found if found is not None else self._rows_now(client, name)
            elif found is not None:
                self._read[each] = (found, now)
        return rows

    def _server(self, client: AnyRedis, workers_key: str) -> _Server:
        """The start of the server holding ``workers_key``, read once per connection."""
        node: Any = None
        if not isinstance(client, redis.Redis):
            node = client.get_node_from_key(workers_key)  # type: ignore[no-untyped-call]
        name = "" if node is None else str(node.name)
        found = self._servers.get(name)
        if found is None:
            if node is None:
                info: Any = client.info("server")
            else:
                info = client.info("server", target_nodes=node)
            if isinstance(info, dict) and "uptime_in_seconds" not in info and len(info) == 1:
                info = next(iter(info.values()))  # one node's reply, keyed by the node
            if "server_time_usec" in info:
                now_ms = int(info["server_time_usec"]) // 1000
            else:  # before Redis 6.2
                if node is None:
                    seconds, micros = client.time()
                else:
                    seconds, micros = client.execute_command(  # type: ignore[no-untyped-call]
                        "TIME", target_nodes=node
                    )
                now_ms = int(seconds) * 1000 + int(micros) // 1000
            # uptime is whole seconds of its clock minus whole seconds of its start: the start
            # is within the second that ends 1 s after (its clock's second - uptime) began
            start_ms = (now_ms // 1000 - int(info["uptime_in_seconds"]) + 1) * 1000
            found = _Server(start_ms, now_ms, time.monotonic())
            self._servers[name] = found
        return found

    def _next(self) -> None:
        """A key left the wait: ``next_check`` may now be early (one wake-up for nothing,
        ``due`` sets it right), never late."""
        if not self._waiting:
            self.next_check = math.inf
