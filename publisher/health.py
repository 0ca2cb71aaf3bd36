"""What the daemon answers on ``/healthz`` and ``/readyz`` (served by ``publisher.endpoints``).

The two probes ask different questions, so they read different parts:

- healthy: are the watchers alive and resyncing? A resync older than a few intervals means
  a watcher's thread is wedged, which only a restart cures. Redis is deliberately ignored: a
  Redis outage must not get the watcher restarted (it keeps the newest content and publishes
  it when Redis returns).
- ready: is the config published? Redis reachable and accepting writes (``refusing``: Redis
  at maxmemory refuses a publish even after every history gave way, ``publisher.publish``)
  and the initial publish done, as the publishing loop reports them, and no key of the
  mounts left out because it cannot be read and was never published (``blocked``, from
  ``publisher.intake``): workers would find nothing for it.

The answers are read by the HTTP server's thread while the publishing loop and the watchers
write, on every probe (no caching, so a probe sees the state of the moment; it is cheap):
plain attributes and the watchers' own thread-safe properties, no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

__all__ = ["Health"]


class _Watched(Protocol):
    """What health needs of a ``MountWatcher``."""

    @property
    def directory(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    @property
    def last_resync(self) -> float: ...


class Health:
    """The probes' answers as ``(ok, one-line reason)`` (``publisher.endpoints.Check``).

    ``watchers`` is the daemon's list, filled as they start; the loop sets
    ``redis_connected`` and ``initial_publish_done``.
    """

    def __init__(
        self,
        watchers: Sequence[_Watched],
        *,
        resync_interval: float,
        blocked: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self.watchers = watchers
        self.resync_interval = resync_interval
        self.blocked = blocked
        self.redis_connected = False
        self.refusing = ""  # why Redis refuses writes ("OOM ..."); "" when it accepts them
        self.initial_publish_done = False
        self._started_at = time.monotonic()

    def healthy(self) -> tuple[bool, str]:
        """Watchers alive and resyncing; Redis does not matter here."""
        if not self.watchers:
            return False, "watchers not started"
        # a resync older than a few intervals means its thread is wedged
        limit = 3 * self.resync_interval + 5
        for watcher in self.watchers:
            if not watcher.alive:
                return False, f"watcher of {watcher.directory} is dead"
            last = watcher.last_resync or self._started_at
            if time.monotonic() - last > limit:
                return False, f"watcher of {watcher.directory} has not resynced for {limit:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """The config is in Redis: Redis reachable and the initial publish done."""
        if not self.redis_connected:
            return False, "Redis is not reachable"
        refusing = self.refusing
        if refusing:
            return False, f"Redis refuses writes: {refusing}"
        if not self.initial_publish_done:
            return False, "initial publish not done yet"
        blocked = self.blocked()
        if blocked:
            name, why = next(iter(sorted(blocked.items())))
            more = f" (and {len(blocked) - 1} more keys)" if len(blocked) > 1 else ""
            return False, f"{name} {why}: never published{more}"
        return True, "ok"
