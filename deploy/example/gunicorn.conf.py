"""gunicorn settings for the example app: the hotreload hooks and nothing surprising."""

import os

from subscriber.gunicorn import child_exit, post_worker_init, pre_fork, worker_exit

__all__ = ["child_exit", "post_worker_init", "pre_fork", "worker_exit"]

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = os.environ.get("WORKER_CLASS", "sync")
threads = int(os.environ.get("THREADS", "1"))
# Subscribers are created at import; creating one does no I/O, so preloading is safe and
# shares the imported code between workers (copy-on-write); pre_fork keeps it shared
# (gc.freeze, see subscriber/gunicorn.py).
preload_app = True
accesslog = None
# gunicorn >= 25.1 starts a control-socket thread in the master, with its socket under $HOME:
# not wanted on a read-only root filesystem, and the master stays single-threaded without it.
control_socket_disable = True
