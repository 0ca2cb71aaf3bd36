"""gunicorn server hooks: every worker starts its subscribers after the fork, before serving.

In ``gunicorn.conf.py``::

    from subscriber.gunicorn import child_exit, post_worker_init, pre_fork, worker_exit

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

Memory (issue 21). Under ``preload_app`` a worker shares the master's pages until it writes
to them, and CPython 3.11 writes to an object whenever it touches it: a reference count, a
function's first calls (warm-up counter, then its bytecode is specialised in place), and every
collection of the oldest generation writes the header of every container it scans. Measured
(tests/benchmarks/bench_gunicorn.py, 4 sync workers, USS = private pages, after a full
collection, which every long-running worker makes sooner or later): the example app's worker
held 18.4 MiB private, 15.6 MiB of it for an app that imports ``subscriber`` and starts
nothing, the full collection having copied the imported heap. Hence:

- ``gc.freeze()``: the workers' collections skip the objects inherited from the master. Done
  by ``pre_fork`` in the master and, for a conf without ``pre_fork``, at the top of
  ``post_worker_init`` when the app is preloaded (as good, measured: the freeze moves whole
  generation lists and touches no object). -10 MiB private per worker after a full collection.
- ``pre_fork`` also fills, once in the master, the caches a worker's first ``start()`` would
  fill on its own and keep (each cost is the pages its code touches in a fork): redis-py's
  own version, which it reads from the package metadata for ``CLIENT SETINFO`` (-1.7 to
  -2.2 MiB: importlib.metadata, the email parser, regexes), its response-callback table,
  OpenSSL's SHA-256 and the subscribers' metric families.
- What is left (about 3.8 MiB for the example's two subscribers, +45 KiB per further key) is
  the pages a worker's first run of ~350 functions writes (connect, replay, decode, the
  callback, the follower): code that has never run in the master. Running it there would mean
  a Redis round trip in the master, which holds no connection by design. The follower
  thread's stack is 8 MiB of address space of which 12 KiB is resident: a smaller
  ``threading.stack_size`` would save nothing, and callbacks run on that thread.

Async apps (uvicorn workers) start an ``AsyncSubscriber`` in their ASGI lifespan instead.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import msgspec

from subscriber import _redis
from subscriber.client import stop_all, unstarted
from subscriber.metrics import metrics_for
from subscriber.protocol import Event, sha256_hex

__all__ = ["child_exit", "post_worker_init", "pre_fork", "worker_exit"]

# Nothing listens there: the client _prepare() builds is never used, only built.
_NOWHERE = "unix:///nonexistent/hotreload-pre-fork.sock"
_prepared = False


def pre_fork(server: Any, worker: Any) -> None:
    """In the master, before each fork: fill once the caches every worker would fill on its
    own, then ``gc.freeze()``, so the workers share what the master imported."""
    global _prepared  # noqa: PLW0603 -- once per master
    if not _prepared:
        _prepared = True
        try:
            _prepare()
        except Exception as exc:  # noqa: BLE001 -- an optimisation must not stop the forks
            log = getattr(server, "log", None)
            if log is not None:
                log.warning("hotreload: pre_fork left the workers' caches to them: %r", exc)
    gc.freeze()


def _prepare() -> None:
    """What a worker's first ``start()`` computes once per process and keeps, computed in
    the master. No network I/O, no thread; redis-py reads its package metadata."""
    import redis.utils

    lib_version = getattr(redis.utils, "get_lib_version", None)
    if lib_version is not None:  # cached by redis-py after the first call
        lib_version()
    _redis.connect(_NOWHERE, socket_timeout=1.0).close()  # no connection until a command
    sha256_hex(b"")
    msgspec.json.Decoder(Event)  # msgspec's decoding plan of an entry, kept on the class
    for subscriber in unstarted():
        metrics_for(subscriber._metrics_setting)


def post_worker_init(worker: Any) -> None:
    """Start this worker's subscribers (replay included) before it accepts requests."""
    if getattr(worker.cfg, "preload_app", False):
        gc.freeze()  # the objects inherited from the master stay shared (see the module)
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
