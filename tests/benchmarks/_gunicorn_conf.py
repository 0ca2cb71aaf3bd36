"""gunicorn settings for the benchmarks: the example's settings plus timestamped hooks.

    python -m gunicorn -c python:tests.benchmarks._gunicorn_conf --chdir deploy/example APP

``deploy/example/gunicorn.conf.py``'s settings (sync workers, no access log, no control
socket), with ``BIND``, ``WEB_CONCURRENCY`` and ``HR_BENCH_PRELOAD`` (``1``/``0``) from the
environment. With ``HR_BENCH_HOTRELOAD=1`` the subscriber hooks run (the example app;
``HR_BENCH_PRE_FORK=0`` leaves ``pre_fork`` out, as a conf written before it existed); without
it nothing of hotreload is imported, not even in the master (the plain app). Every worker
reports to the pipe in ``$HR_BENCH_FD`` (CLOCK_MONOTONIC ns):

- ``B <pid> <seq> <t_ns> <watchdog>`` when it has loaded the app and started its subscribers,
  about to serve (``seq``: the config it runs; ``watchdog``: 1 if ``watchdog`` is imported);
- ``X <pid> <t_ns>`` when it exits (it serves nothing after that).

With ``HR_BENCH_MODULES=DIR`` every worker writes, when it exits, the modules it imported
after the fork to ``DIR/<pid>`` (one a line): code that was not shared with the master.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "sync"
preload_app = os.environ.get("HR_BENCH_PRELOAD", "1") == "1"
accesslog = None
control_socket_disable = True
_HOTRELOAD = os.environ.get("HR_BENCH_HOTRELOAD") == "1"
_PRE_FORK = _HOTRELOAD and os.environ.get("HR_BENCH_PRE_FORK", "1") == "1"
_FD = int(os.environ["HR_BENCH_FD"])
_MODULES = os.environ.get("HR_BENCH_MODULES")
_at_fork: set[str] = set()
if _HOTRELOAD:  # in the master, as deploy/example/gunicorn.conf.py imports them
    from subscriber import gunicorn as hooks


def _report(*fields: object) -> None:
    os.write(_FD, (" ".join(str(f) for f in fields) + "\n").encode())


def _seq() -> int:
    app = sys.modules.get("tests.benchmarks._gunicorn_apps")
    return int(app.current_seq()) if app is not None else -1


def pre_fork(server: Any, worker: Any) -> None:
    if _PRE_FORK:
        hooks.pre_fork(server, worker)


def post_fork(server: Any, worker: Any) -> None:
    _at_fork.update(sys.modules)


def post_worker_init(worker: Any) -> None:
    if _HOTRELOAD:
        hooks.post_worker_init(worker)
    _report("B", os.getpid(), _seq(), time.monotonic_ns(), int("watchdog" in sys.modules))


def worker_exit(server: Any, worker: Any) -> None:
    _report("X", os.getpid(), time.monotonic_ns())
    if _MODULES:
        with open(os.path.join(_MODULES, str(os.getpid())), "w") as fh:
            fh.writelines(f"{name}\n" for name in sorted(set(sys.modules) - _at_fork))
    if _HOTRELOAD:
        hooks.worker_exit(server, worker)


def child_exit(server: Any, worker: Any) -> None:
    if _HOTRELOAD:
        hooks.child_exit(server, worker)
