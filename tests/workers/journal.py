"""What every worker script shares: the JSON-lines file the harness reads, the log file beside
it, and the wait for SIGTERM/SIGINT.

One copy, so that the record format ``tests/workers/harness.py`` parses (and the way a worker
sleeps without polling, which keeps CPU figures honest) is written in one place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from typing import Any

STOP = {signal.SIGTERM, signal.SIGINT}
LOG_FORMAT = "%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s"


class Journal:
    """``out``: one JSON object per line, ``{"event", "pid", "t", **fields}``, each line
    written whole (one ``write``), from any thread. Logging (every logger, at ``level``) goes
    to ``out + ".log"``: a worker script is an app, so it configures logging."""

    def __init__(self, out: str, level: int = logging.INFO) -> None:
        logging.basicConfig(filename=out + ".log", level=level, format=LOG_FORMAT)
        self._fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields})
        with self._lock:
            os.write(self._fd, (line + "\n").encode())


def block_stop_signals() -> None:
    """Call before any thread exists (threads inherit the mask): then only ``wait_for_stop``
    receives SIGTERM/SIGINT."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP)


def wait_for_stop() -> None:
    """Sleep (no polling) until SIGTERM or SIGINT arrives."""
    signal.sigwait(STOP)


async def wait_for_stop_async() -> None:
    """``wait_for_stop`` from an event loop: the signals stay blocked, a thread of the default
    executor waits for them."""
    await asyncio.get_running_loop().run_in_executor(None, wait_for_stop)
