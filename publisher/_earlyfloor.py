"""The workers' floor of a key, asked for while kubelet writes its new version -- for the keys
whose ``:floor`` does not hold it.

Since session 10 most publishes need nothing of this module: every worker also keeps its floor
in the key's ``:floor`` sorted set (``ZADD GT``, pipelined with each state it writes,
``subscriber/_floorwrite.py``) and ``publish.lua`` reads the highest score itself (one
``ZRANGE ... BYSCORE REV LIMIT 0 1``). The sweep (``publisher.upkeep``: ``LUA_FLOOR`` with the
``:floor`` key) says, per key, whether ``:floor`` covers every ``:workers`` row -- each from a
worker that writes it (``WorkerState.floor``) with its score there at least the row's floor,
or ``stopped`` (it reads nothing more) -- and ``cover`` takes that: for a covered key ``send``
and ``read`` ask its newest entry id alone (``seen``, below; the script is passed '1' for it
and skips ``floor_of``, the loop reads no ``HSCAN``) and ``floor`` returns 0, so no publish
reads ``:workers``. What
follows is for the others, unchanged: a key with a row of a worker older than ``:floor`` (a
fleet mid-upgrade; an old worker's rows until they are forgotten, unless ``stopped``), one
whose ``ZSCORE`` is refused (an ACL from before ``:floor``), and every key after a
(re)connect until the first sweep (about a second: a Redis restored or failed over may hold
rows of older workers). A worker older than ``:floor`` starting between two sweeps is read
from ``:workers`` only from the next sweep on (up to 4 s): a new process starts at seen 0
and sees only what the stream holds, which the script numbers above anyway; only a stream
that lost entries in that same gap without a reconnect could number a version at or below
it, and that worker would hold, which the next sweep finds (holding) and publishes above.
Once workers older than ``:floor`` are no longer supported, this module and the pre-read's
floor request can go. Measured at 128 workers: see docs/performance.md, "The workers' floor
in :floor".

A publish numbers the new entry above what the key's workers have seen (``publisher._floor``:
the ``:workers`` hash), so every publish needs that floor, read a moment before it. Reading it
after the swap is a round trip (and, at 32 workers, ~10 KB of states decoded in Python) on the
path from kubelet's rename to the entry; so it is asked for while kubelet still writes: the
watcher's pre-read sees the new ``..<timestamp>`` directory about 0.5-1 ms before the rename.

Until session 8 the publishing loop did that read: ``coming`` woke it, and it read the floors
(one pipelined ``HSCAN`` round trip) with the daemon's lock held. But the loop is a third thread
wanting the GIL while the inotify and watcher threads handle kubelet's events: it began its read
0.66 ms after the hint (p50, ``tests.benchmarks.trace_publish``, 60 swaps), i.e. after the
rename, so 12 of 60 swaps found no floor and read it at their publish (a round trip more), 8 of
60 found the loop still reading and were handed over to it (a thread hop), and the loop spent
0.57-1.07 ms of CPU in each update's window (``profile_propagation``, 8 workers) competing with
the watcher for the GIL.

The same request reads each key's newest entry id (from its head, ``publisher._head``, while
the head matches the stream): what the daemon knew of the stream before it read the content
kubelet is writing, the ``seen`` of its publish (docs/design.md "Behind": a content read
before another publisher appended a newer one is not written above it).

Here the request is only SENT at the hint, on the thread that sees it (watchdog's inotify
thread: one ``send`` of an ``EVALSHA`` -- the script loaded once per connection, as the
shipped ACL has no ``EVAL`` -- on a connection of its own, never a connect or a wait), and
Redis computes the floor itself (``LUA_FLOOR``: ``cjson`` decodes the states) while kubelet
finishes. The publish, on whichever thread makes
it, reads the reply, by then normally in the socket's buffer: three integers a key (the
floor, whether the hash has more than one page, its rows). A request not sent (below) goes
to the loop; one sent whose answer is unusual -- an error, more workers than one ``HSCAN``
page, a reply older than ``FRESH`` -- leaves the floor to be read at the publish (``take``
returns None). The floor's meaning does not change: read a moment before the publish, and a
version a worker saw after the read was in the stream, which the script numbers above anyway.

Measured (``profile_propagation``, 1 KiB, 2 rounds alternating with the loop's read, load
5-27): rename -> entry appended 0.45-1.01 / 0.47-0.98 / 1.86-2.06 ms behind the floor
publisher's at 8 / 32 / 128 workers before, 0.33-0.36 / 0.43-0.46 / 0.57 after; the daemon's
CPU in the update's window 2.0-3.0 / 2.3-2.6 / 4.9-5.6 -> 1.7 / 1.8-1.9 / 3.3-3.4 ms. The
price is Redis's: ``LUA_FLOOR`` takes it 147 / 245 / 685 us at 8 / 32 / 128 workers (cold,
states of 282 bytes) against 15 / 28 / 77 us for the ``HSCAN`` whose reply the loop decoded,
spent while kubelet writes, when no worker reads.

Where the request cannot be sent, ``send`` says so and the daemon wakes the loop to read the
floors as before (``read``: one pipelined ``HSCAN`` round trip, decoded in Python), so that
nothing reads the floor at the publish that did not before: a Redis Cluster client (no one
connection for every key's slot; sending from here made each cluster publish read it at the
publish, a round trip more than the loop's early read), no connection yet, a request still
unanswered, and a volume whose keys had more than ``MAX_ROWS`` workers' rows at their last
read (the early answer carries each hash's ``HLEN``; the loop's and the publish's reads count
theirs). At 128 workers Redis's 0.7 ms of decoding may still run when the swap's ``EVALSHA``
arrives and hold up the whole fan-out: 128 workers, 1 KiB, main -> the early request for
every key x1.36 / x1.35 -> x1.60 / x1.45 the floor (2 rounds alternating, load 2-14), lower
in 4 of 11 rounds; below ``MAX_ROWS`` (8 and 32 workers) it gained (medians of 9 rounds
alternating with main, load 1-29: 64 KiB x1.36 -> x1.14 at 8 workers, x1.25 -> x1.20 at 32).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis

from publisher._floor import LUA_FLOOR, first_page_seen, read_workers_seen, scan_first_page
from publisher._head import head_key
from publisher._link import CONNECTION_ERRORS
from publisher._signed import text as _text
from subscriber.keys import stream_keys

if TYPE_CHECKING:
    from redis.connection import ConnectionInterface

    from publisher._admin import AnyRedis

__all__ = ["FRESH", "MAX_KEYS", "MAX_ROWS", "EarlyFloor"]

logger = logging.getLogger(__name__)

MAX_KEYS = 16  # a volume of more keys reads the changed keys' floors at publish
FRESH = 1.0  # seconds a floor asked for before a swap stays good for its publish
MAX_ROWS = 64  # workers' rows a request may make Redis decode; more: the loop reads them

# Per key, KEYS[i], KEYS[i + 1] its :workers and :events, and ARGV[(i + 1) / 2] '1' when its
# :floor covers its workers (``cover``: no floor read, {0, 0, 0, seen}): {floor, more, rows,
# seen} (more:
# over one HSCAN page, read at publish instead; rows: the hash's fields, which the next
# request's choice of path goes by; seen: the id of the newest entry, from the :head while it
# matches the stream as publish.lua reads it, '0-0' for none, '' when refused: the "seen" of
# the content kubelet writes now, docs/design.md "Behind"). The head, in the same slot, is
# not a declared key: an ACL from before it refuses its HGETALL alone (pcall: the newest
# entry is read instead), not the whole request, whose floors every swap needs.
_SCRIPT = (
    LUA_FLOOR
    + """
