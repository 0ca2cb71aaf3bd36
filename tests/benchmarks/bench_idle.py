"""Idle cost: CPU of a publisher and of 32 idle workers, the Redis round trips they make, and
the memory a subscriber adds to a fresh process.

One window (60 s; 20 s with ``--quick``) in which nothing changes, three pods side by side,
each on its own private redis-server (unix socket) so their commands are counted apart:

- hotreload: ``hotreload watch`` as deployed (metrics port on, so its ack follower runs) and
  32 worker processes each running a ``Subscriber`` with the defaults (block 5 s, heartbeat
  5 s), forked from a preloaded parent;
- hotreload publisher with ``--metrics-port 0`` (no ack follower), alone;
- floor: the floor publisher (a watchdog watch, no Redis traffic while idle) and 32 raw
  ``XREAD BLOCK 5000`` loops.

Before the window the hotreload pod gets 32 updates, so its acks stream holds what a pod
that has run a while holds (~1000 entries, the length it is trimmed to), which the daemon's
periodic status pass reads. CPU is every thread's schedstat time over the window.

Round trips: ``MONITOR`` on the hotreload pod's Redis. Every round trip of a subscriber's
follow loop ends with its ``XREAD``, which Redis runs right after the ``HSET`` (heartbeat)
pipelined before it, naming the worker: the mean gap between one worker's round trips,
against the 5 s block (``XREAD`` calls without a heartbeat before them would be extra round
trips and are counted on top).

Memory: a fresh ``python`` measured before importing ``subscriber``, after, and after
``start()`` with a 1 KiB and a 1 MiB - 512 B config (RSS); and the idle workers' RSS, PSS and
USS (``/proc/PID/smaps_rollup``; forked from a parent that imported ``subscriber``).

    python -m tests.benchmarks.bench_idle [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

from publisher._ahead import WAIT_KEY
from subscriber._redis import connect
from subscriber.defaults import DEFAULT_PREFIX
from subscriber.testing import RedisServer, append_event, free_port
from tests.benchmarks._common import (
    KIB,
    MIB_512,
    REPO,
    content,
    cpu_ns,
    processes,
    size_label,
    smaps_rollup,
    table,
)
from tests.benchmarks._systems import make_systems

WORKERS = 32
_CHECK = WAIT_KEY.format(prefix=DEFAULT_PREFIX)  # the daemon's blocking read, not a worker's
BLOCK_S = 5.0
PREFILL_UPDATES = 32  # x 32 workers: the acks stream at its trimmed length


class Monitor:
    """``MONITOR`` on a unix socket, read by a thread: every command Redis runs, in order."""

    def __init__(self, socket_path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.connect(socket_path)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return
            self._chunks.append(chunk)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        return b"".join(self._chunks).decode("utf-8", "replace").splitlines()


def round_trips(lines: list[str]) -> dict[str, Any]:
    """Each worker's round trips from MONITOR lines: a subscriber's round trip ends with its
    ``XREAD``, and Redis runs one client's pipelined commands back to back, so an ``XREAD``
    right after an ``HSET`` of the workers hash belongs to the worker that HSET names. The
    daemon's own ``XREAD`` (its check sent ahead, ``publisher._ahead.WAIT_KEY``) is not a
    worker's."""
    times: dict[str, list[float]] = {}
    unattributed = 0
    pending: str | None = None
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) < 4 or not parts[0].startswith("+"):
            continue
        stamp, command = float(parts[0][1:]), parts[3]
        if command.startswith('"HSET"') and ":workers" in command:
            pending = command.split('" "')[2]
        elif command.startswith('"XREAD"') and ":events" in command and _CHECK not in command:
            if pending is None:
                unattributed += 1
            else:
                times.setdefault(pending, []).append(stamp)
            pending = None
    gaps = [b - a for stamps in times.values() for a, b in itertools.pairwise(stamps)]
    return {
        "workers_seen": len(times),
        "round_trips": sum(len(t) for t in times.values()) + unattributed,
        "without_heartbeat": unattributed,
        "mean_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "min_gap_s": round(min(gaps), 3) if gaps else None,
    }


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time of each thread of ``pid`` in ns, by thread id (``/proc/PID/task/*/schedstat``;
    the main thread's id is ``pid``: a daemon's publishing loop)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return times


def loop_and_threads_pct(
    pid: int, before: dict[int, int], after: dict[int, int], wall: float
) -> dict[str, float]:
    """A daemon's CPU over ``wall`` seconds as % of a core: its main thread (the loop) and
    every other thread together (ack follower, ``:control`` reader, watchers, HTTP)."""
    spent = {tid: ns - before.get(tid, 0) for tid, ns in after.items()}
    loop = spent.pop(pid, 0)
    return {
        "loop_pct": round(loop / 1e9 / wall * 100, 4),
        "other_threads_pct": round(sum(spent.values()) / 1e9 / wall * 100, 4),
    }


def commandstats(url: str) -> dict[str, int]:
    client = connect(url, socket_timeout=5)
    try:
        stats = cast("dict[str, dict[str, int]]", client.info("commandstats"))
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


def reset_stats(url: str) -> None:
    client = connect(url, socket_timeout=5)
    try:
        client.config_resetstat()
    finally:
        client.close()


RSS_PROBE = """
import json, sys
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
print(json.dumps({"baseline": base, "imported": imported, "started": started,
                  "watchdog": "watchdog" in sys.modules, "modules": len(sys.modules)}))
"""


def fresh_process_rss(url: str) -> list[dict[str, Any]]:
    rows = []
    for size in (KIB, MIB_512):
        key = f"rss-{size}.yaml"
        append_event(url, key, content(1, size), version=1)
        probe = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, url, key],
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=True,
            text=True,
            timeout=60,
        )
        mib = json.loads(probe.stdout)
        rows.append({
            "config": size_label(size),
            "baseline_mib": round(mib["baseline"], 1),
            "import_adds_mib": round(mib["imported"] - mib["baseline"], 1),
            "start_adds_mib": round(mib["started"] - mib["imported"], 1),
            "total_added_mib": round(mib["started"] - mib["baseline"], 1),
            "watchdog_imported": mib["watchdog"],
        })  # fmt: skip
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    window = 20.0 if quick else 60.0
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-idle-") as tmp,
        RedisServer(Path(tmp) / "r-hot") as hot_redis,
        RedisServer(Path(tmp) / "r-bare") as bare_redis,
        RedisServer(Path(tmp) / "r-floor") as floor_redis,
        processes() as procs,
    ):
        root = Path(tmp)
        hot, _ = make_systems(root / "hot", hot_redis.url, procs)
        bare, _ = make_systems(root / "bare", bare_redis.url, procs)
        _, floor = make_systems(root / "floor", floor_redis.url, procs)
        systems = (hot, bare, floor)
        try:
            hot.start_publisher(content(1, KIB), metrics_port=free_port())
            bare.start_publisher(content(1, KIB), metrics_port=0)
            floor.start_publisher(content(1, KIB))
            for system, server in ((hot, hot_redis), (bare, bare_redis), (floor, floor_redis)):
                system.wait_published(server.url)
            hot.start_workers(WORKERS)
            floor.start_workers(WORKERS)
            # a pod that has been running a while: its acks stream at the ~1000 it is trimmed
            # to (the daemon's status pass reads it), then quiet
            for seq in range(2, 2 + PREFILL_UPDATES):
                hot.update(seq, KIB)
            rss_rows = fresh_process_rss(bare_redis.url)
            time.sleep(6.0)  # start-up work done, first heartbeats and cycles behind
            for server in (hot_redis, bare_redis, floor_redis):
                reset_stats(server.url)
            monitor = Monitor(hot_redis.socket_path)
            pids = {
                "hot_workers": list(hot.pids),
                "floor_workers": list(floor.pids),
                "hot_publisher": [cast("subprocess.Popen[bytes]", hot.publisher).pid],
                "bare_publisher": [cast("subprocess.Popen[bytes]", bare.publisher).pid],
                "floor_publisher": [cast("subprocess.Popen[bytes]", floor.publisher).pid],
                "redis_hot": [hot_redis.pid],
            }
            before = {name: sum(cpu_ns(p) for p in group) for name, group in pids.items()}
            t0 = time.monotonic()
            time.sleep(window)
            wall = time.monotonic() - t0
            after = {name: sum(cpu_ns(p) for p in group) for name, group in pids.items()}
            trips = round_trips(monitor.stop())
            stats = {
                "hot": commandstats(hot_redis.url),
                "bare": commandstats(bare_redis.url),
                "floor": commandstats(floor_redis.url),
            }
            memory = [smaps_rollup(pid) for pid in hot.pids]
            floor_memory = [smaps_rollup(pid) for pid in floor.pids]
        finally:
            for system in systems:
                system.close()

    def share(name: str, per: int = 1) -> float:
        return (after[name] - before[name]) / 1e9 / wall / per * 100

    cycles = wall / BLOCK_S
    hset = stats["hot"].get("hset", 0)
    per_block = None
    if trips["mean_gap_s"]:
        # one round trip per mean gap; without_heartbeat ones would come on top
        extra = trips["without_heartbeat"] / WORKERS / cycles
        per_block = round(BLOCK_S / trips["mean_gap_s"] + extra, 3)
    rows = [
        {"what": "hotreload worker (mean of 32)", "cpu_pct": share("hot_workers", WORKERS),
         "round_trips_per_block": per_block, "monitor": trips,
         "redis_commands": {k: v for k, v in stats["hot"].items() if k != "info"}},
        {"what": "floor worker (mean of 32)", "cpu_pct": share("floor_workers", WORKERS)},
        {"what": "hotreload publisher (metrics on)", "cpu_pct": share("hot_publisher")},
        {"what": "hotreload publisher (--metrics-port 0)", "cpu_pct": share("bare_publisher"),
         "redis_commands": {k: v for k, v in stats["bare"].items() if k != "info"}},
        {"what": "floor publisher", "cpu_pct": share("floor_publisher")},
        {"what": "redis-server of the hotreload pod (MONITOR on)",
         "cpu_pct": share("redis_hot")},
    ]  # fmt: skip

    def mean(rows_: list[dict[str, float]], key: str) -> float:
        return round(sum(r[key] for r in rows_) / len(rows_), 1)

    return {
        "window_s": round(wall, 1),
        "workers": WORKERS,
        "cpu": rows,
        "hset_per_worker_per_block": round(hset / WORKERS / cycles, 2),
        "worker_memory": {
            kind: {key: mean(m, key) for key in ("rss", "pss", "uss")}
            for kind, m in (("hotreload", memory), ("floor", floor_memory))
        },
        "fresh_process_rss": rss_rows,
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    cpu = table(
        f"idle: {result['window_s']} s with nothing to do (CPU % of one core)",
        ["process", "CPU %", "round trips per 5 s block"],
        [[r["what"], f"{r['cpu_pct']:.4f}", r.get("round_trips_per_block")]
         for r in result["cpu"]],
    )  # fmt: skip
    memory = table(
        "memory of an idle worker forked from a preloaded parent (MiB)",
        ["worker", "RSS", "PSS", "USS"],
        [[k, v["rss"], v["pss"], v["uss"]] for k, v in result["worker_memory"].items()],
    )
    fresh = table(
        "RSS a subscriber adds to a fresh python process (MiB)",
        ["config", "baseline", "+import", "+start()", "total", "watchdog imported"],
        [[r["config"], r["baseline_mib"], r["import_adds_mib"], r["start_adds_mib"],
          r["total_added_mib"], r["watchdog_imported"]] for r in result["fresh_process_rss"]],
    )  # fmt: skip
    return "\n\n".join([cpu, memory, fresh])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
