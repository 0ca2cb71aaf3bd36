"""Process-state helpers shared by ``subscriber.testing``'s servers and clusters.

A leaf module so that ``subscriber.testing`` (which every test importing ``RedisServer``
loads) need not import the cluster helper to learn whether a process is frozen.
"""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["is_stopped", "stop_process"]


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP: state ``T``)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGCONT + SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the PID."""
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
    except ProcessLookupError:
        pass
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
