"""Free loopback ports for the servers ``subscriber.testing`` starts, safe when several test
processes pick ports at the same time (pytest-xdist workers).

A port is free when nothing is bound to it, but it stays free only until the server binds
it, and in between another process may pick it too. So:

- Ports come from below the kernel's ephemeral range (``ip_local_port_range``, 32768 and up
  by default), where no outgoing connection -- every Redis client makes some -- is given one.
  Cluster nodes take P in 10000-19999 with their bus port P + 10000 (20000-29999); single
  servers (``free_port``) take 30000 up to the ephemeral range.
- Under pytest-xdist each worker (``PYTEST_XDIST_WORKER=gwN`` of
  ``PYTEST_XDIST_WORKER_COUNT``) draws from its own slice of each range, so two workers never
  hand out the same port.
- Within a process, ports are handed out in turn from a random starting point, so two calls
  in a row never give the same port even before the first server has bound it.

What this cannot rule out (another program on the machine binding the port first) the
servers handle: ``RedisServer`` and ``RedisCluster`` start again on another port when
redis-server says "Address already in use" on a first start.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable

__all__ = ["cluster_port", "free_port", "port_free"]

BUS_OFFSET = 10000  # redis-server's cluster bus listens on port + 10000
CLUSTER_PORTS = (10000, 20000)  # node ports; their bus ports are 20000-29999
SINGLE_LOW = 30000  # free_port(): 30000 up to the ephemeral range
MACHINE_PORTS = frozenset({6379, 6379 + BUS_OFFSET})  # the machine's own Redis: never
_EPHEMERAL_DEFAULT = 32768
_MIN_SINGLE = 256  # fewer single ports than this below the ephemeral range: ask the kernel

_lock = threading.Lock()
_cursors: dict[tuple[int, int], int] = {}


def port_free(port: int) -> bool:
    """Nothing is bound to loopback ``port`` now (nor lingers on it in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ephemeral_low() -> int:
    """The first port the kernel gives outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_DEFAULT


def worker_slice(low: int, high: int) -> tuple[int, int]:
    """This process's share of ``[low, high)``: the whole range, or under pytest-xdist the
    worker's own slice of it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return low, high
    index, workers = int(worker[2:]), int(count)
    if workers <= 1 or index >= workers:
        return low, high
    size = (high - low) // workers
    return low + index * size, low + (index + 1) * size


def _hand_out(low: int, high: int, usable: Callable[[int], bool]) -> int:
    """The first usable port of ``[low, high)`` after the one this process handed out last
    (from a random one the first time), wrapping around."""
    span = high - low
    with _lock:
        start = _cursors.get((low, high))
        if start is None:
            start = random.randrange(low, high)
        for step in range(span):
            port = low + (start - low + step) % span
            if usable(port):
                _cursors[(low, high)] = low + (port - low + 1) % span
                return port
    raise RuntimeError(f"no free loopback port in {low}-{high - 1}")


def free_port() -> int:
    """A loopback port nothing is bound to (never 6379), for a server about to start."""
    low, high = SINGLE_LOW, min(ephemeral_low(), 65536)
    if high - low < _MIN_SINGLE:  # no room below the ephemeral range: the kernel picks
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port
    low, high = worker_slice(low, high)
    return _hand_out(low, high, lambda p: p not in MACHINE_PORTS and port_free(p))


def cluster_port(taken: set[int]) -> int:
    """A free loopback port P for a cluster node whose bus port P + 10000 is free too, and
    neither in ``taken`` (the other nodes' ports and bus ports)."""
    low, high = worker_slice(*CLUSTER_PORTS)

    def usable(port: int) -> bool:
        ports = {port, port + BUS_OFFSET}
        if ports & MACHINE_PORTS or ports & taken:
            return False
        return port_free(port) and port_free(port + BUS_OFFSET)

    return _hand_out(low, high, usable)
