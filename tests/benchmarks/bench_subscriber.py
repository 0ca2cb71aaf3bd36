"""What a subscriber costs a worker: start() replay time, idle CPU, RSS.

Against a private redis-server on a unix socket (the per-pod default):

- ``start()`` with 100 versions of history, for 1 KiB, 64 KiB and ~1 MiB configs: the plain
  case (the newest is accepted) and a walk-back (the newest is rejected, the one before it
  applied). Each run is a fresh Subscriber in this process: connect, fetch, verify, apply,
  write the ack and state. p50/p99 over the run counts shown.
- idle CPU of a worker process (tests/workers/subscriber_worker.py, default block and
  heartbeat) over a quiet window, and the Redis commands it sent meanwhile.
- RSS a subscriber adds: a fresh process measured before importing, after importing, and
  after start() with a 1 KiB and a ~1 MiB config.

    python -m tests.benchmarks.bench_subscriber [--runs 200] [--idle 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from subscriber.protocol import MAX_CONTENT_BYTES
from subscriber.testing import RedisServer, append_event

REPO = Path(__file__).resolve().parents[2]
SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "~1 MiB": MAX_CONTENT_BYTES}
HISTORY = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def body(version: int, size: int, marker: str = "") -> bytes:
    return f"version: {version} {marker}\n".encode().ljust(size, b"#")


def seed(url: str, key: str, size: int, reject_newest: bool) -> None:
    for version in range(1, HISTORY + 1):
        append_event(url, key, body(version, size), version=version)
    if reject_newest:
        append_event(url, key, body(HISTORY + 1, size, "REJECT"), version=HISTORY + 1)


def time_starts(url: str, key: str, runs: int) -> list[float]:
    from subscriber import Subscriber

    def apply(text: str) -> None:
        if "REJECT" in text[:40]:
            raise ValueError("rejected by the benchmark")

    timings = []
    for run in range(runs + 3):  # 3 warm-up runs, not counted
        sub = Subscriber(key, apply, redis_url=url, worker_id="bench")
        began = time.perf_counter()
        sub.start()
        took_ms = (time.perf_counter() - began) * 1000
        sub.stop()
        if run >= 3:
            timings.append(took_ms)
    return timings


def bench_start(url: str, runs: int) -> list[dict[str, Any]]:
    rows = []
    for label, size in SIZES.items():
        count = max(10, runs if size <= 64 * 1024 else runs // 5)
        for walk_back in (False, True):
            key = f"bench-{size}-{int(walk_back)}.yaml"
            seed(url, key, size, walk_back)
            timings = time_starts(url, key, count)
            rows.append(
                {
                    "size": label,
                    "case": "walk back past rejected newest" if walk_back else "newest accepted",
                    "runs": count,
                    "p50_ms": round(statistics.median(timings), 3),
                    "p99_ms": round(percentile(timings, 0.99), 3),
                    "max_ms": round(max(timings), 3),
                }
            )
    return rows


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` in ns resolution (/proc/.../schedstat), where
    utime+stime would round an idle worker's few milliseconds to 0 or one 10 ms tick."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1e9


def bench_idle(url: str, tmp: Path, seconds: float) -> dict[str, Any]:
    from subscriber._redis import connect

    key = "idle.yaml"
    append_event(url, key, body(1, 1024), version=1)
    out = tmp / "idle-worker.jsonl"
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.subscriber_worker", "--url", url, "--key", key,
         "--out", str(out), "--block-ms", "5000", "--heartbeat", "5.0"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    client = connect(url, socket_timeout=5)
    try:
        deadline = time.monotonic() + 20
        while not (out.exists() and '"started"' in out.read_text()):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the idle worker did not start")
            time.sleep(0.05)
        time.sleep(1.0)  # let start-up work (imports, first cycle) finish
        client.config_resetstat()
        before, began = cpu_seconds(worker.pid), time.monotonic()
        time.sleep(seconds)
        cpu, wall = cpu_seconds(worker.pid) - before, time.monotonic() - began
        stats = cast("dict[str, dict[str, int]]", client.info("commandstats"))
    finally:
        client.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
    commands = {
        name.removeprefix("cmdstat_"): stat["calls"]
        for name, stat in stats.items()
        if name in ("cmdstat_xread", "cmdstat_hset", "cmdstat_xrevrange")
    }
    return {
        "window_s": round(wall, 1),
        "cpu_ms": round(cpu * 1000, 2),
        "cpu_share": f"{cpu / wall:.3%}",
        "redis_commands": commands,
        "note": "block 5000 ms, heartbeat 5 s: one pipelined round trip (HSET + XREAD) per 5 s",
    }


RSS_PROBE = """
import sys, json
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss()
import subscriber
imported = rss()
sub = subscriber.Subscriber(sys.argv[2], lambda text: None, redis_url=sys.argv[1])
sub.start()
started = rss()
sub.stop()
print(json.dumps({"baseline": base, "imported": imported, "started": started}))
"""


def bench_rss(url: str) -> list[dict[str, Any]]:
    rows = []
    for label, size in (("1 KiB", 1024), ("~1 MiB", MAX_CONTENT_BYTES)):
        key = f"rss-{size}.yaml"
        append_event(url, key, body(1, size), version=1)
        probe = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, url, key],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            check=True,
            text=True,
        )
        mib = json.loads(probe.stdout)
        rows.append(
            {
                "config": label,
                "baseline_mib": round(mib["baseline"], 1),
                "import_adds_mib": round(mib["imported"] - mib["baseline"], 1),
                "start_adds_mib": round(mib["started"] - mib["imported"], 1),
                "total_added_mib": round(mib["started"] - mib["baseline"], 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200, help="start() runs per case (<=64 KiB)")
    parser.add_argument("--idle", type=float, default=25.0, help="idle CPU window, seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    # rejections in the walk-back runs are expected: keep them off the output
    logging.basicConfig(level=logging.ERROR)
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-sub-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        results: dict[str, Any] = {
            "start": bench_start(server.url, args.runs),
            "rss": bench_rss(server.url),
            "idle": bench_idle(server.url, Path(tmp), args.idle),
        }
    print(f"start() with {HISTORY} versions of history (unix socket, in-process):")
    for row in results["start"]:
        print(
            f"  {row['size']:>7}  {row['case']:<31} runs={row['runs']:<4} "
            f"p50={row['p50_ms']:.2f} ms  p99={row['p99_ms']:.2f} ms  max={row['max_ms']:.2f} ms"
        )
    print("RSS of a fresh process (MiB):")
    for row in results["rss"]:
        print(
            f"  {row['config']:>7}  baseline={row['baseline_mib']}  "
            f"+import={row['import_adds_mib']}  +start={row['start_adds_mib']}  "
            f"total added={row['total_added_mib']}"
        )
    idle = results["idle"]
    print(
        f"idle worker: {idle['cpu_ms']} ms CPU in {idle['window_s']} s ({idle['cpu_share']}); "
        f"Redis saw {idle['redis_commands']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
