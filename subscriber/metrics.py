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

Under multiprocess mode the worker does not run prometheus_client to record a value:
``subscriber._promfiles`` writes the same samples into the multiprocess directory itself
(prometheus_client's code would copy 0.57-0.72 MiB of the master's pages into each worker; see
that module). The metric objects below still define the names, help and types; without
multiprocess mode they hold the values, as before.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import TYPE_CHECKING

from subscriber._promfiles import PromFiles, sample_key

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["SubscriberMetrics", "metrics_for"]

_WARM_KEY = "hotreload-warm"
_WARM_CALLS = 64  # past 3.11's warm-up (8 calls) and its specialisation counters
_APPLY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class SubscriberMetrics:
    """The process-wide set of subscriber metrics (one instance per process).

    ``own_files=False`` records through prometheus_client's objects in multiprocess mode too
    (the reference tests/test_promfiles.py compares the writer with)."""

    def __init__(self, own_files: bool = True) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values
        from prometheus_client.utils import floatToGoString

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

        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        multiprocess = getattr(values.ValueClass, "_multiprocess", False)
        self._files = (
            PromFiles(directory, values.ValueClass)
            if own_files and multiprocess and directory
            else None
        )
        # names and help as plain strings: the worker reads no prometheus_client object
        self._names = {
            name: (metric._name, metric._name + suffix, metric._documentation)
            for name, metric, suffix in (
                ("applied", self.applied, "_total"),
                ("rejected", self.rejected, "_total"),
                ("errors", self.connection_errors, "_total"),
                ("max", self.version_max, ""),
                ("min", self.version_min, ""),
                ("hist", self.apply_seconds, ""),
            )
        }
        self._bounds: list[float] = list(self.apply_seconds._upper_bounds)
        self._le = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        self._keys: dict[str, dict[str, list[bytes]]] = {}
        self._warmed = False

    def _warm(self) -> None:
        """Run the writer's code here, on throwaway files: this quickens it before the fork,
        so the workers' first writes copy fewer of its pages (CPython 3.11 specialises code in
        place after a few calls)."""
        files = self._files
        scratch_files: PromFiles | None = None
        with tempfile.TemporaryDirectory(prefix="hotreload-metrics-") as scratch:
            try:
                for n in range(_WARM_CALLS):
                    if n % 4 == 0:  # a worker's first writes (its files opened) as often
                        if scratch_files is not None:
                            scratch_files.close()
                        os.mkdir(f"{scratch}/{n}")
                        scratch_files = self._files = PromFiles(f"{scratch}/{n}", None, True)
                    self.record_applied(_WARM_KEY, n, n * 0.5)
                    self.record_rejected(_WARM_KEY)
                    self.record_connection_error(_WARM_KEY)
            finally:
                if scratch_files is not None:
                    scratch_files.close()
                self._files = files
                self._keys.pop(_WARM_KEY, None)

    def prepare(self, key: str) -> None:
        """In a gunicorn master, before the fork (``subscriber.gunicorn.pre_fork``): warm the
        writer's code and build ``key``'s sample keys, which the workers then share instead of
        quickening and allocating them among inherited pages. Not in a worker: without
        ``preload_app`` that would only cost it the warm-up's memory (+0.1 MiB measured)."""
        if self._files is not None:
            if not self._warmed:
                self._warmed = True
                self._warm()
            self._sample_keys(key)

    def _sample_keys(self, key: str) -> dict[str, list[bytes]]:
        """The multiprocess files' keys of ``key``'s samples (``mmap_key``'s JSON)."""
        found = self._keys.get(key)
        if found is None:
            labels = {"key": key}
            found = {
                name: [sample_key(metric, sample, labels, help_text)]
                for name, (metric, sample, help_text) in self._names.items()
                if name != "hist"
            }
            hist, _, hist_help = self._names["hist"]
            found["hist"] = [sample_key(hist, hist + "_sum", labels, hist_help)] + [
                sample_key(hist, hist + "_bucket", {"key": key, "le": le}, hist_help)
                for le in self._le
            ]
            self._keys[key] = found
        return found

    def record_applied(self, key: str, version: int, apply_ms: float) -> None:
        files = self._files
        if files is None:
            self.applied.labels(key).inc()
            self.apply_seconds.labels(key).observe(apply_ms / 1000.0)
        else:
            keys = self._sample_keys(key)
            files.add("counter_hotreload", keys["applied"][0], 1.0)
            files.observe("histogram_hotreload", keys["hist"], self._bounds, apply_ms / 1000.0)
        self.record_version(key, version)

    def record_version(self, key: str, version: int) -> None:
        files = self._files
        if files is None:
            self.version_max.labels(key).set(version)
            self.version_min.labels(key).set(version)
            return
        keys = self._sample_keys(key)
        if not files.set("gauge_livemax", keys["max"][0], float(version)):
            self.version_max.labels(key).set(version)  # the app's own livemax gauge holds the file
        if not files.set("gauge_livemin", keys["min"][0], float(version)):
            self.version_min.labels(key).set(version)

    def record_rejected(self, key: str, count: int = 1) -> None:
        if self._files is None:
            self.rejected.labels(key).inc(count)
        else:
            self._files.add("counter_hotreload", self._sample_keys(key)["rejected"][0], count)

    def record_connection_error(self, key: str) -> None:
        if self._files is None:
            self.connection_errors.labels(key).inc()
        else:
            self._files.add("counter_hotreload", self._sample_keys(key)["errors"][0], 1.0)


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
