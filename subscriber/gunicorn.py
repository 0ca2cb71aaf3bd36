"""gunicorn server hooks: every worker starts its subscribers after the fork, before serving.

In ``gunicorn.conf.py``::

    from subscriber.gunicorn import child_exit, post_worker_init, worker_exit

    preload_app = True  # works: creating a Subscriber does no I/O and starts no thread

The app creates its ``Subscriber`` objects at import time. ``post_worker_init`` runs in each
worker after it loaded the app (and, for gevent workers, after monkey-patching) and starts, in
that worker, every subscriber not yet started -- synchronously, so the worker's first request
already sees the replayed config. A subscriber that cannot start (no acceptable config, Redis
unreachable and no fallback file) makes the worker fail to boot with one clear log line;
gunicorn then stops, and Kubernetes restarts the container. Give ``fallback_path=`` (the
mounted file) to keep serving through a Redis outage at boot instead.

``worker_exit`` stops the worker's subscribers (their state in ``:workers`` becomes
``stopped``); ``child_exit`` runs in the master and, in Prometheus multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), marks the dead worker so its live gauges disappear.

Async apps (uvicorn workers) start an ``AsyncSubscriber`` in their ASGI lifespan instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

from subscriber.client import stop_all, unstarted

__all__ = ["child_exit", "post_worker_init", "worker_exit"]


def post_worker_init(worker: Any) -> None:
    """Start this worker's subscribers (replay included) before it accepts requests."""
    for subscriber in unstarted():
        began = time.perf_counter()
        try:
            subscriber.start()
        except Exception as exc:
            worker.log.error(
                "hotreload: worker %s cannot start the %r subscriber, failing the boot: %s",
                worker.pid,
                subscriber.key,
                exc,
            )
            raise
        worker.log.info(
            "hotreload: %r at version %d (%s) in %.1f ms",
            subscriber.key,
            subscriber.version,
            subscriber.status,
            (time.perf_counter() - began) * 1000,
        )


def worker_exit(server: Any, worker: Any) -> None:
    """Stop this worker's subscribers; the operator then sees it as gone, not stale. A
    callback that never returns holds this up ``STOP_TIMEOUT`` seconds (5), not for the
    whole graceful timeout."""
    stop_all()


def child_exit(server: Any, worker: Any) -> None:
    """In the master: drop a dead worker's live gauges (Prometheus multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
