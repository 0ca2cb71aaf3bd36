"""Prometheus metrics of the publisher daemon (a private registry, served by ``endpoints``).

Labels are config keys only (a bounded set); never hashes, contents or worker ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from publisher.publish import PublishResult

__all__ = ["DaemonMetrics"]

# publish -> ack spans the watcher's settle window, Redis and the worker's callback
_PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter(
            "hotreload_publishes", "New versions published, by key", ["key"], registry=r
        )
        self.skipped = Counter(
            "hotreload_publish_skips",
            "Compare-and-publish calls that found the content already published",
            ["key"],
            registry=r,
        )
        self.version = Gauge(
            "hotreload_published_version",
            "Version of the content this publisher holds, as found or written in Redis",
            ["key"],
            registry=r,
        )
        self.last_publish = Gauge(
            "hotreload_last_publish_timestamp_seconds",
            "Unix time of the last new version, by key",
            ["key"],
            registry=r,
        )
        self.behind = Counter(
            "hotreload_publish_behind",
            "Contents not published because another publisher appended one this publisher "
            "had not seen when it read its own, which may be older, by key",
            ["key"],
            registry=r,
        )
        self.errors = Counter(
            "hotreload_publish_errors",
            "Publishes that failed, by key and reason (too_large, unreadable, redis)",
            ["key", "reason"],
            registry=r,
        )
        self.redis_up = Gauge(
            "hotreload_redis_connected", "1 while Redis is reachable, else 0", registry=r
        )
        self.reconnects = Counter(
            "hotreload_redis_reconnects", "Times the connection to Redis was lost", registry=r
        )
        self.rejections = Counter(
            "hotreload_worker_rejections",
            "Rejections reported by workers on :acks, by key",
            ["key"],
            registry=r,
        )
        self.workers = Gauge(
            "hotreload_workers",
            "Live workers by key and state (converged, behind, rejected)",
            ["key", "state"],
            registry=r,
        )
        self.floor_from_workers = Gauge(
            "hotreload_floor_from_workers",
            "1 while the daemon reads a key's :workers for each publish's floor (a row of a "
            "worker that does not write :floor), 0 while the publish script reads :floor; "
            "set by each sweep",
            ["key"],
            registry=r,
        )
        self.propagation = Histogram(
            "hotreload_propagation_seconds",
            "Time from publish to a worker's applied ack, by key",
            ["key"],
            buckets=_PROPAGATION_BUCKETS,
            registry=r,
        )

        self.rollout = Counter(
            "hotreload_rollout_events",
            "Rollout entries this daemon wrote, by key and event (canary, promoted, halted, "
            "rolled_back) and operations refused because the key moved on (refused)",
            ["key", "event"],
            registry=r,
        )

    def record_publish(self, result: PublishResult) -> None:
        self.version.labels(result.key).set(result.version)
        if result.written:
            self.published.labels(result.key).inc()
            self.last_publish.labels(result.key).set_to_current_time()
        else:
            self.skipped.labels(result.key).inc()
        if result.behind:
            self.behind.labels(result.key).inc()
