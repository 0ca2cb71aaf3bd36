"""The threaded ``Subscriber``: one config key followed by a background thread (redis-py).

All decisions (verify, dedupe, walk back, what to report) are in ``_core``, and the
constructor, the properties and the I/O-free steps of ``start()`` and of the loop are in
``_transport``, shared with the asyncio ``AsyncSubscriber``; this module does the I/O: the
replay in ``start()``, then a loop of one batched round trip per cycle -- pending acks, the
worker state when it changed or the heartbeat is due, and ``XREAD BLOCK`` from the
subscriber's own position -- with its own reconnect, backoff and resync, because redis-py's
retries and default timeouts break blocking reads; by default the process's shared one (``_hub``).

Start a Subscriber in the process that uses it, after any fork: threads do not survive a
fork. ``unstarted()`` lists this process's Subscribers not yet started, for a hook such as
gunicorn's ``post_worker_init``; ``stop()`` cuts a blocked read short, so shutting down
never waits for the block time.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from types import TracebackType
from typing import Self, cast

import redis

from subscriber import _clusterhub, _hub, _light, _reasons, _redis, _sentinel
from subscriber._cluster import MAX_HOPS
from subscriber._hubplan import Member, hold_after
from subscriber._pool import InterruptiblePool
from subscriber._pool import close as _close
from subscriber._pool import execute as _execute
from subscriber._transport import DISCONNECTED, SubscriberBase
from subscriber._walk import Walk
from subscriber._wire import Batch
from subscriber.defaults import (
    BACKOFF_CAP,
    FINAL_WRITE_TIMEOUT,
    SOCKET_TIMEOUT_MARGIN,
    STOP_TIMEOUT,
)

__all__ = ["Subscriber", "all_subscribers", "stop_all", "unstarted"]

# (the shared settings and I/O-free steps are in _transport, the defaults in .defaults)
_INTERRUPT_POLL = 0.05
# stop_all() gives each subscriber at least this long, past its shared deadline.
_MIN_STOP_WAIT = 1.0


class Subscriber(SubscriberBase):
    """Keeps one config key applied in this process: the newest version the callback accepts.

    ``callback(content)`` receives the content as ``str`` (UTF-8) -- or ``bytes`` with
    ``decode=False`` -- and rejects it by raising; the previous config then stays. It runs on
    the ``start()`` caller's thread during the replay and on the subscriber's thread after.
    Whatever it raises is a rejection, reported like any other -- ``SystemExit`` (a validator
    calling ``sys.exit``), ``KeyboardInterrupt``, any ``BaseException`` -- and the subscriber
    keeps following; except a ``KeyboardInterrupt`` or ``SystemExit`` on the main thread (a
    replay in ``start()`` called there): that is Ctrl-C, or a signal handler such as
    gunicorn's exiting the worker, and ``start()`` lets it through to stop the process. If
    the follower ever ends by anything else, ``status`` says ``stopped`` and ``:workers``
    shows the reason, so no one counts a worker that stopped following.

    Keywords (all optional):

    ``redis_url=None``
        ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL; default
        ``$HOTRELOAD_REDIS_URL``. Any node of a Redis Cluster will do: the subscriber finds
        the master of its key's slot, and finds it again after a failover.
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
    ``metrics=None``
        Prometheus metrics (``subscriber.metrics``): ``None`` records them when the process
        has imported ``prometheus_client`` by ``start()``, ``True`` always, ``False`` never.
    ``signing_key=None``
        Bytes (or a list of them, during a key rotation: old and new): accept only events
        signed with one of these keys (HMAC-SHA256, checked in constant time), the key the
        publisher reads with ``--signing-key-file``. Unsigned, forged and wrong-key entries
        are rejected and reported like malformed ones; ``start()`` raises
        ``SigningKeyMismatch`` when no entry in the history verifies. Surrounding whitespace
        of a key is ignored; at least 16 bytes. ``None``: signatures are not checked.
    ``snapshot=False``
        ``True`` subscribes to a whole-directory snapshot (``hotreload watch DIR --snapshot
        NAME``): the callback receives every key of one kubelet update as a ``dict[str, str]``
        (``dict[str, bytes]`` with ``decode=False``); ``fallback_path`` may be the directory.
    ``slow_callback=10.0``
        Seconds after which a callback still running shows: ``status`` says ``stalled``
        until it returns (``callback_seconds`` says how long it has run).
    ``shared=True``
        One connection and thread for the process's Subscribers on this Redis (``_hub``);
        a callback that blocks then delays the other keys: ``False`` gives this key its own
        (as in a Redis Cluster, where one read cannot span slots).

    Versions that arrive together (a burst, or a reconnect after an outage) are decided
    newest first: the newest one the callback accepts is applied, each rejected newer one is
    reported to ``:acks``, older ones are superseded (no callback, no ack). The end state is
    the one applying them one by one would reach. Content equal to the running config is
    acknowledged (``unchanged``) without a callback.

    Creating one does no I/O and starts no thread, so it is safe at import time before a
    fork (gunicorn ``preload_app``); call ``start()`` in each process. Introspection
    properties are thread-safe and lock-free.
    """

    _default_logger = __name__

    @staticmethod
    def _propagates(exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt | SystemExit) and (
            threading.current_thread() is threading.main_thread()
        )

    def _setup(self) -> None:
        self._lock = threading.Lock()  # guards _phase and _thread
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._pool: InterruptiblePool | None = None  # the thread's, for stop() to interrupt
        self._hub: tuple[_hub.Hub | _clusterhub.ClusterHub, Member] | None = None  # in a hub
        _register(self)

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
        joined = 0
        with self._lock:
            stopped = self._stop_event.is_set()  # stop() was called while we were starting
            if not stopped and self._shares():
                self._follow_begins()
                self._phase = "running"
                joined = self._join_hub(resync=not from_redis)
            elif not stopped:
                self._thread = threading.Thread(
                    target=self._follow,
                    # started from the fallback: resync as soon as Redis answers
                    kwargs={"resync": not from_redis},
                    name=f"hotreload-{self.key}",
                    daemon=True,
                )
                self._phase = "running"
                self._thread.start()
        if stopped:  # e.g. by the callback itself: the replay wrote "applied", say stopped
            self._write_final_state()
        elif self._hub is not None:
            self._hub[0].nudge(joined)  # a read in flight: the new key is read now
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop following and record the state ``stopped``. Idempotent and prompt: a blocked
        read is cut short; only a callback still running is waited for, at most ``timeout``
        seconds (default ``subscriber.defaults.STOP_TIMEOUT``, 5). After that ``stop()``
        returns anyway: it logs a warning naming the callback, records ``stopped`` with the
        reason, and the thread ends on its own once the callback returns."""
        with self._lock:
            if self._phase == "stopped":
                return
            self._phase = "stopped"
            self._stop_event.set()
            thread = self._thread
            shared = self._hub
        if shared is not None:
            hub, member = shared
            if hub.thread is threading.current_thread():
                return  # called from the callback: the hub completes the stop after it
            if hub.leave(member, timeout):
                self._write_final_state()
            else:
                self._gave_up(timeout)
            return
        if thread is None or thread is threading.current_thread():
            return  # never started, or called from the callback: the loop ends after it
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            self._interrupt()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._gave_up(timeout)
                return
            thread.join(min(_INTERRUPT_POLL, remaining))

    def _gave_up(self, timeout: float) -> None:
        """stop() waited ``timeout`` s in vain: say why, and record "stopped" from here."""
        reason = _reasons.gave_up(timeout, self._core.callback_name, self._core.callback_seconds())
        self._log.warning("%s: %s", self.key, reason)
        self._core.stop_reason = reason
        self._write_final_state(acks=False)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start() ------------------------------------------------------------------------

    def _shares(self) -> bool:
        """Follow in the process's hub: ``_hub``, or ``_clusterhub`` on a Redis Cluster."""
        return self._shared and _hub.ENABLED and _clusterhub.shares(self._topology)

    def _join_hub(self, *, resync: bool) -> int:
        """Join the hub (``self._lock`` held); then ``nudge`` it with what this returns."""
        hub, member, joined = _clusterhub.join_any(self, self._target, self._client_name(), resync)
        self._hub = (hub, member)
        return joined

    def _moved_to_hub(self) -> bool:
        """A key started alone (from the fallback, its URL never reached) joins the hub once
        its Redis answered as a standalone one; then its own thread ends. True if it did."""
        with self._lock:
            if self._phase != "running" or not self._shares():
                return False
            joined = self._join_hub(resync=False)
        cast("tuple[_hub.Hub, Member]", self._hub)[0].nudge(joined)
        return True

    def _initial_load(self) -> bool:
        """Apply a config: from Redis (True) or from the fallback file (False); or raise."""
        deadline = time.monotonic() + self._start_timeout
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        problem: BaseException | str
        while True:
            client: redis.Redis | None = None
            try:
                client = self._connect(self._start_socket_timeout(deadline))
                if self._replay(client, deadline):
                    return True
                problem = self._nothing_published()
            except (redis.RedisError, OSError) as exc:  # unreachable, frozen, or refusing
                problem = exc
            finally:
                _close(client)
            delay = self._start_retry_delay(problem, backoff, deadline)
            if delay is None:
                break
            time.sleep(delay)
        self._start_from_fallback(problem)
        return False

    def _replay(self, client: redis.Redis, deadline: float) -> bool:
        """Apply the newest acceptable entry; False if the stream stayed empty until deadline."""
        while True:
            walk = self._core.walk(limit=self._replay_limit)
            self._walk_history(client, walk)
            self._settle(walk)
            self._flush(client)
            if self._replayed(walk):
                return True
            batch = Batch()
            if not self._queue_first_event_wait(batch, deadline):
                return False
            _execute(client, batch, raise_on_error=True)

    # -- the background thread ------------------------------------------------------------

    def _follow(self, *, resync: bool) -> None:
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        client: redis.Redis | None = None
        lost_at: float | None = None
        moved = False  # into the hub: the key follows on there
        self._follow_begins()
        try:
            while not self._stop_event.is_set():
                try:
                    if client is None:
                        client = self._connect(self._block + SOCKET_TIMEOUT_MARGIN)
                        if self._stop_event.is_set():
                            break  # stop() may have looked for a pool before this one existed
                    if resync:
                        self._resync(client)
                        resync = False
                        if lost_at is not None:
                            self._reconnected(lost_at)
                            lost_at = None
                        if moved := self._moved_to_hub():
                            return
                    else:
                        resync = self._cycle(client)
                    backoff.reset()
                except DISCONNECTED as exc:
                    _close(client)
                    client = None
                    resync = True  # whatever happened meanwhile, even a reset, is found
                    if self._stop_event.is_set():
                        break
                    lost_at = self._connection_lost(exc, lost_at)
                    self._stop_event.wait(self._reconnect_delay(backoff))
                except redis.RedisError as exc:
                    self._command_refused(exc)
                    resync = True
                    self._stop_event.wait(backoff.next_delay())
                except Exception:  # noqa: BLE001 -- a bug must not end the thread silently
                    self._unexpected_error()
                    _close(client)
                    client = None
                    resync = True
                    self._stop_event.wait(backoff.next_delay())
        except BaseException as exc:  # noqa: BLE001 -- the thread ends: never silently
            with self._lock:
                self._phase = "stopped"
                self._stop_event.set()
            self._follower_died(exc)
        finally:
            _close(client)
            if not moved:
                self._write_final_state()

    def _hub_died(self, exc: BaseException) -> None:  # the hub's thread ended on exc
        with self._lock:
            self._phase = "stopped"
            self._stop_event.set()
        self._follower_died(exc)
        self._write_final_state()

    def _cycle(self, client: redis.Redis) -> bool:
        """One round trip: pending reports, heartbeat when due, the blocking read; True when
        the stream must be resynced (it was reset behind our position)."""
        batch = Batch()
        plan = self._queue_cycle(batch)
        resync = self._cycle_done(plan, results := _execute(client, batch))
        if (hold := hold_after(self._reports.due, self._batch_size, results[-1])) > 0:
            self._stop_event.wait(hold)  # the next read goes with them (_hubplan.held_for)
        return resync

    def _resync(self, client: redis.Redis) -> None:
        """After a (re)connect: walk back from the newest entry to where we were."""
        walk = self._resync_walk()
        self._walk_history(client, walk)
        self._settle(walk)
        self._flush(client)

    # -- I/O helpers ----------------------------------------------------------------------

    def _connect(self, socket_timeout: float) -> redis.Redis:
        """A client on the node serving the key (see ``_cluster``); our loop does the
        retrying (see ``_redis.connect``). A standalone Redis costs no extra round trip.
        Its pool becomes the one ``stop()`` interrupts, before any I/O."""
        if self._topology.sentinel:  # the master now, from the sentinels
            self._topology.node = _sentinel.master(
                self._target, timeout=self._connect_timeout(socket_timeout)
            )
        for _hop in range(MAX_HOPS):
            client = _light.connect(
                self._topology.node,
                socket_timeout=socket_timeout,
                connect_timeout=self._connect_timeout(socket_timeout),
                client_name=self._client_name(),
            )
            self._pool = cast("InterruptiblePool", client.connection_pool)
            batch = Batch()
            if not self._topology.probe(batch):
                return client
            try:
                (reply,) = _execute(client, batch)
                moved_to = self._topology.probed(reply)
            except BaseException as exc:
                _close(client)
                self._probe_failed(exc)
                raise
            if moved_to is None:
                return client
            _close(client)
        raise self._kept_moving()

    def _walk_history(self, client: redis.Redis, walk: Walk) -> None:
        """Feed ``walk`` the stream newest first, one page per round trip."""
        pages = self._history_pages()
        while True:
            batch = Batch()
            pages.queue(batch)
            (entries,) = _execute(client, batch, raise_on_error=True)
            if not pages.feed(entries, walk):
                return

    def _flush(self, client: redis.Redis) -> None:
        batch = Batch()
        writes = self._queue_reports(batch)
        if writes:
            self._reports_written(_execute(client, batch), writes)

    def _interrupt(self) -> None:
        pool = self._pool
        if pool is not None:
            pool.interrupt()

    def _write_final_state(self, *, acks: bool = True) -> None:
        """Pending acks (unless not ``acks``: they are the thread's) and the state
        "stopped", on a connection of its own: the thread's may have just been cut by
        stop()."""
        client = _light.connect(
            self._topology.node,
            socket_timeout=FINAL_WRITE_TIMEOUT,
            connect_timeout=FINAL_WRITE_TIMEOUT,
            client_name=self._client_name(),
        )
        try:
            batch = Batch()
            if acks:
                writes = self._queue_reports(batch, stopped=True)
                self._reports_written(_execute(client, batch), writes)
            else:
                self._queue_state(batch, stopped=True)
                _execute(client, batch)
        except (redis.RedisError, OSError) as exc:
            self._final_state_failed(exc)
        finally:
            client.close()


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


def stop_all(timeout: float = STOP_TIMEOUT) -> None:
    """Stop every Subscriber of this process, waiting about ``timeout`` seconds in all for
    callbacks still running (each one gets at least a second to write its final state)."""
    deadline = time.monotonic() + timeout
    for sub in all_subscribers():
        sub.stop(timeout=max(deadline - time.monotonic(), _MIN_STOP_WAIT))


@atexit.register
def _stop_all_at_exit() -> None:
    # Record "stopped" on a clean exit; a SIGKILLed worker shows up as stale instead. A
    # callback that never returns holds the exit up STOP_TIMEOUT seconds, not forever.
    stop_all()
