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
function's first calls (warm-up counter, then its bytecode specialised in place), and every
collection of the oldest generation writes the header of every container it scans. Measured
(tests/benchmarks/bench_gunicorn.py, 4 sync workers, 2 rounds; USS = private pages, after
a full collection, which a long-running worker makes sooner or later): a worker of the
example app held 18.7 MiB private before this, 15.7 of them for the same app importing
``subscriber`` and starting nothing -- the collection had copied the imported heap. Now 7.8
MiB (5.2 importing only; the plain app without hotreload or these hooks: 10.1). Hence:

- ``gc.freeze()``: the workers' collections skip the objects inherited from the master. Done
  by ``pre_fork`` in the master and, for a conf without ``pre_fork``, first thing in
  ``post_worker_init``, with or without ``preload_app`` (the master imported gunicorn and
  this module at least): as good (the freeze relinks whole generation lists, it touches no
  object). A full collection now copies 0.3 MiB, not 10.9; with ``preload_app`` off and no
  ``pre_fork``, 0.1, not 5.9. The price: garbage cycles already in the worker at that
  moment are never collected.
- ``pre_fork`` also fills, once in the master, what each worker's first ``start()`` would
  compute and keep, each costing the pages its code touches there: redis-py's version, read
  from the package metadata for ``CLIENT SETINFO`` (1.7-2.2 MiB: importlib.metadata, the
  email parser, regexes), its response-callback table, OpenSSL's SHA-256, msgspec's decoding
  plan of an entry (``TypedConfig`` builds its type's at construction, and imports PyYAML
  then: 0.7 MiB), the subscribers' metric families, and their loggers' level caches.
- Left: a running Subscriber adds 1.8-1.9 MiB USS over the same app importing it (2.0-2.1
  with its metric files mapped, 2.5 with prometheus_client recording in the worker: see
  ``subscriber._promfiles``; 3.5 with redis-py's client, pool and connection in the worker,
  which ``subscriber._light`` now replaces for ``redis://`` and ``unix://``; 6.9 before the
  freeze, read before a full collection; 1.7-1.85 with the subscribers' metrics off; ~35 KiB
  per further key). A worker still
  runs a few hundred Python functions the master never ran, and CPython 3.11 writes the
  reference count of every function, code object, constant and global a call touches (a
  count raised and lowered again copies the page all the same). Measured page by page
  (``tests/benchmarks/profile_pages.py``): reference counts ~1.65 MiB, the interpreter's
  writes into code objects ~0.65, temporaries written into the master's free blocks ~0.6;
  by module the subscriber's own ~0.6, Prometheus' ~0.6 (in multiprocess mode), redis-py's
  parser 0.16, ``threading`` 0.15. Running the subscriber's connection code in the master
  first (``subscriber._warm``: a handshake and a cycle against canned replies on a
  socketpair, no network, no thread) saves 0.04-0.06 MiB: the quickened bytecode; the
  reference counts are written anyway (a real start/stop against Redis there saved 0.2-0.3,
  and no master may do that).
  Not done: the metrics' label children in the master (0.1, and the master would write value
  files of its own; its gauges would hold ``livemin`` at 0), filling pymalloc's free blocks
  (0.1). The follower thread's stack is 8 MiB of address space of which 12 KiB is resident:
  a smaller ``threading.stack_size`` would save nothing, and callbacks run on that thread.
- Install with compiled bytecode (pip does; ``uv pip install`` needs ``--compile-bytecode``):
  where there are no ``.pyc`` files and none are written (``PYTHONDONTWRITEBYTECODE=1``, as in
  most images), the master compiles every module from source and the code objects lie among
  the compiler's leftovers, on more pages for a worker's first calls to copy: +2.01-2.10 MiB
  against +1.79-1.87 with ``.pyc`` (same versions, 5 runs each, session 11).

Async apps (uvicorn workers) start an ``AsyncSubscriber`` in their ASGI lifespan instead.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import msgspec

from subscriber import _light, _redis
from subscriber._warm import warm
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
    if lib_version is not None:  # cached by redis-py 8.2 after the first call
        lib_version()
    _light.lib_version()  # the worker's own connection's copy (redis-py 8.0 caches none)
    _redis.connect(_NOWHERE, socket_timeout=1.0).close()  # no connection until a command
    sha256_hex(b"")
    msgspec.json.Decoder(Event)  # msgspec's decoding plan of an entry, kept on the class
    subscribers = unstarted()
    for subscriber in subscribers:
        metrics = metrics_for(subscriber._metrics_setting)
        if metrics is not None:
            metrics.prepare(subscriber.key)
    warm(subscriber._log for subscriber in subscribers)  # quickened before the fork


def post_worker_init(worker: Any) -> None:
    """Start this worker's subscribers (replay included) before it accepts requests."""
    # The objects inherited from the master stay shared (see the module), with or without
    # preload_app: the master imported at least gunicorn and this conf's imports.
    gc.freeze()
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
