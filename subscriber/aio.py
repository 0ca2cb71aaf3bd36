"""``AsyncSubscriber``: the ``Subscriber`` for asyncio apps, a task on ``redis.asyncio``.

Same constructor, semantics, reports and properties as the threaded ``Subscriber`` -- the
decisions are ``_core``'s and the I/O-free steps ``_transport``'s, shared by both -- with
``await start()`` and ``await stop()``, made for an ASGI lifespan (FastAPI, Starlette, plain
ASGI; uvicorn alone or as gunicorn's ``uvicorn.workers.UvicornWorker``: every worker process
runs the lifespan, so every worker follows on its own)::

    limits = AsyncSubscriber("limits.yaml", apply_limits, fallback_path="/etc/config/limits.yaml")

    @contextlib.asynccontextmanager
    async def lifespan(app):        # FastAPI(lifespan=lifespan), Starlette(lifespan=lifespan)
        async with limits:          # start(): the replay is done before the first request
            yield                   # stop(): records "stopped" in :workers

    # or in a plain ASGI app: on "lifespan.startup" ``await limits.start()``, on
    # "lifespan.shutdown" ``await limits.stop()``.

The callback is a plain function, ``callback(content)``, called directly in the event loop:
in ``start()`` during the replay, then in the subscriber's task. Keep it fast -- parse,
validate and swap a reference, as ``TypedConfig.apply`` does -- since the loop serves nothing
while it runs. Raising rejects the content, as with ``Subscriber``. An ``async def`` callback
is refused at construction (a ``ConfigurationError``), and a callback that returns an
awaitable anyway rejects the content with a ``TypeError``: awaiting inside a decision would
let requests observe a half-decided config. Callbacks of one subscriber never run
concurrently: the replay finishes before the task that follows is created, and that task
runs them one at a time.

What a callback raises is a rejection, ``SystemExit`` and any ``BaseException`` included (an
asyncio server handles signals through its loop, so a ``SystemExit`` in a callback is the
callback's own), and the task keeps following; only a ``KeyboardInterrupt`` on the main
thread (asyncio's second Ctrl-C) goes through, and ends the loop as it would anywhere. A
callback that never returns blocks the whole event loop, ``stop()`` included: nothing in the
loop can bound it (the heartbeat stops, so ``:workers`` soon shows the worker stale). If the
task ever ends by anything but a stop, ``status`` says ``stopped`` and ``:workers`` shows the
reason.

Differences from ``Subscriber``, all due to asyncio:

- ``start()`` and ``stop()`` are coroutines, and must run on the event loop that is to run
  the follower (``start()`` creates the task on the running loop). The instance is an async
  context manager, not a sync one.
- ``stop()`` cancels the task, which cuts a blocked ``XREAD`` short at once, then waits for
  it to write the final ``stopped`` state (with 0.5 s timeouts, so a frozen or gone Redis
  cannot hold it up); concurrent ``stop()`` calls all wait for that. When the loop is shut
  down without ``stop()`` (``asyncio.run`` cancels leftover tasks), the task still writes
  ``stopped`` as it ends. ``stop()`` awaited while ``start()`` is still replaying returns at
  once; that ``start()`` then records ``stopped`` and does not follow.
- It is not in ``all_subscribers()``/``unstarted()``: the gunicorn hooks call ``start()`` and
  ``stop()`` synchronously, which an ``AsyncSubscriber`` does not have; the lifespan starts it.
- The fallback file is read with a plain (blocking) read in ``start()``: it is a small local
  file, read once before the app serves.

Creating one does no I/O and creates no task or asyncio object, so it is safe at import time
and before a fork (gunicorn ``preload_app``). The properties are safe to read from any thread
(e.g. a sync endpoint run in a threadpool).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, cast

import redis
import redis.asyncio

from subscriber import _aioclusterhub, _aiohub, _clusterhub, _hub, _redis, _sentinel
from subscriber._aiopool import HeldPool as _HeldPool
from subscriber._aiopool import aclose as _aclose
from subscriber._aiopool import execute as _execute
from subscriber._cluster import MAX_HOPS
from subscriber._core import Callback
from subscriber._hubplan import Member
from subscriber._transport import DISCONNECTED, SubscriberBase
from subscriber._walk import Walk
from subscriber._wire import Batch
from subscriber.defaults import BACKOFF_CAP, FINAL_WRITE_TIMEOUT, SOCKET_TIMEOUT_MARGIN
from subscriber.errors import ConfigurationError

__all__ = ["AsyncSubscriber"]


class AsyncSubscriber(SubscriberBase):
    """Keeps one config key applied in this process, following it in an asyncio task.

    ``AsyncSubscriber(key, callback, **keywords)`` takes exactly the keywords of
    ``Subscriber`` (``redis_url``, ``prefix``, ``worker_id``, ``logger`` -- default
    ``logging.getLogger("subscriber.aio")`` --, ``fallback_path``, ``start_timeout``,
    ``decode``, ``block_ms``, ``heartbeat_interval``, ``replay_limit``, ``batch_size``,
    ``resync_interval``, ``metrics``, ``signing_key``, ``snapshot``, ``slow_callback``,
    ``shared`` -- one task and connection per event loop, ``_aiohub``) with the same meaning,
    and has the same properties
    (``version``, ``last_hash``, ``content``, ``last_reload_time``, ``reload_count``,
    ``error_count``, ``status``, ``worker_id``, ``started``). ``callback`` must be a plain
    (sync) function and runs in the event loop; see the module documentation.
    """

    _default_logger = __name__

    @staticmethod
    def _propagates(exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt) and (
            threading.current_thread() is threading.main_thread()
        )

    def _setup(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._hub: tuple[_aiohub.AioHub | _aioclusterhub.AioClusterHub, Member] | None = None
        self._stopping: asyncio.Future[None] | None = None  # a hub key's stop(), for all

    def _checked_callback(self, callback: Callback) -> Callback:
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)  # noqa: B004 -- an object with async __call__
        ):
            raise ConfigurationError(
                "AsyncSubscriber calls its callback synchronously in the event loop: pass a "
                "plain function (parse, validate, swap a reference), not an async one"
            )
        call = cast("Callable[[Any], object]", callback)

        def checked(content: Any) -> object:
            result = call(content)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()  # never awaited: close it rather than leak a warning
                raise TypeError(
                    "the callback returned an awaitable; AsyncSubscriber calls it "
                    "synchronously, so pass a plain function"
                )
            return result

        return checked

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> Self:
        """Replay, then follow in a task. Returns once a config is applied.

        Raises like ``Subscriber.start()``: ``NoAcceptableConfig``, ``RedisUnavailable``,
        ``InitialLoadError``. Calling it again while running does nothing.
        """
        if self._phase == "stopped":
            raise RuntimeError(f"{self.key}: this AsyncSubscriber was stopped; create a new one")
        if self._phase != "new":
            return self
        self._phase = "starting"
        try:
            self._identify()
            from_redis = await self._initial_load()
        except BaseException:
            if self._phase == "starting":
                self._phase = "new"  # a failed (or cancelled) start may be retried
            raise
        if self._stopped():  # stop() was awaited while we were starting
            await self._write_final_state()
            return self
        self._phase = "running"
        if self._shares():
            self._follow_begins()
            hub, member, joined = _aioclusterhub.join_any(
                self, self._target, self._client_name(), not from_redis
            )
            self._hub = (hub, member)
            await hub.nudge(joined)  # a read in flight: the new key is read now
            return self
        self._task = asyncio.get_running_loop().create_task(
            # started from the fallback: resync as soon as Redis answers
            self._follow(resync=not from_redis),
            name=f"hotreload-{self.key}",
        )
        self._task.add_done_callback(self._follow_ended)
        return self

    async def stop(self) -> None:
        """Stop following and record the state ``stopped``. Idempotent and prompt: the
        task is cancelled, so a blocked read is cut short."""
        first = self._phase != "stopped"
        self._phase = "stopped"
        if self._hub is not None:
            if first:
                self._stopping = asyncio.ensure_future(self._leave(*self._hub))
            if self._stopping is not None:
                await asyncio.wait({self._stopping})
            return
        task = self._task
        if task is None or task.done():
            return  # never started, still starting (start() finishes the job), or ended
        if task is asyncio.current_task():
            return  # called from within the task: the loop ends after this cycle
        if first:
            task.cancel()
        # A second, concurrent stop() waits too: when any stop() returns, the final state is
        # written. wait() neither raises the task's CancelledError nor cancels the task if
        # stop() itself is cancelled; the task then still writes the final state on its own.
        await asyncio.wait({task})
        if first and not self._follow_began:
            # cancelled before its first step (stop() right after start()): the task's
            # finally never ran, so the final state is written here
            await self._write_final_state()

    async def _leave(
        self, hub: _aiohub.AioHub | _aioclusterhub.AioClusterHub, member: Member
    ) -> None:
        if member.gone:
            return  # the hub ended it already (and recorded "stopped")
        await hub.leave(member)
        await self._write_final_state()

    def _shares(self) -> bool:
        """Follow in the loop's hub (``_aiohub``, ``_aioclusterhub``): see ``Subscriber``."""
        return self._shared and _hub.ENABLED and _clusterhub.shares(self._topology)

    def _hub_died(self, exc: BaseException) -> None:
        """The hub's task ended on ``exc``: this key stopped following, say so (the task
        records the final state)."""
        self._phase = "stopped"
        self._follower_died(exc)

    def _stopped(self) -> bool:
        # a method, not an inline test: stop() changes _phase across an await
        return self._phase == "stopped"

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- start() ------------------------------------------------------------------------

    async def _initial_load(self) -> bool:
        """Apply a config: from Redis (True) or from the fallback file (False); or raise."""
        deadline = time.monotonic() + self._start_timeout
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        problem: BaseException | str
        while True:
            client: redis.asyncio.Redis | None = None
            try:
                client = await self._connect(self._start_socket_timeout(deadline))
                if await self._replay(client, deadline):
                    return True
                problem = self._nothing_published()
            except (redis.RedisError, OSError) as exc:  # unreachable, frozen, or refusing
                problem = exc
            finally:
                await _aclose(client)
            delay = self._start_retry_delay(problem, backoff, deadline)
            if delay is None:
                break
            await asyncio.sleep(delay)
        self._start_from_fallback(problem)
        return False

    async def _replay(self, client: redis.asyncio.Redis, deadline: float) -> bool:
        """Apply the newest acceptable entry; False if the stream stayed empty until deadline."""
        while True:
            walk = self._core.walk(limit=self._replay_limit)
            await self._walk_history(client, walk)
            self._settle(walk)
            await self._flush(client)
            if self._replayed(walk):
                return True
            batch = Batch()
            if not self._queue_first_event_wait(batch, deadline):
                return False
            await _execute(client, batch, raise_on_error=True)

    # -- the task -----------------------------------------------------------------------

    _follow_began = False  # the task took its first step (its finally will run)

    async def _follow(self, *, resync: bool) -> None:
        self._follow_began = True
        backoff = _redis.Backoff(cap=BACKOFF_CAP)
        client: redis.asyncio.Redis | None = None
        lost_at: float | None = None
        moved = False  # into the loop's hub (see Subscriber._moved_to_hub)
        self._follow_begins()
        try:
            while not self._stopped():
                try:
                    if client is None:
                        client = await self._connect(self._block + SOCKET_TIMEOUT_MARGIN)
                    if resync:
                        await self._resync(client)
                        resync = False
                        if lost_at is not None:
                            self._reconnected(lost_at)
                            lost_at = None
                        # the URL answered as a standalone Redis: follow in the loop's hub
                        if moved := (self._shares() and not self._stopped()):
                            hub, member, joined = _aioclusterhub.join_any(
                                self, self._target, self._client_name(), False
                            )
                            self._hub = (hub, member)
                            await hub.nudge(joined)
                            return
                    else:
                        resync = await self._cycle(client)
                    backoff.reset()
                except DISCONNECTED as exc:
                    await _aclose(client)
                    client = None
                    resync = True  # whatever happened meanwhile, even a reset, is found
                    if self._stopped():
                        break
                    lost_at = self._connection_lost(exc, lost_at)
                    await asyncio.sleep(self._reconnect_delay(backoff))
                except redis.RedisError as exc:
                    self._command_refused(exc)
                    resync = True
                    await asyncio.sleep(backoff.next_delay())
                except Exception:  # noqa: BLE001 -- a bug must not end the task silently
                    self._unexpected_error()
                    await _aclose(client)
                    client = None
                    resync = True
                    await asyncio.sleep(backoff.next_delay())
        except asyncio.CancelledError:
            raise  # stop(), or the loop shutting down: the normal end
        except BaseException as exc:  # the task ends: never silently
            self._phase = "stopped"
            self._follower_died(exc)
            raise
        finally:
            # Also reached when cancelled (stop(), or the loop shutting down): awaiting here
            # is fine, the cancellation was delivered.
            await _aclose(client)
            if not moved:
                await self._write_final_state()

    def _follow_ended(self, task: asyncio.Task[None]) -> None:
        # Retrieve what ended the task, so a bug is logged here rather than as "exception
        # never retrieved" at garbage collection; a cancellation is the normal end.
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("%s: the follow task failed", self.key, exc_info=exc)

    async def _cycle(self, client: redis.asyncio.Redis) -> bool:
        """One round trip: pending reports, heartbeat when due, the blocking read.

        Returns True when the stream must be resynced (it was reset behind our position).
        """
        batch = Batch()
        plan = self._queue_cycle(batch)
        return self._cycle_done(plan, await _execute(client, batch))

    async def _resync(self, client: redis.asyncio.Redis) -> None:
        """After a (re)connect: walk back from the newest entry to where we were."""
        walk = self._resync_walk()
        await self._walk_history(client, walk)
        self._settle(walk)
        await self._flush(client)

    # -- I/O helpers ----------------------------------------------------------------------

    async def _connect(self, socket_timeout: float) -> redis.asyncio.Redis:
        """A client on the node serving the key (see ``_cluster``); our loop does the
        retrying (see ``_redis.connect``). A standalone Redis costs no extra round trip."""
        if self._topology.sentinel:  # the master now, from the sentinels
            self._topology.node = await _sentinel.master_async(
                self._target, timeout=self._connect_timeout(socket_timeout)
            )
        for _hop in range(MAX_HOPS):
            client = _redis.connect_async(
                self._topology.node,
                socket_timeout=socket_timeout,
                connect_timeout=self._connect_timeout(socket_timeout),
                client_name=self._client_name(),
                pool_class=_HeldPool,
            )
            batch = Batch()
            if not self._topology.probe(batch):
                return client
            try:
                (reply,) = await _execute(client, batch)
                moved_to = self._topology.probed(reply)
            except BaseException as exc:
                await _aclose(client)
                self._probe_failed(exc)
                raise
            if moved_to is None:
                return client
            await _aclose(client)
        raise self._kept_moving()

    async def _walk_history(self, client: redis.asyncio.Redis, walk: Walk) -> None:
        """Feed ``walk`` the stream newest first, one page per round trip."""
        pages = self._history_pages()
        while True:
            batch = Batch()
            pages.queue(batch)
            (entries,) = await _execute(client, batch, raise_on_error=True)
            if not pages.feed(entries, walk):
                return

    async def _flush(self, client: redis.asyncio.Redis) -> None:
        batch = Batch()
        writes = self._queue_reports(batch)
        if writes:
            self._reports_written(await _execute(client, batch), writes)

    async def _write_final_state(self) -> None:
        """Pending acks and the state "stopped", on a connection of its own: the task's
        may have just been cut by stop()."""
        client = _redis.connect_async(
            self._topology.node,
            socket_timeout=FINAL_WRITE_TIMEOUT,
            connect_timeout=FINAL_WRITE_TIMEOUT,
            client_name=self._client_name(),
            pool_class=_HeldPool,
        )
        try:
            batch = Batch()
            writes = self._queue_reports(batch, stopped=True)
            self._reports_written(await _execute(client, batch), writes)
        except (redis.RedisError, OSError) as exc:
            self._final_state_failed(exc)
        finally:
            await _aclose(client)
