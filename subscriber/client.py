"""The threaded ``Subscriber``: one config key followed by a background thread (redis-py).

All decisions (verify, dedupe, walk back, what to report) are in ``_core``; this module does
the I/O around them: the replay in ``start()``, then a loop of one pipelined round trip per
cycle -- pending acks, the worker state when it changed or the heartbeat is due, and
``XREAD BLOCK`` from the subscriber's own position -- with its own reconnect, backoff and
resync, because redis-py's retries and default timeouts break blocking reads.

Start a Subscriber in the process that uses it, after any fork: threads do not survive a
fork. ``unstarted()`` lists this process's Subscribers not yet started, for a hook such as
gunicorn's ``post_worker_init``; ``stop()`` cuts a blocked read short, so shutting down
never waits for the block time.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast

import redis
from redis.client import Pipeline

from subscriber import _redis
from subscriber._core import ZERO_ID, Callback, Status, SubscriberCore, Walk
from subscriber.errors import (
    ConfigurationError,
    InitialLoadError,
    NoAcceptableConfig,
    RedisUnavailable,
)
from subscriber.keys import DEFAULT_PREFIX, stream_keys
from subscriber.protocol import (
    ACK_HISTORY,
    Ack,
    encode_ack,
    encode_worker_state,
    now_ms,
    process_identity,
)

__all__ = ["Subscriber", "all_subscribers", "unstarted"]

# The socket timeout sits this far above the block time: long enough that a slow reply to a
# blocking read is not mistaken for a dead server, short enough to notice a frozen one.
SOCKET_TIMEOUT_MARGIN = 3.0
BACKOFF_CAP = 3.0
# stop() writes the final "stopped" state with these timeouts, so it stays prompt even when
# Redis is frozen or gone.
FINAL_WRITE_TIMEOUT = 0.5
_INTERRUPT_POLL = 0.05
# Redis-side failures of a whole connection; anything else from redis-py is a refused command.
_DISCONNECTED = (redis.ConnectionError, redis.TimeoutError, OSError)

_Phase = Literal["new", "starting", "running", "stopped"]


class Subscriber:
    """Keeps one config key applied in this process: the newest version the callback accepts.

    ``callback(content)`` receives the content as ``str`` (UTF-8) -- or ``bytes`` with
    ``decode=False`` -- and rejects it by raising; the previous config then stays. It runs on
    the ``start()`` caller's thread during the replay and on the subscriber's thread after.

    Keywords (all optional):

    ``redis_url=None``
        ``redis://``, ``rediss://`` or ``unix://`` URL; default ``$HOTRELOAD_REDIS_URL``.
    ``prefix="hotreload"``
        Key prefix: the stream is ``{prefix}:{{{key}}}:events``.
    ``worker_id=None``
        Name in ``:acks`` and ``:workers``; default ``host:pid`` taken at ``start()`` (after
        any fork), host being ``$HOSTNAME`` (the pod name).
    ``logger=None``
        A ``logging.Logger``; default ``logging.getLogger("subscriber.client")``.
    ``fallback_path=None``
        The mounted file, applied by ``start()`` when Redis cannot be reached or nothing is
        published within ``start_timeout`` (status ``fallback``); without it ``start()`` raises.
    ``start_timeout=10.0``
        Seconds ``start()`` may spend reaching Redis and waiting for a first event.
    ``decode=True``
        Decode content as UTF-8 for the callback (non-UTF-8 content is rejected); ``False``
        passes bytes.
    ``block_ms=5000``
        ``XREAD BLOCK`` time. The socket timeout is this plus 3 s, which bounds how long a
        frozen Redis goes unnoticed. ``stop()`` does not wait for it.
    ``heartbeat_interval=5.0``
        Seconds between refreshes of this worker's entry in ``:workers``; the refresh rides
        on the blocking read's round trip. An entry not refreshed for three intervals belongs
        to a stale (hung or SIGKILLed) worker.
    ``replay_limit=100``
        At most this many history entries are examined walking back, in ``start()`` and in a
        resync.
    ``batch_size=8``
        ``COUNT`` of each read; bounds the memory a burst of 1 MiB configs takes.
    ``resync_interval=60.0``
        Seconds between checks that the stream was not reset behind this subscriber's
        position while it stayed connected (which can hide entries from ``XREAD``).

    Versions that arrive together (a burst, or a reconnect after an outage) are decided
    newest first: the newest one the callback accepts is applied, each rejected newer one is
    reported to ``:acks``, older ones are superseded (no callback, no ack). The end state is
    the one applying them one by one would reach. Content equal to the running config is
    acknowledged (``unchanged``) without a callback.

    Creating one does no I/O and starts no thread, so it is safe at import time before a
    fork (gunicorn ``preload_app``); call ``start()`` in each process. Introspection
    properties are thread-safe and lock-free.
    """

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
        block_ms: int = 5000,
        heartbeat_interval: float = 5.0,
        replay_limit: int = 100,
        batch_size: int = 8,
        resync_interval: float = 60.0,
    ) -> None:
        self._keys = stream_keys(key, prefix)  # validates key and prefix
        self._url = _redis.resolve_url(redis_url)
        _require(start_timeout >= 0, "start_timeout must be >= 0 seconds")
        _require(block_ms >= 1, "block_ms must be >= 1 (0 would block forever)")
        _require(heartbeat_interval > 0, "heartbeat_interval must be > 0 seconds")
        _require(replay_limit >= 1, "replay_limit must be >= 1")
        _require(batch_size >= 1, "batch_size must be >= 1")
        _require(resync_interval > 0, "resync_interval must be > 0 seconds")
        self.key = key
        self._log = logger or logging.getLogger(__name__)
        self._core = SubscriberCore(key, callback, decode=decode, logger=self._log)
        self._fallback_path = Path(fallback_path) if fallback_path is not None else None
        self._worker_id = worker_id
        self._start_timeout = float(start_timeout)
        self._block = block_ms / 1000.0
        self._heartbeat_interval = float(heartbeat_interval)
        self._replay_limit = replay_limit
        self._batch_size = batch_size
        self._resync_interval = float(resync_interval)

        self._lock = threading.Lock()  # guards _phase and _thread
        self._phase: _Phase = "new"
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._pool: _InterruptiblePool | None = None  # the thread's, for stop() to interrupt
        # Reports decided but not yet written; they ride on the next round trip.
        self._pending_acks: list[Ack] = []
        self._state_dirty = False
        self._next_beat = 0.0
        self._next_check = 0.0
        self._started_at = 0
        self._pid = 0
        self._host = ""
        _register(self)

    # -- introspection (thread-safe: each reads one immutable snapshot) -------------------

    @property
    def version(self) -> int:
        """Version running; 0 before start() or when running the fallback file."""
        running = self._core.snapshot.running
        return running.version if running else 0

    @property
    def last_hash(self) -> str | None:
        """Hex SHA-256 of the content running."""
        running = self._core.snapshot.running
        return running.sha256 if running else None

    @property
    def content(self) -> bytes | None:
        """The raw content running (``None`` before ``start()``)."""
        running = self._core.snapshot.running
        return running.content if running else None

    @property
    def last_reload_time(self) -> float | None:
        """Unix time the callback last accepted content."""
        return self._core.snapshot.last_reload_time

    @property
    def reload_count(self) -> int:
        """How many times the callback accepted content, the initial load included."""
        return self._core.snapshot.reload_count

    @property
    def error_count(self) -> int:
        """Rejections: entries the callback refused plus malformed or forged entries."""
        return self._core.snapshot.error_count

    @property
    def status(self) -> Status:
        """``starting``, ``applied``, ``rejected`` (the newest version is not running),
        ``fallback`` or ``stopped`` -- what ``:workers`` shows for this worker."""
        return self._core.status(stopped=self._phase == "stopped")

    @property
    def worker_id(self) -> str:
        return self._core.worker or self._worker_id or process_identity()

    @property
    def started(self) -> bool:
        """``start()`` succeeded or is in progress, or ``stop()`` was called: either way
        there is nothing left for a post-fork hook to start."""
        return self._phase != "new"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Replay, then follow in the background. Returns once a config is applied.

        Raises ``NoAcceptableConfig`` when history has entries but the callback accepts
        none, ``RedisUnavailable`` when Redis cannot be reached within ``start_timeout`` and
        there is no fallback, ``InitialLoadError`` when the fallback cannot be used.
        Calling it again while running does nothing.
        """
        with self._lock:
            if self._phase == "stopped":
                raise RuntimeError(f"{self.key}: this Subscriber was stopped; create a new one")
            if self._phase != "new":
                return self
            self._phase = "starting"
        try:
            self._identify()
            from_redis = self._initial_load()
        except BaseException:
            with self._lock:
                if self._phase == "starting":
                    self._phase = "new"  # a failed start may be retried
            raise
        with self._lock:
            if self._stop_event.is_set():  # stop() was called while we were starting
                return self
            self._thread = threading.Thread(
                target=self._follow,
                # started from the fallback: resync as soon as Redis answers
                kwargs={"resync": not from_redis},
                name=f"hotreload-{self.key}",
                daemon=True,
            )
            self._phase = "running"
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following and record the state ``stopped``. Idempotent and prompt: a blocked
        read is cut short; only a callback still running is waited for."""
        with self._lock:
            if self._phase == "stopped":
                return
            self._phase = "stopped"
            self._stop_event.set()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return  # never started, or called from the callback: the loop ends after it
        while thread.is_alive():
            self._interrupt()
            thread.join(_INTERRUPT_POLL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Subscriber {self.key!r} {self.status} version={self.version}>"

    # -- start() ------------------------------------------------------------------------

    def _identify(self) -> None:
        # Taken now, not in __init__: under preload_app the object was created before fork.
        self._pid = os.getpid()
        self._host = os.environ.get("HOSTNAME") or socket.gethostname()
        self._core.worker = self._worker_id or process_identity()
        self._started_at = now_ms()

    def _initial_load(self) -> bool:
        """Apply a config: from Redis (True) or from the fallback file (False); or raise."""
        deadline = time.monotonic() + self._start_timeout
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        problem: BaseException | str
        while True:
            # Bounded by what is left of start_timeout, so a frozen Redis cannot stretch
            # start() past it; the thread connects again with the normal timeout.
            remaining = max(0.0, deadline - time.monotonic())
            client = self._connect(min(self._block + SOCKET_TIMEOUT_MARGIN, remaining + 0.25))
            try:
                if self._replay(client, deadline):
                    return True
                problem = (
                    f"nothing was published to {self._keys.events} within "
                    f"{self._start_timeout:g} s; is the publisher (`hotreload watch`) running?"
                )
            except (redis.RedisError, OSError) as exc:  # unreachable, frozen, or refusing
                problem = exc
            finally:
                _close(client)
            if isinstance(problem, str):
                break
            delay = backoff.next_delay()
            if time.monotonic() + delay >= deadline:
                break
            self._log.debug("%s: Redis not usable yet (%s); retrying", self.key, problem)
            time.sleep(delay)
        self._start_from_fallback(problem)
        return False

    def _replay(self, client: redis.Redis, deadline: float) -> bool:
        """Apply the newest acceptable entry; False if the stream stayed empty until deadline."""
        while True:
            walk = self._core.walk(limit=self._replay_limit)
            self._walk_history(client, walk)
            walk.finish()
            self._pending_acks.extend(walk.acks)
            self._state_dirty = True  # visible to the operator before start() returns
            self._flush(client)
            if self._core.snapshot.running is not None:
                return True
            if walk.seen:
                raise NoAcceptableConfig(self.key, walk.reasons)
            # Stop a little before the deadline so the read never races the socket timeout.
            remaining = deadline - time.monotonic() - 0.25
            if remaining <= 0:
                return False
            # Empty stream (pod start: the publisher has not published yet). Wait for any
            # entry, then walk the history again: XREAD from 0-0 returns the oldest first.
            block_ms = max(1, int(min(remaining, self._block) * 1000))
            with client.pipeline(transaction=False) as pipe:
                pipe.xread({self._keys.events: ZERO_ID}, count=1, block=block_ms)
                pipe.execute()

    def _start_from_fallback(self, problem: BaseException | str) -> None:
        path = self._fallback_path
        if path is None:
            if isinstance(problem, str):
                raise NoAcceptableConfig(self.key, [problem])
            raise RedisUnavailable(_redis.redacted(self._url), problem)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise InitialLoadError(str(path), exc) from exc
        try:
            self._core.use_fallback(content)
        except Exception as exc:
            raise InitialLoadError(str(path), exc) from exc
        self._log.warning(
            "%s: started from the fallback file %s because %s; following Redis from now on",
            self.key,
            path,
            problem,
        )

    # -- the background thread ------------------------------------------------------------

    def _follow(self, *, resync: bool) -> None:
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        client: redis.Redis | None = None
        lost_at: float | None = None
        now = time.monotonic()
        self._next_beat = now + self._heartbeat_interval
        self._next_check = now + self._resync_interval
        try:
            while not self._stop_event.is_set():
                try:
                    if client is None:
                        client = self._connect(self._block + SOCKET_TIMEOUT_MARGIN)
                        self._pool = cast("_InterruptiblePool", client.connection_pool)
                        if self._stop_event.is_set():
                            break  # stop() may have looked for a pool before this one existed
                    if resync:
                        self._resync(client)
                        resync = False
                        if lost_at is not None:
                            self._log.info(
                                "%s: Redis is back after %.1f s; resynced, running version %d",
                                self.key,
                                time.monotonic() - lost_at,
                                self.version,
                            )
                            lost_at = None
                    else:
                        resync = self._cycle(client)
                    backoff.reset()
                except _DISCONNECTED as exc:
                    _close(client)
                    client = None
                    resync = True  # whatever happened meanwhile, even a reset, is found
                    if self._stop_event.is_set():
                        break
                    if lost_at is None:
                        lost_at = time.monotonic()
                        self._log.warning(
                            "%s: lost Redis at %s (%s); keeping version %d, reconnecting",
                            self.key,
                            _redis.redacted(self._url),
                            exc,
                            self.version,
                        )
                    self._stop_event.wait(backoff.next_delay())
                except redis.RedisError as exc:
                    # A command refused (e.g. WRONGTYPE on a key an operator overwrote):
                    # keep the config, retry from a resync, never spin.
                    self._log.warning("%s: Redis refused a command (%s); retrying", self.key, exc)
                    resync = True
                    self._stop_event.wait(backoff.next_delay())
                except Exception:  # noqa: BLE001 -- a bug must not end the thread silently
                    self._log.exception("%s: unexpected error; reconnecting", self.key)
                    _close(client)
                    client = None
                    resync = True
                    self._stop_event.wait(backoff.next_delay())
        finally:
            _close(client)
            self._write_final_state()

    def _cycle(self, client: redis.Redis) -> bool:
        """One round trip: pending reports, heartbeat when due, the blocking read.

        Returns True when the stream must be resynced (it was reset behind our position).
        """
        now = time.monotonic()
        if now >= self._next_beat:
            self._state_dirty = True  # the heartbeat is the state with a fresh timestamp
            self._next_beat = now + self._heartbeat_interval
        check = now >= self._next_check
        if check:
            self._next_check = now + self._resync_interval
        wake_at = min(self._next_beat, self._next_check)
        block_ms = max(1, int(min(self._block, wake_at - now) * 1000))
        cursor = self._core.cursor
        with client.pipeline(transaction=False) as pipe:
            writes = self._queue_reports(pipe)
            if check:
                pipe.xrevrange(self._keys.events, "+", "-", count=1)
            pipe.xread({self._keys.events: cursor.entry_id}, count=self._batch_size, block=block_ms)
            results = self._execute_reports(pipe, writes)
        reads = results[writes:]
        for result in reads:
            if isinstance(result, Exception):
                raise result
        entries = _stream_entries(reads[-1])
        if entries:
            walk = self._core.walk(limit=len(entries))
            for entry_id, fields in reversed(entries):
                if not walk.step(entry_id, fields):
                    break
            walk.finish()
            self._pending_acks.extend(walk.acks)
            self._state_dirty = True
            return False
        if check:
            newest = reads[0]
            return self._core.reconcile_newest(newest[0] if newest else None)
        return False

    def _resync(self, client: redis.Redis) -> None:
        """After a (re)connect: walk back from the newest entry to where we were."""
        walk = self._core.walk(limit=self._replay_limit, stop_at=self._core.cursor)
        self._walk_history(client, walk)
        walk.finish()
        self._pending_acks.extend(walk.acks)
        # Always rewrite the state: the Redis that answers may have lost :workers.
        self._state_dirty = True
        self._flush(client)

    # -- I/O helpers ----------------------------------------------------------------------

    def _connect(self, socket_timeout: float) -> redis.Redis:
        # Our loop does the retrying; see _redis.connect. No I/O until the first command.
        return _redis.connect(
            self._url,
            socket_timeout=socket_timeout,
            connect_timeout=min(2.0, socket_timeout),
            client_name=_client_name(self._core.worker),
            pool_class=_InterruptiblePool,
        )

    def _walk_history(self, client: redis.Redis, walk: Walk) -> None:
        """Feed ``walk`` the stream newest first, one page per round trip.

        Pages grow 1, 1, 2, 4, ... up to ``batch_size``: the newest entry is usually the one,
        the one before it the usual walk-back, and a 1 MiB config is not fetched 8 times to
        step back once.
        """
        upper, count, next_count = "+", 1, 1
        while True:
            with client.pipeline(transaction=False) as pipe:
                pipe.xrevrange(self._keys.events, upper, "-", count=count)
                (entries,) = pipe.execute()
            for entry_id, fields in entries:
                if not walk.step(entry_id, fields):
                    return
            if len(entries) < count:
                return  # reached the oldest entry
            last = entries[-1][0]
            upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))
            count, next_count = next_count, min(self._batch_size, next_count * 2)

    def _queue_reports(self, pipe: Pipeline, *, stopped: bool = False) -> int:
        """Queue pending acks and, if changed or due, the worker state; returns how many."""
        for ack in self._pending_acks:
            pipe.xadd(self._keys.acks, encode_ack(ack), maxlen=ACK_HISTORY, approximate=True)  # type: ignore[arg-type]
        queued = len(self._pending_acks)
        if self._state_dirty or stopped:
            state = self._core.worker_state(
                stopped=stopped,
                heartbeat_interval=self._heartbeat_interval,
                started_at=self._started_at,
                pid=self._pid,
                host=self._host,
            )
            pipe.hset(self._keys.workers, self._core.worker, encode_worker_state(state))
            queued += 1
        return queued

    def _execute_reports(self, pipe: Pipeline, writes: int) -> list[Any]:
        """Run the pipeline; reports count as written once Redis answered."""
        results: list[Any] = pipe.execute(raise_on_error=False)
        self._pending_acks.clear()
        self._state_dirty = False
        for result in results[:writes]:
            if isinstance(result, Exception):
                # A report Redis refused (e.g. OOM under maxmemory) must not stop the
                # config from being followed; the state is rewritten with the next beat.
                self._log.warning("%s: Redis refused a report: %s", self.key, result)
                break
        return results

    def _flush(self, client: redis.Redis) -> None:
        with client.pipeline(transaction=False) as pipe:
            writes = self._queue_reports(pipe)
            if writes:
                self._execute_reports(pipe, writes)

    def _interrupt(self) -> None:
        pool = self._pool
        if pool is not None:
            pool.interrupt()

    def _write_final_state(self) -> None:
        """Pending acks and the state "stopped", on a connection of its own: the thread's
        may have just been cut by stop()."""
        client = _redis.connect(
            self._url,
            socket_timeout=FINAL_WRITE_TIMEOUT,
            connect_timeout=FINAL_WRITE_TIMEOUT,
            client_name=_client_name(self._core.worker),
        )
        try:
            with client.pipeline(transaction=False) as pipe:
                self._execute_reports(pipe, self._queue_reports(pipe, stopped=True))
        except (redis.RedisError, OSError) as exc:
            self._log.info("%s: could not record the stopped state: %s", self.key, exc)
        finally:
            client.close()


class _InterruptiblePool(redis.ConnectionPool):
    """A pool that can wake its connection's reader from another thread.

    redis-py offers no way to cancel a blocking read from another thread, and closing the
    connection from there would race with the reader's parser. Shutting the socket down
    only makes the pending ``recv`` -- a blocked XREAD, or the handshake of a connection to
    a frozen server -- return end-of-file, which the reader sees as a ConnectionError.
    The subscriber's client is used by one thread, so the pool holds one connection: the
    latest one made.
    """

    latest: object = None

    def make_connection(self) -> Any:
        self.latest = super().make_connection()
        return self.latest

    def interrupt(self) -> None:
        # the socket is private to redis-py; without it the thread ends at its next timeout
        sock = getattr(self.latest, "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def _client_name(worker: str) -> str:
    # CLIENT SETNAME refuses spaces and control characters; a refused name would make every
    # connection fail.
    return "hotreload-sub:" + re.sub(r"[^!-~]", "_", worker)[:200]


def _close(client: redis.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def _stream_entries(reply: Any) -> list[tuple[Any, Any]]:
    """``(id, fields)`` pairs of an XREAD reply (one stream), in either shape redis-py uses:
    a list of ``[stream, entries]`` or a dict ``{stream: entries}``."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (pair[1] for pair in reply)
    entries: list[tuple[Any, Any]] = []
    for stream_entries in streams:
        for item in stream_entries:
            if isinstance(item, list) and item and isinstance(item[0], tuple | list):
                entries.extend(item)  # RESP3 callback: one more level of nesting
            else:
                entries.append(item)
    return entries


# -- the process-wide registry (a gunicorn post_worker_init hook starts what is unstarted) --

_registry_lock = threading.Lock()
_registry: list[weakref.ref[Subscriber]] = []


def _register(subscriber: Subscriber) -> None:
    with _registry_lock:
        _registry[:] = [ref for ref in _registry if ref() is not None]
        _registry.append(weakref.ref(subscriber))


def all_subscribers() -> list[Subscriber]:
    """Every Subscriber alive in this process, in creation order."""
    with _registry_lock:
        alive = [ref() for ref in _registry]
    return [sub for sub in alive if sub is not None]


def unstarted() -> list[Subscriber]:
    """Subscribers created but not started (e.g. at import time before a fork)."""
    return [sub for sub in all_subscribers() if not sub.started]


@atexit.register
def _stop_all_at_exit() -> None:
    # Record "stopped" on a clean exit; a SIGKILLed worker shows up as stale instead.
    for sub in all_subscribers():
        sub.stop()
