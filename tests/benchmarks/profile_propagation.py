"""Where the propagation time goes: CPU per update of each process, and optional py-spy flame
data of one worker and of the publisher (``pip install py-spy``; not a project dependency).

    python -m tests.benchmarks.profile_propagation [--workers 8] [--size 1024] [--updates 200]
        [--py-spy DIR]

Runs both systems of ``bench_propagation`` (hotreload and the floor) with N workers, makes
``--updates`` updates to each, and prints the CPU each kind of process spent per update
(schedstat, all threads): the workers (mean per worker), the publisher and redis-server. With
``--py-spy DIR`` it also records one worker and each publisher at 1000 Hz (collapsed stacks in
DIR, for ``flamegraph.pl`` or speedscope).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from subscriber.testing import RedisServer
from tests.benchmarks._common import KIB, content, cpu_ns, processes, summary, table
from tests.benchmarks._systems import System, make_systems


def cpu_of(system: System) -> dict[str, int]:
    assert system.publisher is not None
    return {
        "workers": sum(cpu_ns(pid) for pid in system.pids),
        "publisher": cpu_ns(system.publisher.pid),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--size", type=int, default=KIB)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--metrics", action="store_true", help="daemon with its ack follower")
    parser.add_argument("--py-spy", type=Path, default=None, help="record flame data here")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-prof-") as tmp,
        RedisServer(Path(tmp) / "redis", unix=not args.tcp) as server,
        processes() as procs,
    ):
        hot, floor = make_systems(Path(tmp), server.url, procs)
        recorders: list[subprocess.Popen[bytes]] = []
        try:
            from subscriber.testing import free_port

            hot.start_publisher(content(0, KIB), metrics_port=free_port() if args.metrics else 0)
            floor.start_publisher(content(0, KIB))
            for system in (hot, floor):
                system.wait_published(server.url)
                system.start_workers(args.workers)
            if args.py_spy:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                for system in (hot, floor):
                    assert system.publisher is not None
                    targets = {"worker": system.pids[0], "publisher": system.publisher.pid}
                    for what, pid in targets.items():
                        out = args.py_spy / f"{system.name}-{what}.txt"
                        recorders.append(procs.spawn([
                            spy, "record", "--pid", str(pid), "--rate", "1000", "--threads",
                            "--idle", "--format", "raw", "--output", str(out), "--nonblocking",
                        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                time.sleep(1.0)
            before = {s.name: cpu_of(s) for s in (hot, floor)}
            redis_before = cpu_ns(server.pid)
            latencies: dict[str, list[float]] = {"hotreload": [], "floor": []}
            redis_cpu: dict[str, int] = {"hotreload": 0, "floor": 0}
            seq = 0
            for _ in range(args.updates):
                for system in (hot, floor):
                    seq += 1
                    r0 = cpu_ns(server.pid)
                    result = system.update(seq, args.size)
                    time.sleep(min(0.5, result["last_ms"] / 1000) + 0.005)
                    redis_cpu[system.name] += cpu_ns(server.pid) - r0
                    latencies[system.name].append(result["last_ms"])
            after = {s.name: cpu_of(s) for s in (hot, floor)}
            del redis_before
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                recorder.wait(30)
        finally:
            hot.close()
            floor.close()
    rows = []
    for name in ("hotreload", "floor"):
        per = args.updates
        workers = (after[name]["workers"] - before[name]["workers"]) / per / args.workers / 1e6
        publisher = (after[name]["publisher"] - before[name]["publisher"]) / per / 1e6
        stats = summary(latencies[name])
        rows.append([name, stats["p50"], stats["p99"], workers, publisher,
                     redis_cpu[name] / per / 1e6])  # fmt: skip
    print(
        table(
            f"CPU per update (ms), N={args.workers}, {args.size} B, {args.updates} updates each",
            ["system", "latency p50", "p99", "per worker", "publisher", "redis-server*"],
            rows,
        )
    )
    print("* redis-server CPU over each update plus its quiet gap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
