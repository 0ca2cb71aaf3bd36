"""The daemon's periodic checks of what it published: streams, slot owners, old workers.

Publishing a key once is not enough to keep it in Redis: a Redis that restarted empty (or
lost its AOF tail), a deleted stream, a cluster failover that lost the dead master's last
writes -- after each the current content must be published again, though no file changed.
And every worker restart leaves an entry in ``:workers`` that nobody else removes. Both are
checked here, on the publishing loop's thread, between publishes.

What a check costs must not grow with the number of keys: a daemon of 1,000 keys that
touched every stream every second (``EXISTS``, the newest version and the ``:workers`` hash
of each) spent 10.8 % of a core idle, against 0.09 % for one key (``bench_keys``, 20 s
windows). Nor should a check do more than it must every second: reading a slice of streams
and of worker hashes every second was most of an idle daemon's CPU at any key count. So:

- every ``check_interval`` (1 s), the **check**: one round trip, a command packed once
  (``INFO server`` and ``INFO keyspace``; ``INFO keyspace`` to each master in a cluster).
  On a single Redis it is sent right after the previous check, behind a blocking read
  that makes Redis run it just before it is due, and its replies read off the socket in
  one pass (``publisher._ahead``): an idle loop wakes once a check, not twice, and runs
  a few microseconds of Python for it (the sweep's call goes out ahead the same way).
  It is the liveness check (a dead or frozen Redis raises, and the loop reconnects); a
  server whose ``run_id`` is not the previous check's (restarted, whatever it loaded, or
  another one behind the same address) raises ``ConnectionError`` too, so the loop
  reconnects and publishes every key (redis-py reconnects a dropped connection on its own:
  without this a Redis restarted from a dump holding as many keys went unnoticed until the
  sweeps); and fewer keys than at the previous check (a deleted stream, ``FLUSHALL``, an
  eviction, a worker hash emptied by the forgetting below) makes the check a **full** one:
  ``EXISTS`` on every stream (pipelined), and a missing stream's key is published again;
- every ``SWEEP_EVERY`` (4) checks, the **sweep** reads rolling slices as well. A slice of
  ``SWEEP_KEYS`` keys has its newest entry's version read (one script call for the slice on
  a single Redis; per key in a cluster): a missing stream is published again, and so is one
  numbered below what this daemon wrote (Redis restored older without a restart, a stream
  re-created, an old entry replayed at its end); a slice of ``SWEEP_WORKERS`` keys has its
  ``:workers`` read (``publisher._floor``): a key whose workers report a version above its
  newest entry, or that has a worker ``holding``, is published again, above them (a worker
  holding at the newest version itself, whose entry there is another content than the one
  it applied as that version: above the newest, ``_sweepread.behind_workers``). Both in
  the same script call, the workers' floor computed in Redis (``LUA_FLOOR``): reading 32
  idle workers' states (~300 bytes each) into Python every sweep, then the versions of the
  keys they were above in a second call, was half of the loop's CPU in an idle daemon with
  32 workers (yappi, ``profile_idle --workers 32``); the script returns a few bytes a key;
  it also says whether each key's ``:floor`` covers its ``:workers`` (``covered``, ``swept``:
  the daemon's publishes then read no ``:workers``, ``publisher._earlyfloor``);
- Redis Cluster: each key's master, from the client's slot map (no round trip), against the
  one it had, at every check: a key whose slot changed hands is published again
  (replication is asynchronous; what the old master had not replicated is lost, and the
  re-publish puts it back).

The slices are ``SWEEP_EVERY`` times those of a sweep every check, so a key is looked at as
often as before, and a one-key daemon's idle check is one round trip most seconds (it was
two every second). A new connection (``connected``) checks every key's stream at once, and
the loop then publishes every key, each above what its workers report
(``Daemon._publish_pending``): a restart, a failover or a restore is a reconnect first. The
slices only bound how soon a change *without* a reconnect or restart is found: with up to
``SWEEP_WORKERS`` keys every key is looked at every sweep (4 s); with 1,000 keys a replayed
or re-created stream is found within ``ceil(1000 / SWEEP_KEYS)`` sweeps (32 s) and a holding
worker within ``ceil(1000 / SWEEP_WORKERS)`` (128 s). Deletions, flushes and restarts are
found at the next check at any size.

Old workers: the ``:workers`` entries silent for ``forget_workers_after`` by Redis's clock
are removed (stopped, SIGKILLed, or of a pod long gone), so the hash does not grow with
every rollout; an entry that does not decode is left for the operator. A rolling slice too:
at most ``FORGET_KEYS`` keys a sweep, each key at most every minute (a quarter of the limit
when that is shorter), so an entry outlives the limit by at most that, or by ``keys /
FORGET_KEYS`` sweeps when that is longer. Several daemons sharing a Redis may all do it:
HDEL of a gone field is a no-op. A forgotten worker's ``:floor`` member is ``ZREM``ed in the same
round trip: the floor stays the highest version a current worker saw.

Upkeep only says which keys to publish again; the loop marks them in its intake.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import redis
from redis.crc import key_slot

from publisher._ahead import WAIT_KEY, Ahead
from publisher._floor import bounded, read_workers
from publisher._sweepread import NEWEST_VERSIONS, behind_workers, per_key, versions
from subscriber._wire import pack
from subscriber.defaults import DEFAULT_FORGET_WORKERS_AFTER
from subscriber.keys import StreamKeys, stream_keys
from subscriber.protocol import decode_worker_state

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["FORGET_KEYS", "SWEEP_EVERY", "SWEEP_KEYS", "SWEEP_WORKERS", "Upkeep"]

logger = logging.getLogger(__name__)

SWEEP_EVERY = 4  # checks per sweep (see the module docstring)
SWEEP_KEYS = 32 * SWEEP_EVERY  # keys whose newest version is read per sweep
SWEEP_WORKERS = 8 * SWEEP_EVERY  # keys whose :workers are read per sweep
FORGET_KEYS = 2 * SWEEP_EVERY  # keys whose old workers are looked for per sweep
# The check: the server section (its run_id: a restarted or other server) and the key count,
# packed once. Two commands, not ``INFO server keyspace`` (Redis 7 only): one round trip all
# the same.
_PROBE = pack([("INFO", "server"), ("INFO", "keyspace")])
_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)", re.MULTILINE)
_DB_KEYS = re.compile(rb"^db\d+:keys=(\d+)", re.MULTILINE)
_FORGET_CHECK_INTERVAL = 60.0


class Upkeep:
    """When the checks are due, and what they found (see the module docstring)."""

    def __init__(
        self,
        *,
        prefix: str,
        check_interval: float,
        forget_workers_after: float = DEFAULT_FORGET_WORKERS_AFTER,
    ) -> None:
        if forget_workers_after < 0:
            raise ValueError(f"forget_workers_after must be >= 0, not {forget_workers_after}")
        self.prefix = prefix
        self.check_interval = check_interval
        self.forget_workers_after = forget_workers_after  # 0: never
        self._next_check = 0.0
        self._next_sweep = 0.0
        self._run_id: bytes | None = None  # the server's at the previous check (standalone)
        self._keys_in_redis: int | None = None  # INFO keyspace at the previous check
        self._sweep = 0  # where the rolling slices are in the key list
        self._sweep_workers = 0
        self._sweep_forget = 0
        self._forgot_at: dict[str, float] = {}  # key -> monotonic time of its last forget pass
        self._owners: dict[str, str] = {}  # cluster: key -> its slot's master at the last check
        self._slots: dict[str, int] = {}  # cluster: key -> its stream's slot
        self._forget_refused = False  # warned once that Redis refused HDEL
        self._keys: dict[str, StreamKeys] = {}  # key -> its Redis keys, derived once
        self._script: Any = None  # NEWEST_VERSIONS registered with the client
        self._ahead = Ahead()  # the next check's commands, sent after this one
        self._wait_key = WAIT_KEY.format(prefix=prefix)  # where the read ahead blocks
        self._forget_next = 0.0  # monotonic: no old worker to look for before (<= one slice)
        # the slices of the next sweep, chosen when its call was sent ahead, and the versions
        # this daemon had written then (a publish since makes the call's versions stale)
        self._planned: tuple[list[str], list[str], dict[str, int] | None] | None = None
        # key -> whether :floor covers its :workers at the last sweep (``LUA_FLOOR``'s covered)
        self.covered: dict[str, bool] = {}
        self.swept: dict[str, bool] = {}  # the same, of the keys the last due() swept
        # key -> the ``above`` its next publish takes (``_sweepread.behind_workers``)
        self.renumbered: dict[str, int] = {}

    def _of(self, name: str) -> StreamKeys:
        """``name``'s Redis keys, derived once: a sweep names 160 keys, each derivation
        validating the key and the prefix again."""
        found = self._keys.get(name)
        if found is None:
            found = self._keys[name] = stream_keys(name, self.prefix)
        return found

    @property
    def next_check(self) -> float:
        """``time.monotonic()`` of the next check: the loop sleeps until then."""
        return self._next_check

    def connected(self, client: AnyRedis, names: list[str]) -> None:
        """Check a new connection: every key's stream, not only a PING -- in a cluster the
        node of each key's slot (a dead master's keys stay disconnected until a failover).
        Quiet: every key is published next anyway. Raises what a failed connection raises."""
        self._run_id = None
        self.covered.clear()
        self.renumbered.clear()  # every key is published next, above what its workers saw
        self._ahead.drop()
        self._keys_in_redis = self._count_keys(client)
        self._missing(client, names)
        self._moved_slots(client, names)
        self._next_check = time.monotonic() + self.check_interval
        self._next_sweep = self._next_check
        self._send_ahead(client, names, None)

    def due(
        self, client: AnyRedis, names: list[str], published: Mapping[str, int] | None = None
    ) -> list[str]:
        """Run the checks whose time has come; the keys to publish again. ``published``: the
        highest version this daemon wrote per key (a stream numbered below it came back older,
        with or without workers to notice). Raises ``redis.ConnectionError`` when the server
        is not the one of the previous check (restarted, or another one): the loop then
        reconnects and publishes every key, as after any lost connection."""
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + self.check_interval
        ahead = self._ahead.take() if isinstance(client, redis.Redis) else None
        count = self._count_keys(client, ahead)
        fewer = self._keys_in_redis is None or count < self._keys_in_redis
        self._keys_in_redis = count
        missing = self._missing(client, names) if fewer and names else []
        sweep = now >= self._next_sweep
        if sweep:  # half a check early: a check that wakes late does not skip a sweep
            self._next_sweep = now + (SWEEP_EVERY - 0.5) * self.check_interval
        newest, floors = self._sweep_reads(client, names, published, ahead) if sweep else ({}, {})
        self.swept = {name: len(read) > 4 and bool(int(read[4])) for name, read in floors.items()}
        self.covered.update(self.swept)
        missing += [name for name, version in newest.items() if version is None]
        if missing:
            missing = sorted(set(missing))
            logger.warning("events stream missing for %s: publishing again", ", ".join(missing))
        moved = self._moved_slots(client, names)
        if moved:
            logger.warning(
                "a failover or resharding gave %s a new master: publishing again (writes "
                "the old master had not replicated are lost)",
                ", ".join(moved),
            )
        self._send_ahead(client, names, published)
        if not sweep:
            return [*missing, *moved]
        published = published or {}
        behind = [
            (name, version, published[name])
            for name, version in newest.items()
            if version is not None and version < published.get(name, 0)
        ]
        skip = {*missing, *(name for name, _, _ in behind)}
        floors = {name: floor for name, floor in floors.items() if name not in skip}
        behind += behind_workers(client, floors, self._of, self.renumbered)
        if behind:
            logger.warning(
                "the stream of %s is behind its workers or this daemon (Redis restored older, "
                "failed over to a lagging replica or re-created, or an old entry replayed), or "
                "a worker holds: publishing again above them",
                ", ".join(f"{name} (v{newest} < v{floor})" if newest < floor else
                          f"{name} (v{newest}: a worker holds)" for name, newest, floor in behind),
            )  # fmt: skip
        if self.forget_workers_after:
            self._forget_workers(client, names)
        return [*missing, *moved, *(name for name, _, _ in behind)]

    def _slice(self, names: Sequence[str], cursor: str, size: int) -> list[str]:
        """The next ``size`` keys of the rolling slice kept in attribute ``cursor`` (all of
        them when there are no more)."""
        if len(names) <= size:
            return list(names)
        start = getattr(self, cursor) % len(names)
        setattr(self, cursor, start + size)
        return [names[(start + i) % len(names)] for i in range(size)]

    def _count_keys(self, client: AnyRedis, ahead: list[Any] | None = None) -> int:
        """The keys in Redis (every database; in a cluster, on every master): one round trip
        per master, which is also the liveness check. A single Redis is asked with a command
        packed once, on the client's connection (or it was sent ahead: ``ahead``, its
        replies), and its server's ``run_id`` compared with the previous check's: this is an
        idle daemon's only work most seconds."""
        if not isinstance(client, redis.Redis):
            primaries = client.nodes_manager.get_nodes_by_server_type("primary")
            return _keys_in(client.info("keyspace", target_nodes=primaries))
        if ahead is not None:
            server, keyspace = ahead[0], ahead[1]
        else:
            pool = client.connection_pool
            connection: Any = pool.get_connection()
            try:
                connection.send_packed_command(_PROBE)
                server, keyspace = connection.read_response(), connection.read_response()
            except BaseException:
                connection.disconnect()
                raise
            finally:
                pool.release(connection)
        if isinstance(server, Exception):
            raise server
        if isinstance(keyspace, Exception):
            raise keyspace
        found = _RUN_ID.search(_raw(server))
        run_id = found.group(1) if found else b""
        if self._run_id is not None and run_id != self._run_id:
            was, self._run_id = self._run_id, None
            raise redis.ConnectionError(
                f"the server restarted or is another one (run_id {was[:8].decode()} -> "
                f"{run_id[:8].decode()})"
            )
        self._run_id = run_id
        return sum(int(keys) for keys in _DB_KEYS.findall(_raw(keyspace)))

    def _send_ahead(
        self, client: AnyRedis, names: list[str], published: Mapping[str, int] | None
    ) -> None:
        """Send the next check's commands now, to run just before it is due
        (``publisher._ahead``; a single Redis): its ``INFO`` and, when it is a sweep, the
        sweep's script call over the slices chosen now."""
        if not (
            isinstance(client, redis.Redis) and names and self._ahead.can_send(self._next_check)
        ):
            return
        extra: list[tuple[Any, ...]] = []
        if self._next_check >= self._next_sweep and published is not None:
            if self._planned is None:
                self._planned = (
                    self._slice(names, "_sweep", SWEEP_KEYS),
                    self._slice(names, "_sweep_workers", SWEEP_WORKERS),
                    None,
                )
            streams, workers, _ = self._planned
            self._planned = (streams, workers, dict(published))
            keys, args = self._script_keys(streams, workers)
            extra.append(("EVALSHA", self._script_of(client).sha, len(keys), *keys, *args))
        self._ahead.send(client, self._wait_key, self._next_check, extra)

    def _sweep_reads(
        self,
        client: AnyRedis,
        names: list[str],
        published: Mapping[str, int] | None,
        ahead: list[Any] | None,
    ) -> tuple[dict[str, int | None], dict[str, list[Any]]]:
        """The sweep's reads (``_read_slices``): of the slices planned when its call was sent
        ahead, or the next ones; its reply when the call went out ahead, ran, and no publish
        since could have made its versions stale."""
        if self._planned is None:
            streams = self._slice(names, "_sweep", SWEEP_KEYS)
            return self._read_slices(
                client, streams, self._slice(names, "_sweep_workers", SWEEP_WORKERS)
            )
        streams, workers, then = self._planned
        self._planned = None
        reply = ahead[2] if ahead is not None and len(ahead) > 2 else None
        if reply is None or isinstance(reply, Exception) or then != dict(published or {}):
            return self._read_slices(client, streams, workers)  # e.g. NOSCRIPT: loaded there
        return self._parse_slices(streams, workers, list(reply))

    def _missing(self, client: AnyRedis, names: list[str]) -> list[str]:
        """The keys whose events stream does not exist: ``EXISTS`` on each, pipelined (one
        round trip; per node in a cluster)."""
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self._of(name).events)
        return [name for name, present in zip(names, pipe.execute(), strict=True) if not present]

    def _read_slices(
        self, client: AnyRedis, streams: list[str], workers: list[str]
    ) -> tuple[dict[str, int | None], dict[str, list[Any]]]:
        """The sweep's reads (``NEWEST_VERSIONS``): the newest version of each key of
        ``streams`` (0: none or junk; ``None`` when its stream is missing), and the floor of
        each key of ``workers`` (``[floor, holding, more, newest, covered]``, as the script returns
        it). EVALSHA (the shipped publisher user may not EVAL): one call for all on a single
        Redis, so a sweep is one round trip with a reply of a few bytes a key; in a cluster
        (keys of other slots cannot share a call) one per key, pipelined."""
        if not streams and not workers:
            return {}, {}
        script = self._script_of(client)
        if isinstance(client, redis.Redis):
            keys, args = self._script_keys(streams, workers)
            replies = list(script(keys=keys, args=args))
        else:
            events = [self._of(name).events for name in streams]
            triples = [
                [self._of(name).events, self._of(name).workers, self._of(name).floor]
                for name in workers
            ]
            calls = [([stream], 1) for stream in events] + [(keys, 0) for keys in triples]
            replies = per_key(client, script.sha, calls)
        return self._parse_slices(streams, workers, replies)

    def _script_of(self, client: AnyRedis) -> Any:
        """``NEWEST_VERSIONS`` registered with ``client`` (its sha computed here)."""
        script = self._script
        if script is None or script.registered_client is not client:
            script = self._script = client.register_script(NEWEST_VERSIONS)
        return script

    def _script_keys(self, streams: list[str], workers: list[str]) -> tuple[list[str], list[int]]:
        """``NEWEST_VERSIONS``' keys and arguments for one call (a single Redis)."""
        keys = [self._of(name).events for name in streams]
        for name in workers:
            keys += (self._of(name).events, self._of(name).workers, self._of(name).floor)
        return keys, [len(streams)]

    @staticmethod
    def _parse_slices(
        streams: list[str], workers: list[str], replies: list[Any]
    ) -> tuple[dict[str, int | None], dict[str, list[Any]]]:
        """``NEWEST_VERSIONS``' replies: the versions of ``streams``, the floors of
        ``workers``."""
        floors = dict(zip(workers, replies[len(streams) :], strict=True))
        return versions(streams, replies[: len(streams)]), floors

    def _moved_slots(self, client: AnyRedis, names: list[str]) -> list[str]:
        """Cluster: the keys whose slot has another master than at the previous check (as the
        client's slot map says, which any error or redirect reloads)."""
        if isinstance(client, redis.Redis):
            return []
        moved = []
        nodes = client.nodes_manager
        for name in names:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = key_slot(self._of(name).events.encode())
            owner = nodes.get_node_from_slot(slot).name
            if self._owners.setdefault(name, owner) != owner:
                moved.append(name)
                self._owners[name] = owner
        return moved

    def _forget_workers(self, client: AnyRedis, names: list[str]) -> None:
        """HDEL the ``:workers`` entries whose last heartbeat is older than the limit, for
        the next keys of the rolling slice that were not looked at for a minute."""
        interval = min(_FORGET_CHECK_INTERVAL, self.forget_workers_after / 4)
        now = time.monotonic()
        if len(names) <= FORGET_KEYS:  # one slice, all looked at together: once an interval
            if now < self._forget_next:
                return
            self._forget_next = now + interval
        due = [
            name
            for name in self._slice(names, "_sweep_forget", FORGET_KEYS)
            if now - self._forgot_at.get(name, -interval) >= interval
        ]
        if not due:
            return
        # one round trip: Redis's clock and each hash's first page (the rest, if any, after);
        # a cluster pipeline refuses TIME (it has no key to route by): asked on its own there
        standalone = isinstance(client, redis.Redis)
        pipe = client.pipeline(transaction=False)
        if standalone:
            pipe.time()
        for name in due:
            pipe.hscan(self._of(name).workers, 0, count=500)
        pages = pipe.execute()
        seconds, micros = pages.pop(0) if standalone else client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        limit_ms = self.forget_workers_after * 1000
        for name, (cursor, page) in zip(due, pages, strict=True):
            self._forgot_at[name] = now
            workers_key = self._of(name).workers
            fields = read_workers(client, workers_key) if int(cursor) else bounded(page.items())
            old = []
            for field, value in fields:
                if value is None:
                    continue  # oversized: not a worker's state
                try:
                    heartbeat = decode_worker_state(value).heartbeat
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if heartbeat and now_ms - heartbeat > limit_ms:
                    old.append(field)
            if not old:
                continue
            try:
                # its :floor score goes with its row, in the same round trip: the floor is
                # what a current worker saw (a ZREM refused, by an ACL from before :floor,
                # leaves a score that can only number a version higher, never lower)
                pipe = client.pipeline(transaction=False)
                pipe.zrem(self._of(name).floor, *old)
                pipe.hdel(workers_key, *old)
                pipe.execute()
            except redis.ResponseError as exc:  # e.g. NOPERM: an ACL without HDEL or ZREM
                if not self._forget_refused:
                    logger.warning("cannot forget old workers of %s: %s", name, exc)
                    self._forget_refused = True
                continue
            logger.info(
                "forgot %d worker(s) of %s not heard of for over %g s",
                len(old),
                name,
                self.forget_workers_after,
            )


def _raw(reply: Any) -> bytes:
    """An ``INFO`` reply as read from the connection: bytes, or text (decoded responses)."""
    return reply.encode() if isinstance(reply, str) else bytes(reply)


def _keys_in(info: Any) -> int:
    """The key count of an ``INFO keyspace`` reply: ``{"db0": {"keys": 3, ...}}``, or one
    such reply per node (``{"host:port": {...}}``) from a cluster."""
    total = 0
    if isinstance(info, dict):
        for name, value in info.items():
            if isinstance(value, dict):
                if "keys" in value and str(name).startswith("db"):
                    total += int(value["keys"])
                else:
                    total += _keys_in(value)
    return total
