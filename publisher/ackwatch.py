"""Follows what workers report back, for the daemon's metrics.

One thread reads every key's ``:acks`` stream from "now" on (rejections by key; publish -> ack
propagation time) and, every few seconds, classifies the workers of keys (converged / behind /
rejected) with the same rule as ``hotreload status``. It has its own connection and backoff,
so a slow or absent Redis never delays publishing.

A status pass costs a few round trips per key: every key every 10 s was 4 % of a core at
1,000 keys and 31 % at 10,000 (``bench_keys``, metrics on). So a pass classifies the keys
that had acks since the previous one (a publish, a rejection, a worker starting: what
changes the counts), the keys never classified yet, and a rolling slice of ``STATUS_SLICE``
others (what changes without an ack: a worker going stale or gone). And a pass runs only
when one is worth it: every ``status_interval`` (10 s) a tick runs a pass when a key had
acks, was never classified, or has another number of ``:workers`` fields than its last
classification read (a worker started or was forgotten: one pipelined ``HLEN`` of the next
slice's keys; compared with a later ``HLEN``, one that already counted a worker written
right after the pass read ``:workers``, that worker waited for an idle pass); else only
every ``IDLE_PASSES`` ticks (30 s), reading as many slices (every 10 s was ~half of what
metrics added to an idle publisher with 32 workers, ``bench_idle``). With up to
``STATUS_SLICE`` keys every key is classified every pass (idle: every 30 s, so the
``hotreload_workers`` gauge of a key whose worker died silently follows within about 30 s
more than its staleness); with 1,000 keys a key without acks is looked at every ``1000 /
STATUS_SLICE`` ticks (310 s), idle or not, and the gauge follows within about that. A key
without acks that was classified before is classified again only when its newest entry's
id (target, rollout marks) or its worker rows as ``status`` reads them (liveness included)
changed (``_looked_at``): a classification reads the whole history (33 entries of 1 KiB in
``bench_idle``, each hash checked), the marks and the acks, ~5-7 ms of CPU every 30 s for
unchanged counts (a third of an idle daemon's CPU with 32 workers, yappi). A key with acks
has them read before its classification too: the first idle pass after acks classified
it again otherwise (15-30 ms of CPU on a cold process, in a 60 s idle window). A key of
the slice that had no worker when last classified, and has none in ``:workers`` now, keeps
its counts at 0 without one: one pipelined ``HLEN`` instead (a worker that starts writes
there, and acks).

A standalone Redis is followed with one blocking ``XREAD`` over every key's ``:acks``, which
``stop()`` cuts short; it waits until the next status tick (10 s), so an idle follower wakes
once per tick (and classifies every third time), and sends the same command every time,
packed once (``PackedXRead``), the tick's ``HLEN``s behind it: Redis runs them as the block
runs out, their replies come with its (a round trip of their own was redis-py's pipeline
again, ~1 ms of CPU a tick on a cold process); the key names are walked only when keys
were added. Each loop
re-packing 1,000 keys' streams and re-deriving their names cost ~3 ms. In a Redis Cluster
such an ``XREAD`` is refused (CROSSSLOT: each key has its own slot), so every
``poll_interval`` one pipeline reads what is new, one non-blocking ``XREAD`` per slot (the
client sends each node its share in one round trip); ``stop()`` ends the wait between two
polls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import RedisClusterException

from publisher import inspect
from publisher._admin import connect_any, is_cluster
from publisher._floor import MAX_WORKERS
from publisher._xreads import PackedXRead, _poll
from publisher.inspect._liveness import server_now_ms
from publisher.inspect.convergence import worker_rows
from publisher.inspect.events import ACK_REPLY_BUDGET, MAX_ACKS, decoded_ack, newest_acks
from publisher.metrics import DaemonMetrics
from subscriber._pool import (
    InterruptiblePool,
    join_interrupting,
)  # a pool whose blocked read stop() can cut
from subscriber._redis import Backoff, client_name, connect
from subscriber._replybudget import reply_budget
from subscriber._replycap import Oversized
from subscriber.defaults import SOCKET_TIMEOUT_MARGIN
from subscriber.errors import HotReloadError
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, process_identity

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["AckFollower"]

logger = logging.getLogger(__name__)

_ERRORS = (redis.RedisError, RedisClusterException, OSError)
_CLUSTER_SOCKET_TIMEOUT = 3.0  # no blocking reads in a cluster: a frozen node fails sooner
_SEEN_LIMIT = 10_000
STATUS_SLICE = 32  # keys without acks classified per status pass (see the module docstring)
IDLE_PASSES = 3  # status ticks per pass while nothing changes (see the module docstring)
_NEWEST_ID = """  -- the newest entry's id ('' when none), not its content
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest == 0 then return '' end
return newest[1][1]
"""


class AckFollower:
    def __init__(
        self,
        redis_url: str,
        keys: Callable[[], list[str]],
        metrics: DaemonMetrics,
        *,
        prefix: str,
        block_ms: int = 10_000,
        status_interval: float = 10.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.metrics = metrics
        self.prefix = prefix
        self.block_ms = block_ms
        self.status_interval = status_interval
        self.poll_interval = poll_interval  # in a Redis Cluster (see the module docstring)
        # A worker may write one ack twice (its read was cut short after the ack went out,
        # so it cannot know it did): count each (key, worker, entry, status) once. The key
        # too: entry ids are per stream, two keys published in the same millisecond share one.
        self._seen: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._ack_cache = AckCache()
        self._active: set[str] = set()  # keys with acks since the last status pass
        self._classified: set[str] = set()
        self._no_workers: set[str] = set()  # classified last with no worker at all
        self._slice_at = 0
        self._ticks = 0  # status ticks since the last pass
        # key -> :workers fields its last classification read (or, since, a tick's HLEN)
        self._sizes: dict[str, int] = {}
        # key -> what its last classification depended on, besides acks (``_looked_at``)
        self._inputs: dict[str, tuple[object, ...]] = {}
        self._newest_id: Any = None  # _NEWEST_ID registered with the client
        # the next tick's HLENs, asked behind the XREAD whose block ends at the tick
        self._ahead: tuple[list[str], list[Any]] | None = None
        self._hlen_keys: list[str] = []
        self._hlen_commands: tuple[tuple[str, str], ...] = ()
        self._pool: InterruptiblePool | None = None  # the thread's, for stop() to interrupt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotreload-acks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Prompt: a blocked read is cut short (its socket shut down), not waited out."""
        self._stop.set()
        join_interrupting(self._thread, lambda: self._pool, self.block_ms / 1000 + 5)

    def _connect(self) -> AnyRedis:
        """A cluster client (``connect_any``) or, standalone, one whose blocked read
        ``stop()`` can interrupt. Asking whether the URL names a cluster node is I/O."""
        name = client_name("hotreload-acks", process_identity())
        if self.redis_url.startswith("redis+sentinel://"):
            # Sentinel's pool makes its own connections (none to interrupt): short blocks
            # keep stop() prompt
            self.block_ms = min(self.block_ms, 1000)
            return connect_any(
                self.redis_url,
                socket_timeout=self.block_ms / 1000 + SOCKET_TIMEOUT_MARGIN,
                client_name=name,
            )
        if is_cluster(self.redis_url):
            return connect_any(
                self.redis_url, socket_timeout=_CLUSTER_SOCKET_TIMEOUT, client_name=name
            )
        client = connect(
            self.redis_url,
            socket_timeout=self.block_ms / 1000 + SOCKET_TIMEOUT_MARGIN,
            client_name=name,
            pool_class=InterruptiblePool,
        )
        self._pool = cast(InterruptiblePool, client.connection_pool)
        return client

    def _run(self) -> None:
        backoff = Backoff(base=0.5, cap=5.0)
        client: AnyRedis | None = None
        cursors: dict[str, bytes | str] = {}
        followed = 0  # how many of self.keys() have a cursor (keys are only ever added)
        xread = PackedXRead()
        next_status = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self._connect()
                    keys = self.keys()
                    if len(keys) != followed:  # new keys: walking them all costs ~1.5 ms
                        for key in keys:
                            acks_key = stream_keys(key, self.prefix).acks
                            if acks_key not in cursors:
                                cursors[acks_key] = _tail_id(client, acks_key)
                        followed = len(keys)
                    if time.monotonic() >= next_status:
                        self._tick(client)
                        next_status = time.monotonic() + self.status_interval
                    if not cursors:
                        self._stop.wait(self.block_ms / 1000)
                        continue
                    with reply_budget(ACK_REPLY_BUDGET):  # acks past it read as junk
                        if isinstance(client, redis.Redis):  # the tick's HLENs behind it
                            ask, block = self._slice(keys), self._block(next_status)
                            # only a block that reaches the tick (Sentinel's are 1 s at most)
                            at_tick = next_status - time.monotonic() <= block / 1000
                            behind = self._hlens(ask) if at_tick else ()
                            reply, sizes = xread(client, cursors, MAX_ACKS, block, behind)
                            if at_tick and not reply and time.monotonic() >= next_status:
                                self._ahead = (ask, sizes)  # run as the block ran out: due
                        else:
                            reply = _poll(client, cursors)
                    if not reply and not isinstance(client, redis.Redis):
                        self._stop.wait(self.poll_interval)
                    for stream, entries in reply:
                        if isinstance(stream, Oversized) or not entries:
                            continue  # its name or entries were past the budget: read again
                        cursors[stream.decode()] = entries[-1][0]
                        self._count(stream.decode(), entries)
                        if len(entries) >= MAX_ACKS:  # a flood: what is between is not counted
                            cursors[stream.decode()] = _tail_id(client, stream.decode())
                    backoff.reset()
                except Exception as exc:  # metrics must never end the daemon
                    if not isinstance(exc, _ERRORS):
                        logger.exception("following acks failed")
                    logger.debug("following acks failed: %s", exc)
                    _disconnect(client)
                    # after a reset the old ids mean nothing: follow from now on (the tails
                    # are looked up again once Redis answers)
                    cursors, followed = {}, 0
                    self._stop.wait(backoff.next_delay())
        finally:
            if client is not None:
                client.close()

    def _block(self, next_status: float) -> int:
        """How long the next ``XREAD`` may wait (ms): until the next status pass, rounded up
        to a whole second so that an idle follower sends the same command every time (its
        packing is kept, ``PackedXRead``), at most ``block_ms``. Idle, the read and the pass
        share one wake-up every ``status_interval``."""
        remaining = math.ceil(max(0.0, next_status - time.monotonic()))
        return max(1, min(self.block_ms, max(1, remaining) * 1000))

    def _count(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        key = stream.split("{", 1)[1].rsplit("}", 1)[0]
        for _entry_id, fields in entries:
            ack = decoded_ack(fields)
            if ack is None:
                continue
            identity = (key, ack.worker, ack.entry_id, ack.status)
            if identity in self._seen:
                continue
            self._active.add(key)
            self._seen[identity] = None
            if len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
            if ack.status == "rejected":
                self.metrics.rejections.labels(key).inc()
            elif not ack.unchanged and ack.published_at and ack.at >= ack.published_at:
                self.metrics.propagation.labels(key).observe((ack.at - ack.published_at) / 1000)

    def _tick(self, client: AnyRedis) -> None:
        """Every ``status_interval``: a status pass when a key had acks, was never classified
        or has another number of workers in ``:workers`` than its last classification read
        (a worker started or was forgotten), else one every ``IDLE_PASSES`` ticks; a pass
        reads one rolling slice per tick since the previous pass."""
        self._ticks += 1
        keys = self.keys()
        ahead, self._ahead = self._ahead, None
        if not (
            self._active
            or self._ticks >= IDLE_PASSES
            or any(key not in self._classified for key in keys)
            or self._workers_changed(client, keys, ahead)
        ):
            return
        self._update_workers(client, self._ticks)
        self._ticks = 0

    def _workers_changed(
        self, client: AnyRedis, keys: list[str], ahead: tuple[list[str], list[Any]] | None
    ) -> bool:
        """Whether a key of the next rolling slice (every key, up to ``STATUS_SLICE``) has
        another number of fields in ``:workers`` than when last looked at (one ``HLEN``
        each): than its last classification read, or a tick since (when a tick sees another
        number, the pass it runs classifies the key and records what it read). A
        classification reads ``MAX_WORKERS`` fields at most, hence the cap. ``ahead``: the
        ``HLEN``s Redis ran behind the ``XREAD`` as its block ran out at this tick (its
        reply and theirs one wake-up, ~0.3 ms of CPU, not two); else they are asked now."""
        keys = self._slice(keys)
        if ahead is not None and ahead[0] == keys and all(isinstance(n, int) for n in ahead[1]):
            read = ahead[1]
        else:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hlen(stream_keys(key, self.prefix).workers)
            read = pipe.execute()
        sizes = {key: min(size, MAX_WORKERS) for key, size in zip(keys, read, strict=True)}
        changed = any(self._sizes.get(key, size) != size for key, size in sizes.items())
        self._sizes.update(sizes)
        return changed

    def _slice(self, keys: list[str]) -> list[str]:
        """The keys a tick's ``HLEN`` asks: every key up to ``STATUS_SLICE``, else the next
        rolling slice."""
        if len(keys) <= STATUS_SLICE:
            return keys
        start = self._slice_at % len(keys)
        return [keys[(start + i) % len(keys)] for i in range(STATUS_SLICE)]

    def _hlens(self, keys: list[str]) -> tuple[tuple[str, str], ...]:
        """The ``HLEN`` of each key's ``:workers``, made again only when the keys change."""
        if keys != self._hlen_keys:
            self._hlen_keys = keys
            self._hlen_commands = tuple(
                ("HLEN", stream_keys(key, self.prefix).workers) for key in keys
            )
        return self._hlen_commands

    def _status_keys(self, slices: int = 1) -> tuple[list[str], set[str]]:
        """The keys a status pass classifies (see the module docstring), and those of them
        that had acks; ``slices``: how many rolling slices (an idle pass, ``IDLE_PASSES``)."""
        keys = self.keys()
        active, self._active = self._active, set()
        size = STATUS_SLICE * slices
        if len(keys) <= size:
            return list(keys), active  # a copy: the pass removes keys from it
        start = self._slice_at % len(keys)
        self._slice_at = start + size
        rolling = {keys[(start + i) % len(keys)] for i in range(size)}
        chosen = rolling | active | {key for key in keys if key not in self._classified}
        return [key for key in keys if key in chosen], active

    def _update_workers(self, client: AnyRedis, slices: int = 1) -> None:
        keys, active = self._status_keys(slices)
        for key in self._without_workers(client, [k for k in keys if k not in active]):
            keys.remove(key)
            self._sizes[key] = 0  # what this pass saw: the HLEN it read
        now_ms = 0
        for key in keys:  # an active key's inputs too: else its next idle pass classifies
            now_ms = now_ms or server_now_ms(client)  # it again (~15-30 ms, 32 workers)
            inputs = self._looked_at(client, key, now_ms)
            if key not in active and inputs is not None and inputs == self._inputs.get(key):
                continue  # no ack, the same newest entry and worker rows: the same counts
            self._inputs.pop(key, None)
            try:
                report = inspect.status(
                    client, key, prefix=self.prefix, read_acks=self._ack_cache.read
                )
            except HotReloadError:
                continue  # not published yet (the first publish is on its way)
            if inputs is not None:  # read before the classification: a change since shows
                self._inputs[key] = inputs
            self._classified.add(key)
            self._no_workers.add(key)
            # the fields this classification read (one row each), for the next ticks' HLEN:
            # never a number read after it, which could count workers it did not see
            self._sizes[key] = len(report.workers)
            for summary in report.summaries:
                counts = {
                    "converged": len(summary.current),
                    "behind": len(summary.behind),
                    "rejected": len(summary.rejected),
                }
                if any(counts.values()):
                    self._no_workers.discard(key)
                for state, count in counts.items():
                    self.metrics.workers.labels(key, state).set(count)

    def _looked_at(self, client: AnyRedis, key: str, now_ms: int) -> tuple[object, ...] | None:
        """What classifying ``key`` depends on but its acks: its newest entry's id and worker
        rows, without heartbeat ages (``None``: unreadable, the classification says why)."""
        keys = stream_keys(key, self.prefix)
        script = self._newest_id
        if script is None or script.registered_client is not client:
            script = self._newest_id = client.register_script(_NEWEST_ID)
        try:
            newest = script(keys=[keys.events])
            rows = worker_rows(client, key, keys, now_ms)
        except redis.ResponseError:
            return None  # e.g. WRONGTYPE: the classification reports it
        return newest, *(dataclasses.replace(row, heartbeat_age_s=None) for row in rows)

    def _without_workers(self, client: AnyRedis, keys: list[str]) -> list[str]:
        """Of ``keys`` (no acks since the last pass), those a pass would find as it left
        them: no worker then and none in ``:workers`` now (one ``HLEN`` each, pipelined),
        so every count stays 0. A key of 1,000 without workers cost a full classification
        (~5 round trips) every 310 s for nothing; one whose worker comes sends an ack."""
        asked = [key for key in keys if key in self._no_workers]
        if not asked:
            return []
        pipe = client.pipeline(transaction=False)
        for key in asked:
            pipe.hlen(stream_keys(key, self.prefix).workers)
        return [key for key, size in zip(asked, pipe.execute(), strict=True) if not size]


def _disconnect(client: AnyRedis | None) -> None:
    if isinstance(client, redis.Redis):
        client.connection_pool.disconnect()
    elif client is not None:
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]


