"""Everything the two subscriber transports share around the core, none of it I/O.

``SubscriberCore`` (``_core``) decides about entries. :class:`SubscriberBase` holds the rest
of what ``Subscriber`` (``client.py``: a thread on redis-py) and ``AsyncSubscriber``
(``aio.py``: a task on ``redis.asyncio``) do identically: the constructor and its checks, the
introspection properties, the steps of ``start()`` (replay, wait for a first event, give up
to the fallback file) and of the follow loop (plan a cycle, decide its reply, log a lost or
recovered connection), and the reports (acks and worker state) waiting to be written.

Each transport is then only its I/O shell: connect, send a batch, wait, be interrupted.
Commands are *queued* here on a :class:`~subscriber._wire.Batch` (no I/O) and sent by the
transport (or the process's shared follower, ``_hub``): both send the same round trips.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import redis

from subscriber import _reasons, _redis, _target
from subscriber._cluster import Topology, TopologyChanged
from subscriber._core import Callback, SubscriberCore, callback_name
from subscriber._floorwrite import FloorWrite
from subscriber._options import read_fallback, require, signing_keys
from subscriber._reports import Reports
from subscriber._state import LiveStatus
from subscriber._stream import HistoryPages, stream_entries
from subscriber._walk import Walk
from subscriber._wire import CyclePlan
from subscriber.defaults import (
    BACKOFF_CAP,
    BLOCK_MS,
    CONNECT_TIMEOUT,
    DEFAULT_PREFIX,
    FAILOVER_BACKOFF_CAP,
    HEARTBEAT_INTERVAL,
    REPLAY_LIMIT,
    SLOW_CALLBACK,
    SOCKET_TIMEOUT_MARGIN,
)
from subscriber.errors import (
    InitialLoadError,
    NoAcceptableConfig,
    RedisUnavailable,
    SigningKeyMismatch,
)
from subscriber.keys import stream_keys
from subscriber.metrics import metrics_for
from subscriber.protocol import encode_worker_state, now_ms, process_identity

if TYPE_CHECKING:
    from subscriber._wire import Batch

__all__ = ["DISCONNECTED", "Phase", "SubscriberBase"]

# start() stops this far before its deadline, so a read never races the socket timeout.
_START_MARGIN = 0.25
# start()'s first wait for a first entry ends after this (s), and the row is rewritten: one
# written in Redis's first second is older than its start to the daemon (publisher._restored).
FIRST_WAIT_REWRITE = 1.0
# A heartbeat or reset check this close (seconds) is done now rather than after one more read.
_DUE_EARLY = 0.005
# Redis-side failures of a whole connection; anything else from redis-py is a refused
# command. The same classes for redis.asyncio (whose asyncio.TimeoutError is an OSError).
DISCONNECTED = (redis.ConnectionError, redis.TimeoutError, OSError)

Phase = Literal["new", "starting", "running", "stopped"]


class SubscriberBase:
    """Settings, state and the I/O-free steps of a subscriber; subclassed by each transport.

    The constructor is the public one of ``Subscriber`` and ``AsyncSubscriber`` (documented
    on ``Subscriber``). It does no I/O and starts no thread or task.

    ``snapshot=True`` subscribes to a snapshot key (``hotreload watch --snapshot NAME``): the
    callback receives the whole ConfigMap as ``dict[str, str]`` (``dict[str, bytes]`` with
    ``decode=False``), one dict per kubelet update, never a mix of two updates; a value that
    is not UTF-8 is a rejection naming its key. ``content`` is then the encoded snapshot
    (``protocol.decode_snapshot`` reads it), and ``fallback_path`` may be the mount directory.
    """

    # logging.getLogger() name when no logger= is given: the transport's module
    _default_logger: ClassVar[str] = __name__

    def __init__(
        self,
        key: str,
        callback: Callback,
        *,
        redis_url: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        worker_id: str | None = None,
        logger: logging.Logger | None = None,
        fallback_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        decode: bool = True,
        block_ms: int = BLOCK_MS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        replay_limit: int = REPLAY_LIMIT,
        batch_size: int = 8,
        resync_interval: float = 60.0,
        metrics: bool | None = None,
        signing_key: bytes | str | Sequence[bytes | str] | None = None,
        snapshot: bool = False,
        slow_callback: float = SLOW_CALLBACK,
        shared: bool = True,
    ) -> None:
        self._keys = stream_keys(key, prefix)  # validates key and prefix
        self._target = _target.resolve(redis_url)
        self._topology = Topology(self._target, self._keys.events)
        require(start_timeout >= 0, "start_timeout must be >= 0 seconds")
        require(block_ms >= 1, "block_ms must be >= 1 (0 would block forever)")
        require(heartbeat_interval > 0, "heartbeat_interval must be > 0 seconds")
        require(replay_limit >= 1, "replay_limit must be >= 1")
        require(batch_size >= 1, "batch_size must be >= 1")
        require(resync_interval > 0, "resync_interval must be > 0 seconds")
        require(slow_callback > 0, "slow_callback must be > 0 seconds")
        self.key = key
        self._log = logger or logging.getLogger(self._default_logger)
        self._core = SubscriberCore(
            key,
            self._checked_callback(callback),
            decode=decode,
            logger=self._log,
            signing_keys=signing_keys(signing_key),
            snapshot=snapshot,
            propagates=self._propagates,
        )
        self._core.callback_name = callback_name(callback)
        self._fallback_path = Path(fallback_path) if fallback_path is not None else None
        self._worker_id = worker_id
        self._start_timeout = float(start_timeout)
        self._block = block_ms / 1000.0
        self._heartbeat_interval = float(heartbeat_interval)
        self._replay_limit = replay_limit
        self._batch_size = batch_size
        self._resync_interval = float(resync_interval)
        self._metrics_setting = metrics
        self._slow_callback = float(slow_callback)
        self._shared = shared  # one connection for the process's keys (Subscriber: _hub)

        self._phase: Phase = "new"
        # Reports decided but not yet answered by Redis (``_reports``: when they are sent).
        self._reports = Reports(self._keys.acks, self._queue_state)
        self._floor = FloorWrite(self._keys.floor)  # the ZADD GT that goes with each state
        self._next_beat = 0.0
        self._next_check = 0.0
        self._started_at = 0
        self._first_waited = False  # start() waited once for a first entry
        self._pid = 0
        self._host = ""
        self._setup()

    def _setup(self) -> None:
        """The transport's own state, made at the end of ``__init__`` (no I/O)."""

    def _checked_callback(self, callback: Callback) -> Callback:
        """The callback the core calls; a transport may check or wrap the user's."""
        return callback

    @staticmethod
    def _propagates(exc: BaseException) -> bool:
        """Whether a callback's ``exc`` stops the process instead of rejecting the content
        (each transport's rule is documented on it)."""
        return False

    # -- introspection (thread-safe: each reads one immutable state) ----------------------

    @property
    def version(self) -> int:
        """Version running; 0 before start() or when running the fallback file."""
        running = self._core.state.running
        return running.version if running else 0

    @property
    def last_hash(self) -> str | None:
        """Hex SHA-256 of the content running."""
        running = self._core.state.running
        return running.sha256 if running else None

    @property
    def content(self) -> bytes | None:
        """The raw content running (``None`` before ``start()``)."""
        running = self._core.state.running
        return running.content if running else None

    @property
    def last_reload_time(self) -> float | None:
        """Unix time the callback last accepted content."""
        return self._core.state.last_reload_time

    @property
    def reload_count(self) -> int:
        """How many times the callback accepted content, the initial load included."""
        return self._core.state.reload_count

    @property
    def error_count(self) -> int:
        """Rejections: entries the callback refused plus malformed or forged entries."""
        return self._core.state.error_count

    @property
    def status(self) -> LiveStatus:
        """``starting``, ``applied``, ``rejected`` (the newest version is not running),
        ``holding`` (the stream is behind what this worker has seen: restored, re-created or
        failed over; it keeps its config until a higher version arrives), ``fallback`` or
        ``stopped`` -- what ``:workers`` shows for this worker. ``stalled`` while a callback
        has been running for over ``slow_callback`` seconds (the worker writes no heartbeat
        meanwhile, so ``:workers`` soon shows it stale)."""
        stopped = self._phase == "stopped"
        return self._core.live_status(stopped=stopped, slow_callback=self._slow_callback)

    @property
    def callback_seconds(self) -> float:
        """How long the callback now running has run; 0.0 when none runs."""
        return self._core.callback_seconds()

    @property
    def worker_id(self) -> str:
        return self._core.worker or self._worker_id or process_identity()

    @property
    def started(self) -> bool:
        """``start()`` succeeded or is in progress, or ``stop()`` was called: either way
        there is nothing left for a post-fork hook to start."""
        return self._phase != "new"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key!r} {self.status} version={self.version}>"

    # -- start() ------------------------------------------------------------------------

    def _identify(self) -> None:
        # Taken now, not in __init__: under preload_app the object was created before fork.
        self._pid = os.getpid()
        self._host = os.environ.get("HOSTNAME") or socket.gethostname()
        self._core.worker = self._worker_id or process_identity()
        self._started_at = now_ms()
        self._core.metrics = metrics_for(self._metrics_setting)

    def _client_name(self) -> str:
        return _redis.client_name("hotreload-sub", self._core.worker)

    # -- connecting (the transport's _connect: sentinel, then probe, at most MAX_HOPS) ----

    def _connect_timeout(self, socket_timeout: float) -> float:
        return min(CONNECT_TIMEOUT, socket_timeout)

    def _probe_failed(self, exc: BaseException) -> None:
        """A new connection failed before it was used: an unreachable node makes the next
        one try another node (a moved slot is looked up again anyway)."""
        if isinstance(exc, DISCONNECTED) and not isinstance(exc, TopologyChanged):
            self._topology.unreachable()

    def _kept_moving(self) -> TopologyChanged:
        return TopologyChanged(f"slot {self._topology.slot} kept moving; retrying")

    def _start_socket_timeout(self, deadline: float) -> float:
        """Socket timeout of a connection made by ``start()``: bounded by what is left of
        ``start_timeout``, so a frozen Redis cannot stretch ``start()`` past it (the
        follower connects again with the normal timeout)."""
        remaining = max(0.0, deadline - time.monotonic())
        return min(self._block + SOCKET_TIMEOUT_MARGIN, remaining + _START_MARGIN)

    def _nothing_published(self) -> str:
        return (
            f"nothing was published to {self._keys.events} within "
            f"{self._start_timeout:g} s; is the publisher (`hotreload watch`) running?"
        )

    def _start_retry_delay(
        self, problem: BaseException | str, backoff: _redis.Backoff, deadline: float
    ) -> float | None:
        """Seconds to wait before ``start()`` tries Redis again, or ``None``: give up."""
        if isinstance(problem, str):  # Redis answered, but nothing was published in time
            return None
        delay = backoff.next_delay()
        if time.monotonic() + delay >= deadline:
            return None
        self._log.debug("%s: Redis not usable yet (%s); retrying", self.key, problem)
        return delay

    def _replayed(self, walk: Walk) -> bool:
        """After a replay walk was settled and flushed: True once a config runs, False for
        an empty stream; raises when history has entries but none is acceptable."""
        if self._core.state.running is not None:
            return True
        if walk.examined and walk.untrusted == walk.examined:
            raise SigningKeyMismatch(self.key, walk.reasons, list(self._core.signing_keys))
        if walk.examined:
            raise NoAcceptableConfig(self.key, walk.reasons)
        return False

    def _queue_first_event_wait(self, pipe: Batch, deadline: float) -> bool:
        """Queue a wait for the first entry after what the replay read: any entry of an
        empty stream (pod start: the publisher has not published yet), or one after entries
        that were all for other workers (canaries); False when ``deadline`` leaves no time.

        The history is then walked again (after an empty walk the cursor is 0-0: XREAD
        returns the oldest entry first)."""
        # Stop a little before the deadline so the read never races the socket timeout.
        remaining = deadline - time.monotonic() - _START_MARGIN
        if remaining <= 0:
            return False
        block = min(remaining, self._block, 1e9 if self._first_waited else FIRST_WAIT_REWRITE)
        self._first_waited = True
        block_ms = max(1, int(block * 1000))
        pipe.xread({self._keys.events: self._core.cursor.entry_id}, count=1, block=block_ms)
        return True

    def _start_from_fallback(self, problem: BaseException | str) -> None:
        path = self._fallback_path
        if path is None:
            if isinstance(problem, str):
                raise NoAcceptableConfig(self.key, [problem])
            # one line naming what to check (a failed TLS verification says so)
            reason = _redis.describe_failure(problem, self._target)
            cause = problem if reason == str(problem) else reason
            raise RedisUnavailable(self._target.redacted(), cause) from problem
        try:
            content = read_fallback(path, snapshot=self._core.is_snapshot)
        except OSError as exc:
            raise InitialLoadError(str(path), exc) from exc
        try:
            self._core.use_fallback(content)
        except BaseException as exc:
            if self._core.propagates(exc):
                raise
            raise InitialLoadError(str(path), exc) from exc
        self._log.warning(
            "%s: started from the fallback file %s because %s; following Redis from now on",
            self.key,
            path,
            _redis.describe_failure(problem, self._target),
        )

    # -- walks --------------------------------------------------------------------------

    def _history_pages(self) -> HistoryPages:
        return HistoryPages(self._keys.events, self._batch_size)

    def _resync_walk(self) -> Walk:
        """After a (re)connect: walk back from the newest entry to where we were (or the
        survey the core asked for: is the stream behind this worker?)."""
        return self._core.resync_walk(limit=self._replay_limit)

    def _settle(self, walk: Walk, *, hold: bool = False) -> None:
        """A walk is over: record where it ended and queue its reports (``hold``: see
        ``_reports``). The state is always rewritten: it is visible to the operator before
        ``start()`` returns, and the Redis that answers a resync may have lost ``:workers``."""
        walk.finish()
        self._reports.add(walk.acks, now=time.monotonic(), hold=hold)

    # -- the follow loop ----------------------------------------------------------------

    def _follow_begins(self) -> None:
        now = time.monotonic()
        self._next_beat = now + self._heartbeat_interval
        self._next_check = now + self._resync_interval

    def _queue_cycle(self, pipe: Batch) -> CyclePlan:
        """Queue one cycle's round trip: pending reports, the worker state when it changed
        or the heartbeat is due, the reset check when due, and the blocking read."""
        plan, block = self._queue_cycle_head(pipe)
        pipe.xread({self._keys.events: self._core.cursor.entry_id}, self._batch_size, block)
        return plan

    def _queue_cycle_head(self, pipe: Batch, *, early: float = _DUE_EARLY) -> tuple[CyclePlan, int]:
        """All but the read; returns the plan and the read's block (ms). ``early``: see _hub."""
        # Due a hair early counts as due: block times are whole milliseconds (truncated), so
        # a read that times out at the heartbeat may return just before it, and waiting out
        # that hair would cost a second round trip in the block period.
        now = time.monotonic()
        beat = now >= self._next_beat - early  # the heartbeat: the state, freshly stamped
        if beat:
            self._next_beat = now + self._heartbeat_interval
        check = now >= self._next_check - _DUE_EARLY
        if check:
            self._next_check = now + self._resync_interval
        writes = self._reports.queue(pipe, now=now + _DUE_EARLY, force=beat)
        # Only the heartbeat and held reports wake the loop early; a due reset check rides
        # on the next round trip (at most one block time late): an idle worker makes one
        # round trip per block time.
        wake = min(self._block, self._next_beat - now, self._reports.due - now)
        block_ms = max(1, int(wake * 1000))
        if check:
            pipe.xrevrange(self._keys.events, "+", "-", count=1)
        return CyclePlan(writes=writes, check=check), block_ms

    def _cycle_done(self, plan: CyclePlan, results: list[Any]) -> bool:
        """Decide a cycle's reply (executed with ``raise_on_error=False``).

        Returns True when the stream must be resynced (it was reset behind our position, or
        a batch of replays asks whether it is behind this worker).
        """
        self._reports_written(results, plan.writes)
        self._core.malformed_log.flush()
        reads = results[plan.writes :]
        for result in reads:
            if isinstance(result, Exception):
                raise result
        entries = stream_entries(reads[-1])
        if entries:
            walk = self._core.walk(limit=len(entries), batch=True)
            for entry_id, fields in reversed(entries):
                if not walk.step(entry_id, fields):
                    break
            self._settle(walk, hold=True)  # held: see ``_reports``
            return self._core.survey_due
        if plan.check:
            newest = reads[0]
            holding = self._core.state.holding
            resync = self._core.reconcile_newest(newest[0] if newest else None)
            if self._core.state.holding != holding:  # the operator sees the worker hold at once
                self._reports.add((), now=time.monotonic(), hold=False)
            return resync
        return False

    def _connection_lost(self, exc: BaseException, lost_at: float | None) -> float:
        """Count and (once per outage) log a lost connection; returns when it was lost."""
        if self._core.metrics is not None:
            self._core.metrics.record_connection_error(self.key)
        if lost_at is None:
            lost_at = time.monotonic()
            reason: object = exc
            if isinstance(exc, TopologyChanged):
                reason = exc.explained(self._topology.standalone)
            self._log.warning(
                "%s: lost Redis at %s (%s); keeping version %d, reconnecting",
                self.key,
                self._topology.describe(),
                reason,
                self.version,
            )
        return lost_at

    def _reconnect_delay(self, backoff: _redis.Backoff) -> float:
        """Seconds to wait before reconnecting after a lost connection."""
        failover = self._topology.sentinel or not self._topology.standalone
        backoff.cap = FAILOVER_BACKOFF_CAP if failover else BACKOFF_CAP
        return backoff.next_delay()

    def _reconnected(self, lost_at: float) -> None:
        self._log.info(
            "%s: Redis is back after %.1f s; resynced, running version %d",
            self.key,
            time.monotonic() - lost_at,
            self.version,
        )

    def _command_refused(self, exc: redis.RedisError) -> None:
        # e.g. WRONGTYPE on a key an operator overwrote: keep the config, retry from a
        # resync, never spin.
        self._log.warning("%s: Redis refused a command (%s); retrying", self.key, exc)

    def _unexpected_error(self) -> None:
        """Log the exception being handled: a bug must not end the follower silently."""
        self._log.exception("%s: unexpected error; reconnecting", self.key)

    def _follower_died(self, exc: BaseException) -> None:
        """The follower ends on ``exc``, not on a stop: say so loudly, and in the final state."""
        self._core.stop_reason = _reasons.ended(exc, self.key, self.version)
        self._log.error("%s: %s", self.key, self._core.stop_reason, exc_info=exc)

    # -- reports ------------------------------------------------------------------------

    def _queue_reports(self, pipe: Batch, *, stopped: bool = False) -> int:
        """Queue every report not yet written (held ones too) and the worker state when
        changed or ``stopped``; returns how many commands."""
        return self._reports.queue(pipe, now=time.monotonic(), stopped=stopped)

    def _queue_state(self, pipe: Batch, stopped: bool) -> None:
        """The state's ``HSET``, after its ``ZADD GT`` on ``:floor`` (``_floorwrite``): every
        report path (hubs, cluster hubs, ``shared=False``, the final write) comes here."""
        state = self._core.worker_state(
            stopped=stopped,
            heartbeat_interval=self._heartbeat_interval,
            started_at=self._started_at,
            pid=self._pid,
            host=self._host,
        )
        state = self._floor.queue(pipe, state)
        pipe.hset(self._keys.workers, self._core.worker, encode_worker_state(state))

    def _reports_written(self, results: list[Any], writes: int) -> None:
        """The pipeline that carried ``writes`` reports got its reply (``raise_on_error=
        False``): reports count as written once Redis answered."""
        self._reports.settle()
        self._floor.answered(results, writes, self._log, self.key)  # refusals logged

    def _final_state_failed(self, exc: BaseException) -> None:
        self._log.info("%s: could not record the stopped state: %s", self.key, exc)