local function newest_of(events)
  local head = string.sub(events, 1, -7) .. 'head'
  local length = redis.pcall('XLEN', events)
  if type(length) ~= 'number' then return '' end
  if length == 0 then return '0-0' end
  local raw = redis.pcall('HGETALL', head)
  if type(raw) == 'table' and raw.err == nil then
    local h = {}
    for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
    if h.id ~= nil and string.match(h.id, '^%d+%-%d+$') ~= nil and h.len == tostring(length)
        and #redis.call('XREVRANGE', events, '+', '(' .. h.id, 'COUNT', 1) == 0 then
      return h.id
    end
  end
  return redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)[1][1]
end
local out = {}
for i = 1, #KEYS, 2 do
  local floor, more, rows, _ = 0, 0, 0, nil
  if ARGV[(i + 1) / 2] ~= '1' then -- '1': its :floor covers it, publish.lua reads that
    floor, _, more = floor_of(KEYS[i])
    rows = redis.call('HLEN', KEYS[i])
  end
  out[#out + 1] = {floor, more, rows, newest_of(KEYS[i + 1])}
end
return out
"""
)
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis names scripts so)


class EarlyFloor:
    """The floors of the keys of a directory kubelet writes: asked for by ``send`` (watchdog's
    thread, never waits) or, where it cannot, by the loop (``read``); handed out by ``floor``
    (the publishing thread, with the daemon's lock held), else read at the publish."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._lock = threading.Lock()  # the connection, what is pending on it, what is known
        self._connection: ConnectionInterface | None = None
        # names asked for, when, and those of them asked for their newest entry id alone
        self._pending: tuple[list[str], float, set[str]] | None = None
        self._floors: dict[str, tuple[int, float]] = {}  # name -> (floor, asked when)
        self._seen: dict[str, tuple[str, float]] = {}  # name -> (its newest entry's id, when)
        self._read: dict[str, tuple[int, float]] = {}  # name -> (floor the loop read, when)
        self._rows: dict[str, int] = {}  # name -> its :workers fields, at the last read
        self._covered: set[str] = set()  # names whose floor publish.lua reads from :floor
        # the script in this connection's server's cache: None not asked yet, False refused
        self._loaded: bool | None = None

    def ready(self, client: AnyRedis) -> None:
        """Have a connection of its own from ``client``'s pool, connected (the loop's thread:
        a connect may wait). A cluster client gets none: the loop reads its floors (``read``)."""
        if not isinstance(client, redis.Redis):
            return
        with self._lock:
            connection = self._connection
            if connection is not None and _connected(connection) and self._loaded is not None:
                return
            self._pending = None
            self._floors.clear()
            self._seen.clear()
            try:
                if connection is None:
                    connection = client.connection_pool.make_connection()
                if not _connected(connection):
                    connection.connect()  # type: ignore[no-untyped-call]
                self._connection = connection
                # EVALSHA, never EVAL: the shipped publisher ACL grants EVALSHA and SCRIPT
                # LOAD only (an EVAL was denied, and logged in ACL LOG, at every swap)
                connection.send_command("SCRIPT", "LOAD", _SCRIPT)  # type: ignore[no-untyped-call]
                sha = connection.read_response()
                self._loaded = sha in (_SHA, _SHA.encode())
            except redis.ResponseError as exc:  # SCRIPT LOAD refused: the loop reads floors
                logger.debug("no early floor reads: %s", exc)
                self._loaded = False  # not asked again on this connection
            except (redis.RedisError, OSError) as exc:
                logger.debug("no connection for the early floor reads: %s", exc)

    def forget(self) -> None:
        """Reconnected (the loop's thread): no floor read before is handed out, and every key's
        :workers is read again until a sweep finds its :floor covers them (a Redis restored
        or failed over may hold rows of workers that do not write :floor)."""
        with self._lock:
            self._floors.clear()
            self._seen.clear()
            self._read.clear()
            self._covered.clear()

    def cover(self, covered: Mapping[str, bool]) -> None:
        """What the sweep read (the loop's thread, ``Upkeep.covered``): a key True has every
        :workers row from a worker that writes :floor, its score there, so its floor is read
        by publish.lua (``floor`` returns 0; ``send`` and ``read`` ask its newest entry id
        alone); False: its floor is asked for or read as well."""
        with self._lock:
            for name, flag in covered.items():
                if flag:
                    self._covered.add(name)
                else:
                    self._covered.discard(name)

    def send(self, names: Sequence[str]) -> bool:
        """Ask for ``names``' floors now (watchdog's thread: sends, never connects or waits);
        False when it cannot -- no connection (a cluster client, a Redis lost), the publishing
        thread holds it, a request unanswered, more than ``MAX_KEYS`` keys or ``MAX_ROWS``
        workers' rows at the last read: the caller then wakes the loop to ``read`` them."""
        if not names or len(names) > MAX_KEYS or not self._lock.acquire(blocking=False):
            return False
        try:
            covered = {name for name in names if name in self._covered}  # their seen alone
            connection = self._connection
            if connection is None or not _connected(connection) or self._loaded is not True:
                return False
            if sum(self._rows.get(name, 0) for name in names if name not in covered) > MAX_ROWS:
                return False
            if self._pending is not None:
                if not connection.can_read(timeout=0):
                    return False  # still unanswered
                with contextlib.suppress(redis.ResponseError):  # read at publish, then
                    self._receive(connection)  # an answer nobody took (no swap came)
            keys = [key for name in names for key in self._keys(name)[:2]]
            only_seen = ["1" if name in covered else "" for name in names]
            connection.send_command("EVALSHA", _SHA, len(keys), *keys, *only_seen)  # type: ignore[no-untyped-call]
            self._pending = (list(names), time.monotonic(), covered)
            return True
        except (redis.RedisError, OSError) as exc:
            self._drop(exc)
            return False
        finally:
            self._lock.release()

    def read(self, client: AnyRedis, names: Sequence[str]) -> None:
        """Read ``names``' floors now (the loop's thread, woken because ``send`` could not:
        one pipelined ``HSCAN`` round trip, per node in a cluster, which also reads each
        stream's length and head: ``seen``): the swap's publish then waits for its ``EVALSHA``
        alone. Until session 8 every swap's floor was read so (8
        workers, 1 KiB: 0.4 ms of the 1.3 from the swap's event to the entry's append). A
        volume of more than ``MAX_KEYS`` keys reads the changed keys' floors at publish."""
        if not names or len(names) > MAX_KEYS:
            return
        with self._lock:
            covered = {name for name in names if name in self._covered}  # their seen alone
        now = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for name in names:  # with the stream's length and head: the newest entry's id
            workers, events, head = self._keys(name)
            if name not in covered:
                scan_first_page(pipe, workers)
            pipe.xlen(events)
            pipe.hgetall(head)
        try:
            replies = iter(pipe.execute(raise_on_error=False))
            read = []  # (name, its floor or None when covered, length, head)
            for name in names:
                page = None if name in covered else next(replies)
                if isinstance(page, Exception):
                    raise page
                seen = None if page is None else first_page_seen(client, self._keys(name)[0], page)
                read.append((name, seen, next(replies), next(replies)))
        except CONNECTION_ERRORS:
            raise
        except redis.ResponseError:  # e.g. no permission: read at publish, which says why
            return
        with self._lock:
            for name, seen, length, head in read:
                if seen is not None:
                    self._read[name] = (seen.floor, now)
                    self._rows[name] = seen.rows
                newest = _newest(length, head)
                if newest:
                    self._seen[name] = (newest, now)

    def floor(self, client: AnyRedis, name: str) -> int:
        """The highest version ``name``'s workers have seen: asked for (``send``) or read
        (``read``) before its swap at most ``FRESH`` s ago, once; else read now."""
        early = self.take(name)
        if early is not None:
            return early
        with self._lock:
            read = self._read.pop(name, None)
            if name in self._covered:
                return 0  # publish.lua reads :floor
        if read is not None and time.monotonic() - read[1] <= FRESH:
            return read[0]
        seen = read_workers_seen(client, stream_keys(name, self._prefix).workers)
        with self._lock:
            self._rows[name] = seen.rows
        return seen.floor

    def take(self, name: str) -> int | None:
        """The floor of ``name`` asked for by ``send`` at most ``FRESH`` s ago (once: a later
        publish asks again), waiting for the reply if it is not in yet; None: not asked."""
        with self._lock:
            self._collect()
            early = self._floors.pop(name, None)
        if early is not None and time.monotonic() - early[1] <= FRESH:
            return early[0]
        return None

    def seen(self, name: str) -> str:
        """The id of ``name``'s newest entry (``0-0``: none) when ``send`` asked, while kubelet
        wrote the version now read, at most ``FRESH`` s ago (once); "" when not asked: what
        the daemon knew of the stream before it read the content (``Publisher.publish``)."""
        with self._lock:
            self._collect()
            early = self._seen.pop(name, None)
        if early is not None and time.monotonic() - early[1] <= FRESH:
            return early[0]
        return ""

    def _keys(self, name: str) -> tuple[str, str, str]:
        keys = stream_keys(name, self._prefix)
        return keys.workers, keys.events, head_key(name, self._prefix)

    def _collect(self) -> None:
        """The pending request's reply, waited for if it is not in yet (lock held)."""
        connection = self._connection
        if self._pending is not None and connection is not None:
            try:
                self._receive(connection)
            except redis.ResponseError as exc:  # refused (an ACL, a :workers not a hash)
                logger.debug("early floor read refused: %s; reading at publish", exc)
                if str(exc).startswith("NOSCRIPT"):  # SCRIPT FLUSH: ready() loads it again
                    self._loaded = None
            except (redis.RedisError, OSError) as exc:
                self._drop(exc)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.disconnect()  # type: ignore[no-untyped-call]
                self._connection = None

    def _receive(self, connection: ConnectionInterface) -> None:
        """The pending request's reply, into ``_floors`` (lock held)."""
        assert self._pending is not None
        names, asked, covered = self._pending
        self._pending = None
        reply: Any = connection.read_response()  # raises a refusal (ResponseError)
        for name, (floor, more, rows, seen) in zip(names, reply, strict=True):
            if name not in covered:  # (covered: no floor was read)
                self._rows[name] = int(rows)
                if not int(more):
                    self._floors[name] = (int(floor), asked)
            if seen:
                self._seen[name] = (_text(seen), asked)

    def _drop(self, exc: BaseException) -> None:
        """A failed send or read (lock held): the connection is closed (``ready`` makes it
        again) and the floors it would have given are read at publish."""
        logger.debug("early floor read failed: %s; reading at publish", exc)
        self._pending = None
        self._floors.clear()
        self._seen.clear()
        self._loaded = None  # a new connection may reach a server that never saw it
        if self._connection is not None:
            self._connection.disconnect()  # type: ignore[no-untyped-call]


def _newest(length: object, head: object) -> str:
    """The newest entry's id from the stream's length and its head as the loop read them:
    '0-0' for none; the head's id while it records that length; else "" (unknown: the head
    is stale, missing or refused, and the loop does not read the entry, which would copy its
    content; a head-less publisher's append trimmed back to the same length reads as the
    head's older id: a content read then may be answered behind, as if read before it)."""
    if length == 0:
        return "0-0"
    if not isinstance(length, int) or not isinstance(head, dict):
        return ""
    fields = {_text(name): _text(value) for name, value in head.items()}
    entry_id = fields.get("id", "")
    if fields.get("len") != str(length) or not re.fullmatch(r"\d+-\d+", entry_id):
        return ""
    return entry_id


def _connected(connection: ConnectionInterface) -> bool:
    return bool(connection.is_connected)
