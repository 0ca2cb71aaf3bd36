"""Which workers count: live, stale or gone, judged on Redis' clock (one rule for everyone:
``status``, ``wait`` and the daemon's canary decisions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

from subscriber.defaults import MIN_HEARTBEAT_INTERVAL, STALE_AFTER_BEATS

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["Liveness", "liveness", "server_now_ms"]

Liveness = Literal["live", "stale", "gone"]


class _Beating(Protocol):
    @property
    def status(self) -> str: ...
    @property
    def heartbeat(self) -> int: ...
    @property
    def heartbeat_interval(self) -> float: ...


def liveness(state: _Beating, now_ms: int) -> Liveness:
    """Live, stale or gone: the one rule for which workers count (see the module docstring)."""
    if state.status == "stopped":
        return "gone"
    interval_ms = max(state.heartbeat_interval, MIN_HEARTBEAT_INTERVAL) * 1000
    return "live" if now_ms - state.heartbeat <= STALE_AFTER_BEATS * interval_ms else "stale"


def server_now_ms(client: AnyRedis) -> int:
    # Redis' clock, not ours: the CLI may run on a laptop through a port-forward whose clock
    # is off, while workers and their Redis share a node (or an NTP-synced cluster).
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
