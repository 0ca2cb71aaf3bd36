"""Prometheus metrics of subscribers, optional and lazy.

Nothing here is imported unless metrics are on. ``Subscriber(metrics=None)`` (the default)
turns them on only when the process already imported ``prometheus_client`` -- i.e. the app
exposes Prometheus metrics itself -- so a worker that does not use Prometheus never pays for
it. ``metrics=True`` forces them on, ``False`` off.

The metrics live in ``prometheus_client``'s default registry and work in a plain process and
under gunicorn's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``; call
``subscriber.gunicorn.child_exit`` in the master so dead workers' gauges disappear). Labels are
config keys only: never hashes, contents or worker ids.

=============================================  =========  =====================================
name                                           type       meaning
=============================================  =========  =====================================
hotreload_subscriber_applied_total{key}        counter    versions applied by the callback
hotreload_subscriber_rejected_total{key}       counter    versions rejected (callback, hash, format)
hotreload_subscriber_version_max{key}          gauge      highest version applied by a live worker
hotreload_subscriber_version_min{key}          gauge      lowest version applied by a live worker
hotreload_subscriber_apply_seconds{key}        histogram  time spent in the callback
hotreload_subscriber_connection_errors_total   counter    connections to Redis lost, by key
=============================================  =========  =====================================

``version_min`` below ``version_max`` means some live worker of this pod is behind (or
rejected the newest); under multiprocess mode the two gauges are aggregated over live workers
(``livemin``/``livemax``), in a single process they are equal.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["SubscriberMetrics", "metrics_for"]

_APPLY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class SubscriberMetrics:
    """The process-wide set of subscriber metrics (one instance per process)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.applied: Counter = Counter(
            "hotreload_subscriber_applied", "Versions applied by the callback", ["key"]
        )
        self.rejected: Counter = Counter(
            "hotreload_subscriber_rejected",
            "Versions rejected (callback raised, hash mismatch, malformed entry)",
            ["key"],
        )
        self.version_max: Gauge = Gauge(
            "hotreload_subscriber_version_max",
            "Highest config version applied by a live worker",
            ["key"],
            multiprocess_mode="livemax",
        )
        self.version_min: Gauge = Gauge(
            "hotreload_subscriber_version_min",
            "Lowest config version applied by a live worker",
            ["key"],
            multiprocess_mode="livemin",
        )
        self.apply_seconds: Histogram = Histogram(
            "hotreload_subscriber_apply_seconds",
            "Time spent in the config callback",
            ["key"],
            buckets=_APPLY_BUCKETS,
        )
        self.connection_errors: Counter = Counter(
            "hotreload_subscriber_connection_errors",
            "Connections to Redis lost (each followed by a reconnect)",
            ["key"],
        )

    def record_applied(self, key: str, version: int, apply_ms: float) -> None:
        self.applied.labels(key).inc()
        self.apply_seconds.labels(key).observe(apply_ms / 1000.0)
        self.record_version(key, version)

    def record_version(self, key: str, version: int) -> None:
        self.version_max.labels(key).set(version)
        self.version_min.labels(key).set(version)

    def record_rejected(self, key: str, count: int = 1) -> None:
        self.rejected.labels(key).inc(count)

    def record_connection_error(self, key: str) -> None:
        self.connection_errors.labels(key).inc()


_lock = threading.Lock()
_instance: SubscriberMetrics | None = None


def metrics_for(setting: bool | None) -> SubscriberMetrics | None:
    """The process's metrics if ``setting`` asks for them (``None``: if Prometheus is in use)."""
    global _instance  # noqa: PLW0603 -- one registration per process, created on first use
    if setting is False or (setting is None and "prometheus_client" not in sys.modules):
        return None
    with _lock:
        if _instance is None:
            _instance = SubscriberMetrics()
        return _instance
