"""``hotreload watch``: one process per pod turning file changes into versioned events.

Watchers (one per mount directory) report content changes from their own threads; the
publishing loop, on the caller's thread, runs compare-and-publish for every key whose newest
content is not yet known to be in Redis. The daemon is the wiring of small parts, each with
one job, and that loop:

- ``publisher.plan``: what to watch and publish, decided and validated before anything runs;
- ``publisher.intake``: the mailbox between watchers and loop (newest content per key, the
  keys pending, the wake-up);
- ``publisher.keyfile``: the signing key file, re-read when kubelet swaps it;
- ``publisher.upkeep``: the periodic stream, slot-owner and old-worker checks;
- ``publisher.release``, ``publisher.rollout``: how a content reaches the workers (canary,
  promotion, halt, rollback; ``publisher.control``: the operators' requests);
- ``publisher._link``: the Redis client and the ``Publisher`` on it;
- ``publisher.health``, ``publisher.endpoints``, ``publisher.metrics``,
  ``publisher.ackwatch``: what the daemon reports.

The loop is what gives the behaviour Redis failures need:

- while Redis is away, files keep being watched and only the newest content per key is kept,
  so the first publish after Redis returns is the current config, not every intermediate one;
- after every (re)connection every key is compare-and-published again: a Redis that restarted
  empty (or lost its AOF tail) holds the current config again within one check interval;
- backoff is capped and jittered, never a spin.

Redis Cluster (``subscriber._redis.connect_any``: the URL may name any node): the client is
redis-py's cluster client, made on the first connection. Each key's events go to its slot's
master (the ``{KEY}`` hash tag keeps the script's keys in one slot). The cluster's own errors
that outlast the client's retry (CLUSTERDOWN, TRYAGAIN, MASTERDOWN, a slot not served, no
node reachable) count as a lost connection: reconnect, then re-seed every key, which puts
back what a failover lost (replication is asynchronous).

Sensitive keys are published with ``sensitive=1`` (see ``publisher.plan``). Content is never
logged, sensitive or not: only names, versions, sizes and hash prefixes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import redis
from redis.exceptions import OutOfMemoryError

from publisher._earlyfloor import EarlyFloor
from publisher._link import CONNECTION_ERRORS, Link
from publisher._printable import printable
from publisher._publog import log_publish
from publisher._restored import FirstPublish
from publisher._rolloutwire import CanaryPolicy
from publisher.ackwatch import AckFollower
from publisher.control import Control
from publisher.endpoints import EndpointServer
from publisher.health import Health
from publisher.intake import Intake, KeyState
from publisher.keyfile import SigningKeyFile
from publisher.metrics import DaemonMetrics
from publisher.plan import Plan
from publisher.publish import DEFAULT_HISTORY, PublishConflict, Publisher, PublishResult
from publisher.release import Release
from publisher.rollout import Rollout
from publisher.upkeep import Upkeep
from publisher.watcher import MountContent, MountWatcher
from subscriber._redis import Backoff, describe_failure
from subscriber._target import redacted
from subscriber.defaults import DEFAULT_FORGET_WORKERS_AFTER, DEFAULT_PREFIX
from subscriber.errors import ContentTooLarge
from subscriber.keys import stream_keys

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["Daemon"]

logger = logging.getLogger(__name__)

# Errors after which the connection is presumed gone: reconnect, then re-seed every key. In a
# Redis Cluster also what outlasts the client's retry: CLUSTERDOWN / MASTERDOWN (a failover
# under way), TRYAGAIN, a redirect loop, a slot no node serves or no node reachable
# (``RedisClusterException``, SlotNotCoveredError among them); re-seeding then restores what
# the failover lost. READONLY: the node became a replica.
_CONNECTION_ERRORS = CONNECTION_ERRORS


class Daemon:
    """Watches ``paths`` and publishes each key's content to Redis until ``request_stop``.

    Settings (keyword arguments):

    - ``redis_url``: where to publish (``redis://``, ``rediss://``, ``unix://``).
    - ``prefix`` (``"hotreload"``): the first part of every Redis key.
    - ``history`` (100): events kept per key (approximate trimming).
    - ``settle`` (0.1 s), ``resync_interval`` (30 s): passed to each ``MountWatcher``.
    - ``check_interval`` (1 s): how often Redis and the streams are checked while idle.
    - ``metrics_port`` (0): serve ``/metrics``, ``/healthz``, ``/readyz`` there; 0 disables.
    - ``forget_workers_after`` (3600 s): remove a worker's entry from ``:workers`` once it has
      not sent a heartbeat for this long (stopped, SIGKILLed, or of a pod long gone), so the
      hash does not grow with every worker restart and rollout; 0 keeps every entry.
    - ``on_publish``: called with every ``PublishResult`` (written or not).
    - ``signing_key_file``: sign every event with the key in this file, re-read when it
      changes (``ConfigurationError`` if it cannot be read or is too short at start).
    - ``sensitive``: keys published as sensitive, besides those of memory-backed mounts.
    - ``snapshots``: snapshot key name -> directory: each directory is also published as one
      key whose content is its whole key -> value map (see ``publisher.intake``). A
      directory may be a PATH too (its keys are then published one by one as well) or not.
    - ``canary``: publish each new content to a canary audience first and promote or halt
      it (``publisher.rollout``); ``None``: to everyone at once. Either way the daemon
      honours rollback pins and carries out ``:control`` requests (``publisher.control``).

    Everything that cannot work raises here (``ConfigurationError``, ``ValueError``), before
    ``run`` watches or connects.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        redis_url: str,
        prefix: str = DEFAULT_PREFIX,
        history: int = DEFAULT_HISTORY,
        settle: float = 0.1,
        resync_interval: float = 30.0,
        check_interval: float = 1.0,
        metrics_port: int = 0,
        forget_workers_after: float = DEFAULT_FORGET_WORKERS_AFTER,
        on_publish: Callable[[PublishResult], None] | None = None,
        signing_key_file: str | os.PathLike[str] | None = None,
        sensitive: Collection[str] = (),
        snapshots: Mapping[str, str | os.PathLike[str]] | None = None,
        canary: CanaryPolicy | None = None,
    ) -> None:
        stream_keys("probe", prefix)  # validates the prefix before anything starts
        self.plan = Plan.make(paths, snapshots=snapshots, sensitive=sensitive)
        self._key_file = (
            SigningKeyFile(signing_key_file, self.plan) if signing_key_file is not None else None
        )
        self._upkeep = Upkeep(
            prefix=prefix, check_interval=check_interval, forget_workers_after=forget_workers_after
        )
        self.redis_url = redis_url
        self._said_url = redacted(redis_url)  # for the logs: once, not at every step (~60 us)
        self.prefix = prefix
        self.settle = settle
        self.resync_interval = resync_interval
        self.metrics_port = metrics_port
        self.on_publish = on_publish
        self.metrics = DaemonMetrics()
        self._watchers: list[MountWatcher] = []
        self._intake = Intake(
            self.plan, lambda key, reason: self.metrics.errors.labels(key, reason).inc()
        )
        self._health = Health(
            self._watchers, resync_interval=resync_interval, blocked=self._intake.blocked
        )
        self._rollout = Rollout(
            prefix=prefix,
            policy=canary,
            on_event=lambda key, event: self.metrics.rollout.labels(key, event).inc(),
        )
        self._release: Release = self._rollout
        self._control = Control(
            redis_url, self._intake.names, prefix=prefix, wake=self._intake.wake
        )
        self._next_rollout_check = 0.0
        self._link = Link(
            redis_url,
            prefix=prefix,
            history=history,
            signing_key=lambda: self._key_file.key if self._key_file is not None else None,
        )
        self._stop = threading.Event()
        self._said_failed: dict[str, str] = {}  # key -> the publish failure logged last
        self._said_rollout = ""  # the canary judging failure logged last
        self._early = EarlyFloor(prefix)  # floors asked for while kubelet writes
        self._first = FirstPublish(prefix)  # first publishes waiting for the workers' rows
        # held by the loop for all it does, and by a watcher publishing a swap (_delivered)
        self._busy = threading.Lock()
        self._idle: tuple[AnyRedis, Publisher] | None = None  # the loop waits, all published
        self._connected = False
        self._lost: Exception | None = None  # a connection error met in _delivered
        self._setup_error = ""  # the last connection failure logged as an error
        self._backoff = Backoff(base=0.2, cap=3.0)

    @property
    def keys(self) -> Mapping[str, KeyState]:
        """What the daemon knows of each key (a live view; see ``publisher.intake``)."""
        return self._intake.keys

    def key_names(self) -> list[str]:
        return self._intake.names()

    def healthy(self) -> tuple[bool, str]:
        """The answer to ``/healthz`` (see ``publisher.health``)."""
        return self._health.healthy()

    def ready(self) -> tuple[bool, str]:
        """The answer to ``/readyz`` (see ``publisher.health``)."""
        return self._health.ready()

    def request_stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler or another thread)."""
        self._stop.set()
        self._intake.wake()

    def run(self) -> None:
        """Start the watchers, then publish until ``request_stop()``; stops everything."""
        endpoints: EndpointServer | None = None
        acks: AckFollower | None = None
        try:
            if self.metrics_port:
                endpoints = EndpointServer(
                    self.metrics_port,
                    registry=self.metrics.registry,
                    healthy=self._health.healthy,
                    ready=self._health.ready,
                )
                endpoints.start()
            self._start_watchers()
            if self._key_file is not None:
                self._key_file.start(
                    self._signing_key_changed,
                    settle=self.settle,
                    resync_interval=self.resync_interval,
                )
            for directory, fstype in sorted(self.plan.secret_dirs.items()):
                logger.info(
                    "%s is on %s (a Secret, projected or downwardAPI volume): its keys are "
                    "published as sensitive",
                    directory,
                    fstype,
                )
            if endpoints is not None:
                # after the watchers: it knows the keys at once, so it follows their acks
                # from before the first publish
                acks = AckFollower(
                    self.redis_url, self._intake.names, self.metrics, prefix=self.prefix
                )
                acks.start()
            self._control.start()
            self._loop()
        finally:
            if endpoints is not None:
                endpoints.stop()
            if acks is not None:
                acks.stop()
            self._control.stop()
            for watcher in self._watchers:
                watcher.stop()
            if self._key_file is not None:
                self._key_file.stop()
            self._early.close()
            self._link.close()
            logger.info("stopped")

    def _start_watchers(self) -> None:
        for directory, keys in self.plan.watches():
            watcher = MountWatcher(
                directory,
                lambda content, d=directory: self._delivered(d, content),  # type: ignore[misc]
                keys=keys,
                settle=self.settle,
                resync_interval=self.resync_interval,
                on_version_coming=lambda d=directory: self._coming(d),  # type: ignore[misc]
                swaps_on_event=True,  # _delivered then runs on the thread that saw the rename
            )
            initial = watcher.start()
            self._watchers.append(watcher)
            self._intake.accept(directory, initial)
            names = self.plan.snapshots_of.get(directory, ())
            logger.info(
                "watching %s (%s%s)",
                printable(directory, limit=None),
                ", ".join(printable(name, limit=None) for name in sorted(initial.files))
                or "no keys yet",
                "".join(f"; as snapshot {printable(name, limit=None)}" for name in names),
            )

    def _signing_key_changed(self, key: bytes) -> None:
        """A new signing key (from the key file's watcher thread): sign with it from now on and
        publish every key again, so subscribers that hold only the new key can start."""
        self._link.set_signing_key(key)
        self._intake.mark()

    def _rollout_due(self, client: AnyRedis, publisher: Publisher) -> bool:
        """Judge running canaries; a promotion or halt Redis refuses (OOM, no version left)
        is said and tried again at the next check, never raised into the loop."""
        try:
            running = self._rollout.due(client, publisher, self._intake.names())
            self._said_rollout = ""
            return running
        except _CONNECTION_ERRORS:
            raise
        except (redis.ResponseError, PublishConflict) as exc:
            said, self._said_rollout = self._said_rollout == str(exc), str(exc)
            level = logging.DEBUG if said else logging.ERROR  # once per reason
            logger.log(level, "judging canaries failed: %s; trying again", exc)
            return True

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        self._backoff = Backoff(base=0.2, cap=3.0)
        try:
            while not self._stop.is_set():
                with self._busy:
                    self._idle = None
                    delay = self._step()
                    if delay is None and not self._intake.has_pending():
                        self._idle = self._link.get()  # connected: made by the step
                if delay is not None:
                    self._stop.wait(delay)
                elif not self._intake.has_pending():
                    due = min(self._upkeep.next_check, self._next_rollout_check)
                    due = min(due, self._first.next_check)  # a first publish waiting
                    self._intake.wait(max(0.0, due - time.monotonic()))
        finally:
            with self._busy:
                self._idle = None  # no swap published on a watcher's thread from now on

    def _step(self) -> float | None:
        """One round of the loop (with ``_busy`` held); a backoff delay, or None."""
        url = self._said_url
        try:
            if self._lost is not None:  # met publishing on a watcher's thread
                lost, self._lost = self._lost, None
                raise lost
            client, publisher = self._link.get()
            if not self._connected:
                self._upkeep.connected(client, self._intake.names())
                self._connected = True
                self._set_connected(True)
                logger.info("connected to Redis at %s; publishing every key", url)
                self._intake.mark()
                self._early.forget()
                self._first.reset()
            if due := self._first.due():
                self._intake.mark(due)
            self._early.ready(client)
            self._early.read(client, self._intake.take_coming())  # what send could not ask
            if not self._publish_pending(client, publisher):
                return self._backoff.next_delay()
            self._backoff.reset()
            done = not (self._intake.has_pending() or self._first.waiting)
            if done and not self._health.initial_publish_done:
                self._health.initial_publish_done = True
                logger.info("initial publish done (%d keys)", len(self._intake.keys))
            again = self._upkeep.due(client, self._intake.names(), publisher.highest_version)
            self._early.cover(self._upkeep.swept)  # before publishing what due() names
            for name, covered in self._upkeep.swept.items():
                self.metrics.floor_from_workers.labels(name).set(0 if covered else 1)
            if again:
                self._intake.mark(again)
            self._control.run(client, publisher, self._rollout)
            if time.monotonic() >= self._next_rollout_check:
                running = self._rollout_due(client, publisher)
                # a canary running: judged 4 times as often (a promotion sooner after
                # its proof heartbeat); else at the next stream check, in its wake-up
                # (set a moment after it, it woke an idle loop twice a second)
                self._next_rollout_check = (
                    time.monotonic() + self._upkeep.check_interval / 4
                    if running
                    else self._upkeep.next_check
                )
        except _CONNECTION_ERRORS as exc:
            if self._connected:
                logger.warning("lost Redis at %s: %s; retrying", url, exc)
                self.metrics.reconnects.inc()
            elif (reason := describe_failure(exc, self.redis_url)) != str(exc):
                # TLS verification and the like: a wrong setup, not a Redis still
                # starting; said once per distinct reason, retried all the same
                if reason != self._setup_error:
                    logger.error("cannot connect to Redis at %s: %s", url, reason)
                    self._setup_error = reason
            else:
                logger.debug("Redis at %s still unreachable: %s", url, exc)
            self._connected = False
            self._set_connected(False)
            self._link.disconnect()
            return self._backoff.next_delay()
        return None

    def _delivered(self, directory: str, mount: MountContent) -> None:
        """A watcher's report (on its thread). A kubelet swap that finds the loop idle --
        connected, nothing pending, the last publish through -- is published right here,
        with ``_busy`` held as the loop holds it for everything it does: no hand-off to the
        loop (its wake-up was 0.17-0.35 ms of the 1.1-1.7 from the rename to the entry,
        ``tests.benchmarks.trace_publish``). Anything else, and any failure here, goes to the
        loop as before: the key stays pending until a publish of its content went through."""
        if mount.target is None or not self._busy.acquire(blocking=False):
            self._intake.accept(directory, mount)
            return
        try:
            link = self._idle
            if link is None or self._stop.is_set():
                self._intake.accept(directory, mount)
                return
            self._intake.accept(directory, mount, wake=False)
            waiting = self._first.next_check
            try:
                done = self._publish_pending(*link)
            except _CONNECTION_ERRORS as exc:  # the loop's: reconnect, re-seed every key
                self._lost, done = exc, False
            except Exception as exc:  # noqa: BLE001 - the loop meets it again, and says it
                logger.debug("publishing %s's swap on its watcher's thread: %s", directory, exc)
                done = False
            if not done:
                self._idle = None
                self._intake.wake()  # the loop retries (and backs off, reconnects) as ever
            elif self._first.next_check < waiting:  # a first publish deferred: the idle
                self._intake.wake()  # loop's wait, computed before, ends at its recheck
        finally:
            self._busy.release()

    def _coming(self, directory: str) -> None:
        """Kubelet writes a new version of ``directory`` (watchdog's thread): ask for its
        keys' workers' floors now, so that the swap's publish finds them read; where that
        cannot be done (a cluster, many workers), the loop is woken to read them."""
        if not self._early.send(self._intake.names_in(directory)):
            self._intake.coming(directory)

    def _set_connected(self, connected: bool) -> None:
        self._health.redis_connected = connected
        self.metrics.redis_up.set(1 if connected else 0)

    def _floor(self, client: AnyRedis, name: str) -> int:
        """The highest version ``name``'s workers have seen: asked for or read while kubelet
        wrote its swap (``publisher._earlyfloor``), else read now. Either read is a moment
        before the publish, and the floor only matters when the stream is behind what the
        workers saw (Redis lost data): a version seen meanwhile was in the stream, which the
        script numbers above anyway."""
        return self._early.floor(client, name)

    def _publish_pending(self, client: AnyRedis, publisher: Publisher) -> bool:
        """Publish every pending key above what its workers have seen (``publisher._floor``:
        this daemon may have restarted with a Redis that came back older, and remember
        nothing); False if Redis refused some (retried after a backoff)."""
        refused_by_redis, refusing = False, ""
        for name in self._intake.pending():
            newest = self._intake.newest(name)
            if newest is None:  # refused as too large before, unchanged since: no wait
                self._first.forget(name)  # (left waiting, its past recheck spun the loop)
                continue
            if name in publisher.highest_version:
                self._first.forget(name)  # written meanwhile (a :control request, a canary)
            elif self._first.holds(client, name):
                self._intake.done(name, newest.sha256)  # waits: due() names it again
                continue
            # the stream as known before the content was read (docs/design.md "Behind")
            seen = self._intake.seen(name, newest.sha256, self._early.seen)
            # and above the newest where a worker's version there is another content (upkeep)
            renumbered = self._upkeep.renumbered
            wrote = max(publisher.highest_version.get(name, 0), renumbered.pop(name, 0))
            try:
                result = self._release.publish(
                    publisher,
                    name,
                    newest.content,
                    sensitive=self.plan.is_sensitive(name, newest.directory),
                    sha256=newest.sha256,  # hashed on intake: not again for every publish
                    # above what workers saw and what this daemon wrote: a stream that came
                    # back older is written above both, even where it carries the content
                    above=max(self._floor(client, name), wrote),
                    seen=seen,
                )
            except ContentTooLarge as exc:
                logger.error("%s; version %d stays the newest", exc, newest.version)
                self.metrics.errors.labels(name, "too_large").inc()
                self._intake.refused(name, newest.sha256)
                continue
            except _CONNECTION_ERRORS:
                raise  # READONLY, CLUSTERDOWN, ... are ResponseErrors too: reconnect, re-seed
            except (redis.ResponseError, PublishConflict) as exc:  # e.g. OOM: retried later
                # said once per key and reason (retried every few seconds until it goes
                # through: /readyz and the metric tell it meanwhile)
                said = self._said_failed.get(name) == str(exc)
                logger.log(
                    logging.DEBUG if said else logging.ERROR, "publishing %s failed: %s", name, exc
                )
                self._said_failed[name] = str(exc)
                self.metrics.errors.labels(name, "redis").inc()
                refused_by_redis = True
                if isinstance(exc, OutOfMemoryError):  # even after history gave way
                    refusing = f"OOM {exc}"
                continue
            self._said_failed.pop(name, None)
            self._intake.published(name, result.version, newest.sha256, result.behind)
            self.metrics.record_publish(result)
            log_publish(result)
            if self.on_publish is not None:
                self.on_publish(result)
            self._intake.done(name, newest.sha256)
        self._health.refusing = refusing  # told by /readyz (publisher.health)
        return not refused_by_redis
