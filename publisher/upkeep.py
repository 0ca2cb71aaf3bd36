"""The daemon's periodic checks of what it published: streams, slot owners, old workers.

Publishing a key once is not enough to keep it in Redis: a Redis that restarted empty (or
lost its AOF tail), a deleted stream, a cluster failover that lost the dead master's last
writes -- after each the current content must be published again, though no file changed.
And every worker restart leaves an entry in ``:workers`` that nobody else removes. Both are
checked here, on the publishing loop's thread, between publishes:

- every ``check_interval`` one round trip (``EXISTS`` on every events stream; in a cluster
  pipelined per node) detects a dead, frozen or restarted Redis (the error reaches the loop,
  which reconnects) and a missing stream (its key is published again);
- Redis Cluster: the client may follow a failover by itself (it reloads the slot map and
  retries), so every check also compares each key's master with the one it had: a key whose
  slot changed hands is published again (replication is asynchronous; what the old master
  had not replicated is lost, and the re-publish puts it back);
- behind the workers: every check also reads each key's ``:workers`` (``publisher._floor``)
  and its newest entry's version; a key whose workers report a version above it (the stream
  was restored from an older backup, failed over to a lagging replica, re-created, or an old
  entry was replayed at its end) or that has a worker ``holding`` is published again, above
  them (``publish.lua`` writes above a floor the stream is behind): the workers hold their
  config and reject anything at or below what they saw, so this is what gets them moving;
- every minute at most (a quarter of the limit when that is shorter), the ``:workers``
  entries silent for ``forget_workers_after`` by Redis's clock are removed (stopped,
  SIGKILLed, or of a pod long gone), so the hash does not grow with every rollout; an entry
  that does not decode is left for the operator. Several daemons sharing a Redis may all do
  it: HDEL of a gone field is a no-op.

Upkeep only says which keys to publish again; the loop marks them in its intake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
import redis
from redis.crc import key_slot

from publisher._floor import parse_version, read_workers, read_workers_seen
from subscriber.defaults import DEFAULT_FORGET_WORKERS_AFTER
from subscriber.keys import stream_keys
from subscriber.protocol import decode_worker_state

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["Upkeep"]

logger = logging.getLogger(__name__)

"""A worker not heard of for an hour is forgotten."""
_FORGET_CHECK_INTERVAL = 60.0
# the version field of a stream's newest entry ('' when empty): not its content (1 MiB)
_NEWEST_VERSION = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest == 0 then return '' end
local fields = newest[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'version' then return fields[i + 1] end
end
return ''
"""


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
        self._next_forget = 0.0
        self._owners: dict[str, str] = {}  # cluster: key -> its slot's master at the last check
        self._forget_refused = False  # warned once that Redis refused HDEL

    @property
    def next_check(self) -> float:
        """``time.monotonic()`` of the next stream check: the loop sleeps until then."""
        return self._next_check

    def connected(self, client: AnyRedis, names: list[str]) -> None:
        """Check a new connection: every key's stream, not only a PING -- in a cluster the
        node of each key's slot (a dead master's keys stay disconnected until a failover).
        Quiet: every key is published next anyway. Raises what a failed connection raises."""
        self._check_streams(client, names)
        self._next_check = time.monotonic() + self.check_interval

    def due(
        self, client: AnyRedis, names: list[str], published: Mapping[str, int] | None = None
    ) -> list[str]:
        """Run the checks whose time has come; the keys to publish again. ``published``: the
        highest version this daemon wrote per key (a stream numbered below it came back older,
        with or without workers to notice)."""
        again: list[str] = []
        if time.monotonic() >= self._next_check:
            missing, moved = self._check_streams(client, names)
            self._next_check = time.monotonic() + self.check_interval
            if missing:
                logger.warning("events stream missing for %s: publishing again", ", ".join(missing))
            if moved:
                logger.warning(
                    "a failover or resharding gave %s a new master: publishing again (writes "
                    "the old master had not replicated are lost)",
                    ", ".join(moved),
                )
            behind = self._behind_workers(
                client, [n for n in names if n not in missing], published or {}
            )
            if behind:
                logger.warning(
                    "the stream of %s is behind its workers or this daemon (Redis restored older, "
                    "failed over "
                    "to a lagging replica or re-created, or an old entry replayed): "
                    "publishing again above them",
                    ", ".join(f"{name} (v{newest} < v{floor})" for name, newest, floor in behind),
                )
            again = [*missing, *moved, *(name for name, _, _ in behind)]
        if self.forget_workers_after and time.monotonic() >= self._next_forget:
            self._forget_workers(client, names)
            # often enough that an entry outlives the limit by at most a few percent
            interval = min(_FORGET_CHECK_INTERVAL, self.forget_workers_after / 4)
            self._next_forget = time.monotonic() + interval
        return again

    def _check_streams(self, client: AnyRedis, names: list[str]) -> tuple[list[str], list[str]]:
        """One round trip (per cluster node): the keys whose stream is missing, and those
        whose slot changed hands since the previous check."""
        if not names:
            client.ping()
            return [], []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(stream_keys(name, self.prefix).events)
        missing = [name for name, present in zip(names, pipe.execute(), strict=True) if not present]
        return missing, self._moved_slots(client, names)

    def _behind_workers(
        self, client: AnyRedis, names: list[str], published: Mapping[str, int]
    ) -> list[tuple[str, int, int]]:
        """The keys whose newest entry is numbered below what a worker has seen or this daemon
        wrote, or that have a worker holding: (key, newest version, floor) each."""
        behind = []
        # EVALSHA (loaded once per Redis): the shipped publisher user may not EVAL
        newest_version = client.register_script(_NEWEST_VERSION)
        for name in names:
            keys = stream_keys(name, self.prefix)
            seen = read_workers_seen(client, keys.workers)
            floor = max(seen.floor, published.get(name, 0))
            if not floor and not seen.holding:
                continue
            newest = parse_version(newest_version(keys=[keys.events])) or 0
            if newest < floor or seen.holding:
                behind.append((name, newest, floor))
        return behind

    def _moved_slots(self, client: AnyRedis, names: list[str]) -> list[str]:
        """Cluster: the keys whose slot has another master than at the previous check (as the
        client's slot map says, which any error or redirect reloads)."""
        if isinstance(client, redis.Redis):
            return []
        moved = []
        for name in names:
            events = stream_keys(name, self.prefix).events
            owner = client.nodes_manager.get_node_from_slot(key_slot(events.encode())).name
            if self._owners.setdefault(name, owner) != owner:
                moved.append(name)
                self._owners[name] = owner
        return moved

    def _forget_workers(self, client: AnyRedis, names: list[str]) -> None:
        """HDEL the ``:workers`` entries whose last heartbeat is older than the limit."""
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        limit_ms = self.forget_workers_after * 1000
        for name in names:
            workers_key = stream_keys(name, self.prefix).workers
            old = []
            for field, value in read_workers(client, workers_key):
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
                client.hdel(workers_key, *old)
            except redis.ResponseError as exc:  # e.g. NOPERM: an ACL without HDEL
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
