"""Publish latency: kubelet ``..data`` rename -> the entry is readable in Redis.

Runs the real daemon (``python -m publisher watch``) against a private redis-server and a
kubelet-style mount; a reader blocked in ``XREAD`` timestamps each entry's arrival. Both clocks
are CLOCK_MONOTONIC, shared by every process on the machine.

    python -m tests.benchmarks.bench_publish [--updates 500] [--size 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write

REPO = Path(__file__).resolve().parents[2]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(updates: int, size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="hr-bench-") as tmp:
        mount = Path(tmp) / "config"
        mount.mkdir()
        atomic_write(str(mount), {"app.yaml": b"0" * size})
        with RedisServer(Path(tmp) / "redis") as server:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "publisher", "watch", str(mount),
                 "--redis", server.url, "--metrics-port", "0", "--log-level", "WARNING"],
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            client = connect(server.url, socket_timeout=10)
            events = stream_keys("app.yaml").events
            try:
                deadline = time.monotonic() + 20
                while not client.xlen(events):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the daemon published nothing")
                    time.sleep(0.01)
                newest = cast(list[tuple[bytes, object]], client.xrevrange(events, count=1))
                last_id = newest[0][0]
                latencies_ms: list[float] = []
                for i in range(1, updates + 1):
                    body = f"{i:08d}".encode().ljust(size, b"#")
                    summary = atomic_write(str(mount), {"app.yaml": body})
                    reply = cast(
                        list[tuple[bytes, list[tuple[bytes, object]]]],
                        client.xread({events: last_id}, block=5000, count=1),
                    )
                    arrived = time.monotonic_ns()
                    if not reply:
                        raise RuntimeError(f"update {i} was not published within 5 s")
                    last_id = reply[0][1][0][0]
                    latencies_ms.append((arrived - summary["t_rename_ns"]) / 1e6)
            finally:
                client.close()
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(10)
    return {
        "benchmark": "publish latency (kubelet rename -> entry in Redis)",
        "updates": updates,
        "size_bytes": size,
        "p50_ms": round(statistics.median(latencies_ms), 3),
        "p99_ms": round(percentile(latencies_ms, 0.99), 3),
        "max_ms": round(max(latencies_ms), 3),
        "mean_ms": round(statistics.fmean(latencies_ms), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.updates, args.size)
    for name, value in result.items():
        print(f"{name:>12}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
