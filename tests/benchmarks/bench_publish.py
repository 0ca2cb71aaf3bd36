"""Publish latency: kubelet ``..data`` rename -> the entry is readable in Redis.

The real daemon (``python -m publisher watch``) against the floor publisher (a watchdog watch
that reads, hashes and XADDs), side by side on one private redis-server, updates alternating
in random order. A reader blocked in ``XREAD`` on the updated stream timestamps the entry's
arrival (CLOCK_MONOTONIC, like the kubelet writer's ``t_rename_ns``).

    python -m tests.benchmarks.bench_publish [--quick]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from subscriber._redis import connect
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import (
    KIB,
    MIB_512,
    content,
    processes,
    ratio,
    size_label,
    summary,
    table,
)
from tests.benchmarks._systems import SPACING, System, make_systems


def publish_once(system: System, reader: Any, seq: int, size: int) -> float:
    newest = cast("list[tuple[bytes, Any]]", reader.xrevrange(system.stream, count=1))
    last = newest[0][0] if newest else b"0-0"
    wait = system.last_update + SPACING + random.uniform(0, 0.02) - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    summary_ = atomic_write(str(system.mount), {system.key: content(seq, size)})
    renamed: int = summary_["t_rename_ns"]
    system.last_update = time.monotonic()
    reply = reader.xread({system.stream: last}, count=1, block=10_000)
    arrived = time.monotonic_ns()
    if not reply:
        raise RuntimeError(f"{system.name}: update {seq} was not published within 10 s")
    return (arrived - renamed) / 1e6


def run(quick: bool = False) -> dict[str, Any]:
    runs = {KIB: 20, MIB_512: 5} if quick else {KIB: 100, 64 * KIB: 60, MIB_512: 20}
    rows = []
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-pub-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        hot, floor = make_systems(Path(tmp), server.url, procs)
        reader = connect(server.url, socket_timeout=15)
        try:
            for system in (hot, floor):
                system.start_publisher(content(0, KIB))
            for system in (hot, floor):
                system.wait_published(server.url)
            seq = 0
            for size, count in runs.items():
                samples: dict[str, list[float]] = {"hotreload": [], "floor": []}
                for run_index in range(count + 2):
                    pair = [hot, floor]
                    random.shuffle(pair)
                    for system in pair:
                        seq += 1
                        latency = publish_once(system, reader, seq, size)
                        if run_index >= 2:  # two warm-up updates
                            samples[system.name].append(latency)
                        time.sleep(0.005 + latency / 1000)
                hot_s, floor_s = summary(samples["hotreload"]), summary(samples["floor"])
                rows.append({
                    "size": size_label(size), "size_bytes": size,
                    "hotreload": hot_s, "floor": floor_s,
                    "ratio_p50": ratio(hot_s["p50"], floor_s["p50"]),
                    "ratio_p99": ratio(hot_s["p99"], floor_s["p99"]),
                })  # fmt: skip
        finally:
            reader.close()
            hot.close()
            floor.close()
    return {"rows": rows, "seconds": round(time.monotonic() - began, 1)}


def render(result: dict[str, Any]) -> str:
    return table(
        "publish: kubelet rename -> entry readable in Redis (ms), unix socket",
        ["size", "runs", "hot p50", "hot p99", "floor p50", "floor p99", "x p50", "x p99"],
        [
            [r["size"], r["hotreload"]["n"], r["hotreload"]["p50"], r["hotreload"]["p99"],
             r["floor"]["p50"], r["floor"]["p99"], r["ratio_p50"], r["ratio_p99"]]
            for r in result["rows"]
        ],
    )  # fmt: skip


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
