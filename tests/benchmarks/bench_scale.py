"""Scale: 1,000 asyncio subscribers on one Redis, spread over 4 processes.

Kubelet ``..data`` rename -> the last of 1,000 ``AsyncSubscriber`` callbacks returned (each
process reports when its 250th callback for the update returned; CLOCK_MONOTONIC). The floor
runs side by side on its own redis-server: the floor publisher and 1,000 raw ``redis.asyncio``
``XREAD BLOCK`` loops that verify the hash, in 4 processes too. Updates alternate in random
order, 1 KiB content, unix sockets; each subscriber holds its own connection.

    python -m tests.benchmarks.bench_scale [--quick] [--subscribers 1000] [--processes 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from subscriber.testing import RedisServer
from tests.benchmarks._common import KIB, content, processes, ratio, summary, table
from tests.benchmarks._systems import make_systems


def run(quick: bool = False, subscribers: int = 1000, workers: int = 4) -> dict[str, Any]:
    runs = 3 if quick else 15
    per = subscribers // workers
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-scale-") as tmp,
        RedisServer(Path(tmp) / "r-hot") as hot_redis,
        RedisServer(Path(tmp) / "r-floor") as floor_redis,
        processes() as procs,
    ):
        hot, _ = make_systems(Path(tmp) / "hot", hot_redis.url, procs, async_kinds=True)
        _, floor = make_systems(Path(tmp) / "floor", floor_redis.url, procs, async_kinds=True)
        try:
            for system, server in ((hot, hot_redis), (floor, floor_redis)):
                system.start_publisher(content(0, KIB))
                system.wait_published(server.url)
            started = {}
            for system in (hot, floor):
                t0 = time.monotonic()
                system.start_workers(workers, per=per, timeout=300)
                started[system.name] = round(time.monotonic() - t0, 2)
            samples: dict[str, list[float]] = {"hotreload": [], "floor": []}
            seq = 0
            for index in range(runs + 1):
                for system in random.sample([hot, floor], 2):
                    seq += 1
                    result = system.update(seq, KIB, timeout=60)
                    if index:  # the first pair warms up
                        samples[system.name].append(result["last_ms"])
                    time.sleep(min(1.0, result["last_ms"] / 1000) + 0.02)
        finally:
            hot.close()
            floor.close()
    hot_s, floor_s = summary(samples["hotreload"]), summary(samples["floor"])
    return {
        "subscribers": per * workers,
        "processes": workers,
        "hotreload": hot_s,
        "floor": floor_s,
        "ratio_p50": ratio(hot_s["p50"], floor_s["p50"]),
        "ratio_p99": ratio(hot_s["p99"], floor_s["p99"]),
        "start_all_s": started,
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    hot, floor = result["hotreload"], result["floor"]
    return table(
        f"scale: rename -> all {result['subscribers']} asyncio subscribers applied "
        f"({result['processes']} processes, one Redis; ms)",
        ["runs", "hot p50", "hot p99", "floor p50", "floor p99", "x p50", "x p99",
         "start all (s) hot/floor"],
        [[hot["n"], hot["p50"], hot["p99"], floor["p50"], floor["p99"], result["ratio_p50"],
          result["ratio_p99"],
          f"{result['start_all_s']['hotreload']}/{result['start_all_s']['floor']}"]],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args(argv)
    result = run(args.quick, args.subscribers, args.processes)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
