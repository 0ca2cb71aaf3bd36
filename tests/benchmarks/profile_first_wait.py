"""1,000 keys' first publishes waiting for their workers' rows (``publisher._restored``): the
daemon's CPU and the HSCANs Redis runs per second meanwhile.

    python tests/benchmarks/profile_first_wait.py [--keys 1000] [--window 5] [--runs 3]
        [--against /path/to/other/checkout]

A ``Daemon`` in process on a private redis-server (unix socket) and a kubelet-style mount of
N keys, each key's ``:workers`` two rows of 10 s heartbeats written 10 minutes before the
server started: every first publish waits (the bound: 33 s, capped at 30 s from the start).
Once all wait, a window: the process's CPU (``getrusage``: the daemon's threads; the
measuring thread sleeps) and ``cmdstat_hscan`` calls. ``--against``: each run measures that
checkout (its own ``.venv``, this file run from it) and this one alternately, the load
average printed at each run's start.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def measure(keys: int, window: float) -> str:
    sys.path.insert(0, os.getcwd())
    import msgspec

    from publisher.daemon import Daemon
    from subscriber._redis import connect
    from subscriber.keys import stream_keys
    from subscriber.protocol import WorkerState, now_ms
    from subscriber.testing import RedisServer
    from tests.conftest import KubeletMount

    def row(worker: str, heartbeat: int) -> bytes:
        state = WorkerState(worker=worker, status="applied", version=3, seen=3,
                            heartbeat=heartbeat, heartbeat_interval=10.0, pid=1)  # fmt: skip
        return msgspec.json.encode(state)

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "r") as server:
        client = connect(server.url, socket_timeout=5)
        old = now_ms() - 600_000
        pipe = client.pipeline()
        for i in range(keys):
            pipe.hset(stream_keys(f"k{i}.yaml").workers, mapping={w: row(w, old) for w in "ab"})
        pipe.execute()
        mount = KubeletMount(Path(tmp) / "m")
        mount.write({f"k{i}.yaml": f"k: {i}\n".encode() for i in range(keys)})
        daemon = Daemon([mount.directory], redis_url=server.url)
        loop = threading.Thread(target=daemon.run, daemon=True)
        loop.start()
        try:
            while len(daemon._first._waiting) < keys:
                time.sleep(0.05)
            time.sleep(1.0)

            def hscans() -> int:
                stats = client.info("commandstats")
                return int(stats.get("cmdstat_hscan", {}).get("calls", 0))

            h0, r0, t0 = hscans(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            time.sleep(window)
            h1, r1, t1 = hscans(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        finally:
            daemon.request_stop()
            loop.join(15)
            client.close()
        waiting = len(daemon._first._waiting)  # read stopped: a look pops its key a moment
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (t1 - t0)
    assert waiting == keys, f"{keys - waiting} keys stopped waiting within the window"
    return f"CPU {cpu * 100:.0f} % of a core, HSCAN {(h1 - h0) / (t1 - t0):.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", type=Path)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.keys, args.window))
        return
    here = Path(__file__).resolve().parents[2]
    checkouts = [here] if args.against is None else [args.against.resolve(), here]
    for run in range(args.runs):
        for checkout in checkouts:
            load = Path("/proc/loadavg").read_text().split()[0]
            done = subprocess.run(
                [str(checkout / ".venv/bin/python"), __file__, "--one",
                 "--keys", str(args.keys), "--window", str(args.window)],
                cwd=checkout, capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            print(f"run {run + 1} {checkout} (load {load}): {done.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