def _tail_id(client: AnyRedis, stream: str) -> bytes:
    """The id of ``stream``'s newest entry (``0-0`` when it is empty or missing).

    Followed from a concrete id, never from ``$``: ``$`` means "after whatever is newest when
    this XREAD arrives", so acks written between two reads would be lost.
    """
    newest = cast(_Entries, client.xrevrange(stream, count=1))
    return newest[0][0] if newest else b"0-0"


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class AckCache:
    """The newest decodable acks of each ``:acks`` stream (``MAX_ACKS`` at most), kept between
    the daemon's status passes.

    A stream holds ~1000 acks; reading and decoding them all every few seconds was nearly all
    of an idle daemon's CPU (~1 % of a core, tests/benchmarks/bench_idle.py). Each read here
    fetches only the entries added since the last one (newest first, ``MAX_ACKS`` at most:
    a writer flooding the stream costs one bounded read), with the stream's length and first
    id in the same transaction: entries trimmed from the head are dropped, and anything else
    unexpected (a deleted or re-created stream, entries removed, more new entries than the
    bound) reads the newest ``MAX_ACKS`` afresh.
    """

    def __init__(self) -> None:
        # stream -> [(entry id, ack or None when not decodable)], oldest first
        self._streams: dict[str, list[tuple[bytes, Ack | None]]] = {}

    def read(self, client: AnyRedis, acks_key: str) -> list[Ack]:
        entries = self._streams.get(acks_key)
        if entries:
            pipe = client.pipeline(transaction=True)
            pipe.xlen(acks_key)
            pipe.xrange(acks_key, min="-", max="+", count=1)
            pipe.xrevrange(acks_key, max="+", min=f"({entries[-1][0].decode()}", count=MAX_ACKS)
            with reply_budget(ACK_REPLY_BUDGET):  # acks past it read as junk
                length, first, added = pipe.execute()
            if first:
                oldest = _id_key(first[0][0])
                entries = [e for e in entries if _id_key(e[0]) >= oldest]
            entries += [(raw_id, decoded_ack(fields)) for raw_id, fields in reversed(added)]
            entries = entries[-MAX_ACKS:]
            whole = length <= MAX_ACKS
            if not (
                first
                and len(added) < MAX_ACKS
                and len(entries) == min(length, MAX_ACKS)
                and (not whole or entries[0][0] == first[0][0])
            ):
                entries = None
        if not entries:
            newest = newest_acks(client, acks_key)
            entries = [(raw_id, decoded_ack(fields)) for raw_id, fields in reversed(newest)]
        self._streams[acks_key] = entries
        return [ack for _, ack in entries if ack is not None]


_Entries = list[tuple[bytes, dict[bytes, bytes]]]
