"""The benchmark suite: ``python -m tests.benchmarks [--quick] [--only NAME[,NAME...]]``.

``make bench`` runs it. Every benchmark compares hotreload with baselines measured in the same
run -- the floor (the least code doing the same job) and gunicorn's own reload -- because
these shared cores are noisy and only same-run ratios mean much. It prints one table per
benchmark, then the targets of issue 9 with what was measured, and writes everything as JSON
to ``bench-results/<time>-suite.json`` (and ``bench-results/latest.json``).

Benchmarks, in order (``--only`` takes these names):

- ``publish``: kubelet rename -> entry in Redis, daemon vs floor publisher (bench_publish)
- ``propagation``: rename -> every one of N worker processes applied (bench_propagation)
- ``gunicorn``: the example app, hotreload vs ``kill -HUP``; memory per worker (bench_gunicorn)
- ``replay``: ``Subscriber.start()`` with 100 versions of history (bench_replay)
- ``idle``: CPU and round trips of idle workers and publisher; memory (bench_idle)
- ``scale``: 1,000 asyncio subscribers on one Redis (bench_scale)
- ``scale-cluster``: the same on a 6-node Redis Cluster (bench_scale_cluster)
- ``failover``: the slot's master SIGKILLed -> every subscriber on the next change (bench_failover)
- ``detection``: FileWatcher rename -> callback vs a bare watchdog handler (bench_detection)
- ``endpoints``: ``/healthz`` and publish latency while 200 clients scrape ``/metrics``,
  vs unloaded (bench_endpoints)
- ``rollout``: rollback request -> 8 workers vs a normal publish; promotion delay after the
  canary hold (bench_rollout)
- ``keys``: the idle daemon's CPU at 1 / 100 / 1,000 (10,000) keys and one key's change
  among them (bench_keys)
- ``hub``: 20 Subscribers in one process, shared follower vs one per key: connections,
  threads, idle CPU and round trips, one key's propagation (bench_hub, issue 22)

``--quick`` runs a reduced matrix (about a minute; without ``publish``, ``detection`` and ``keys``,
which no target depends on); the full suite stays under 10 minutes on 2 cores. Every process
a benchmark starts is stopped by PID, also when it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.benchmarks import (
    bench_detection,
    bench_endpoints,
    bench_failover,
    bench_gunicorn,
    bench_hub,
    bench_idle,
    bench_keys,
    bench_propagation,
    bench_publish,
    bench_replay,
    bench_rollout,
    bench_scale,
    bench_scale_cluster,
)
from tests.benchmarks._common import (
    KIB,
    RESULTS,
    describe_machine,
    machine,
    table,
    write_json,
)

BENCHMARKS: dict[str, ModuleType] = {
    "publish": bench_publish,
    "propagation": bench_propagation,
    "gunicorn": bench_gunicorn,
    "replay": bench_replay,
    "idle": bench_idle,
    "scale": bench_scale,
    "scale-cluster": bench_scale_cluster,
    "failover": bench_failover,
    "detection": bench_detection,
    "endpoints": bench_endpoints,
    "rollout": bench_rollout,
    "keys": bench_keys,
    "hub": bench_hub,
}

# --quick leaves these out unless named with --only: no target depends on them
QUICK_SKIPS = {"publish", "detection", "keys"}

Target = tuple[str, str, bool]  # what, measured, holds


def propagation_targets(result: dict[str, Any]) -> list[Target]:
    found = []
    for row in result["rows"]:
        wanted = row["workers"] in (8, 32) and row["size_bytes"] in (KIB, 64 * KIB)
        if not wanted or row["transport"] != "unix":
            continue
        p50, p99 = row["ratio_p50"], row["ratio_p99"]
        found.append((
            f"propagation N={row['workers']} {row['size']}: p50 <= 1.5x floor, p99 <= 2x",
            f"p50 x{p50} ({row['hotreload']['p50']} vs {row['floor']['p50']} ms), "
            f"p99 x{p99} ({row['hotreload']['p99']} vs {row['floor']['p99']} ms)",
            p50 is not None and p99 is not None and p50 <= 1.5 and p99 <= 2.0,
        ))  # fmt: skip
    return found


def gunicorn_targets(result: dict[str, Any]) -> list[Target]:
    found: list[Target] = []
    for row in result["reload"]:
        if row["workers"] not in (4, 8):
            continue
        speedup = row["speedup_p50"]
        found.append((
            f"gunicorn N={row['workers']}: >= 50x faster than HUP (p50)",
            f"x{speedup} ({row['hotreload']['p50']} vs {row['hup']['p50']} ms)",
            speedup is not None and speedup >= 50,
        ))  # fmt: skip
    for row in result["memory"]:
        if not row["preload_app"]:
            continue
        adds = row["running_adds"]["uss"]
        found.append((
            "gunicorn preload: a running Subscriber adds <= 2 MiB USS per worker (issue 21)",
            f"+{adds} MiB (example app - same app importing subscriber, after a full gc)",
            adds <= 2.0,
        ))  # fmt: skip
        imported = row["imported"]
        copied = round(imported["per_worker"]["uss"] - imported["before_gc"]["uss"], 2)
        found.append((
            "gunicorn preload: a worker's full gc copies <= 1 MiB of the master's heap",
            f"+{copied} MiB USS (app importing subscriber, hooks as documented)",
            copied <= 1.0,
        ))  # fmt: skip
    watchdog = sum(row["watchdog_imported_in_workers"] for row in result["reload"])
    watchdog += sum(r["hotreload"]["watchdog_imported_in_workers"] for r in result["memory"])
    found.append((
        "no gunicorn worker imports watchdog",
        f"{watchdog} workers with watchdog in sys.modules",
        watchdog == 0,
    ))  # fmt: skip
    return found


def idle_targets(result: dict[str, Any]) -> list[Target]:
    rows = {row["what"]: row for row in result["cpu"]}
    worker = rows["hotreload worker (mean of 32)"]
    publisher = rows["hotreload publisher (metrics on)"]
    bare = rows["hotreload publisher (--metrics-port 0)"]
    trips = worker["round_trips_per_block"]
    watchdog = any(r["watchdog_imported"] for r in result["fresh_process_rss"])
    return [
        ("idle worker < 0.05 % CPU", f"{worker['cpu_pct']:.4f} %", worker["cpu_pct"] < 0.05),
        ("idle worker <= 1 Redis round trip per block timeout",
         f"{trips} per 5 s block ({worker['monitor']['without_heartbeat']} without heartbeat)",
         trips is not None and trips <= 1.01),
        ("idle publisher < 0.1 % CPU (as deployed: metrics port on)",
         f"{publisher['cpu_pct']:.3f} % (--metrics-port 0: {bare['cpu_pct']:.3f} %)",
         publisher["cpu_pct"] < 0.1),
        ("a process that imports subscriber does not import watchdog",
         "imported" if watchdog else "not imported", not watchdog),
    ]  # fmt: skip


def replay_targets(result: dict[str, Any]) -> list[Target]:
    found = []
    for row in result["rows"]:
        if row["size_bytes"] == 64 * KIB and row["case"] == "newest accepted":
            p50 = row["start"]["p50"]
            found.append(("start() replay of 64 KiB < 5 ms p50", f"{p50} ms", p50 < 5))
    return found


def hub_targets(result: dict[str, Any]) -> list[Target]:
    shared = [row for row in result["rows"] if row["mode"] == "shared"]
    connections = max(row["connections"] for row in shared)
    threads = max(row["threads"] for row in shared)
    return [
        (
            f"{result['keys']} Subscribers in one process: <= 2 connections, <= 3 threads",
            f"{connections} connections, {threads} threads (main thread included)",
            connections <= 2 and threads <= 3,
        )
    ]


TARGETS: dict[str, Callable[[dict[str, Any]], list[Target]]] = {
    "propagation": propagation_targets,
    "gunicorn": gunicorn_targets,
    "idle": idle_targets,
    "replay": replay_targets,
    "hub": hub_targets,
}


def show(payload: dict[str, Any]) -> int:
    print(f"machine: {describe_machine(payload['machine'])}")
    print(f"suite: {payload['suite']}, {payload['started_at']}, {payload['total_seconds']} s\n")
    for name, result in payload["results"].items():
        print(f"== {name}")
        if "error" in result:
            print(f"   FAILED: {result['error']}\n")
            continue
        print(BENCHMARKS[name].render(result))
        print(f"   ({result['seconds']} s)\n")
    targets = payload["targets"]
    if targets:
        rows = [[t["target"], t["measured"], "yes" if t["holds"] else "NO"] for t in targets]
        print(table("targets (issue 9)", ["target", "measured", "holds"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description="Run the benchmark suite (see tests/benchmarks/__main__.py).",
    )
    parser.add_argument("--quick", action="store_true", help="a reduced matrix (~1 minute)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated names: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--show",
        metavar="JSON",
        nargs="?",
        const=str(RESULTS / "latest.json"),
        help="print the tables of a results file instead of running (default: the latest)",
    )
    args = parser.parse_args(argv)
    if args.show:
        return show(json.loads(Path(args.show).read_text()))
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names:
        names = [n for n in BENCHMARKS if not (args.quick and n in QUICK_SKIPS)]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    info = machine()
    began = time.monotonic()
    print(f"machine: {describe_machine(info)}")
    print(f"suite: {'quick' if args.quick else 'full'}; benchmarks: {', '.join(names)}\n")
    results: dict[str, Any] = {}
    failed: list[str] = []
    targets: list[Target] = []
    for name in names:
        module = BENCHMARKS[name]
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            result = module.run(args.quick)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
            print(f"   {name} FAILED after {time.monotonic() - started:.0f} s\n", flush=True)
            continue
        result["seconds"] = round(time.monotonic() - started, 1)
        results[name] = result
        print(module.render(result))
        print(f"   ({result['seconds']} s)\n", flush=True)
        if name in TARGETS:
            targets += TARGETS[name](result)

    total = round(time.monotonic() - began, 1)
    if targets:
        print(
            table(
                "targets (issue 9)",
                ["target", "measured", "holds"],
                [[what, measured, "yes" if ok else "NO"] for what, measured, ok in targets],
            )
        )
    payload = {
        "suite": "quick" if args.quick else "full",
        "machine": info,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": total,
        "results": results,
        "targets": [{"target": w, "measured": m, "holds": ok} for w, m, ok in targets],
        "failed": failed,
    }
    path = write_json("suite-quick" if args.quick else "suite", payload)
    (RESULTS / "latest.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(RESULTS.parent)} in {total} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
