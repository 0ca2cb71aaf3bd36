"""CPU one worker spends per event: a ``Subscriber`` worker against a floor worker.

    python -m tests.benchmarks.profile_worker [--size 1024] [--events 2000] [--py-spy DIR]

No publisher: this process XADDs valid events straight into each stream (one at a time,
waiting for the worker's report), so the workers' CPU per event is all that differs. With
``--py-spy DIR`` the hotreload worker is recorded at 2000 Hz without idle samples (collapsed
stacks; ``pip install py-spy``, not a project dependency).
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

from subscriber._redis import connect
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex
from subscriber.testing import RedisServer
from tests.benchmarks._common import KIB, content, cpu_ns, processes, summary, table
from tests.benchmarks._systems import make_systems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=KIB)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument(
        "--strace", type=Path, default=None, help="strace -c -f each worker, summaries here"
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds between events (0.15: as bench_propagation, past the reports' hold)",
    )
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-pw-") as tmp,
        RedisServer(Path(tmp) / "redis", unix=not args.tcp) as server,
        processes() as procs,
    ):
        hot, floor = make_systems(Path(tmp), server.url, procs)
        client = connect(server.url, socket_timeout=10)
        seq = 0

        def xadd(stream: str, hot_fields: bool) -> int:
            nonlocal seq
            seq += 1
            body = content(seq, args.size)
            digest = sha256_hex(body)
            fields: dict[str, object] = {"sha256": digest, "content": body}
            if hot_fields:
                fields = {"schema": SCHEMA_VERSION, "key": hot.key, "version": seq,
                          "sha256": digest, "content": body, "published_at": now_ms(),
                          "publisher": "bench:0"}  # fmt: skip
            client.xadd(stream, fields)  # type: ignore[arg-type]
            return seq

        recorder: subprocess.Popen[bytes] | None = None
        tracers: list[subprocess.Popen[bytes]] = []
        try:
            for system in (hot, floor):
                xadd(system.stream, system is hot)
                system.start_workers(1)
            if args.py_spy:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                out = args.py_spy / f"worker-{args.size}.txt"
                recorder = procs.spawn([
                    spy, "record", "--pid", str(hot.pids[0]), "--rate", "2000", "--format",
                    "raw", "--output", str(out), "--nonblocking",
                ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                time.sleep(1)
            if args.strace:  # system calls per event, each worker's threads together
                args.strace.mkdir(parents=True, exist_ok=True)
                for system in (hot, floor):
                    out = args.strace / f"{system.name}-{args.size}.txt"
                    tracers.append(procs.spawn([
                        "strace", "-c", "-f", "-p", str(system.pids[0]), "-o", str(out),
                    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                time.sleep(1)
            systems = (hot, floor)
            latencies: dict[str, list[float]] = {s.name: [] for s in systems}
            walls: dict[str, float] = {s.name: 0.0 for s in systems}
            redis_cpu: dict[str, int] = {s.name: 0 for s in systems}
            # CPU from the XADD to 5 ms after the report (the update's own work, before the
            # held reports go out), and the rest of the gap (the reports, with --gap)
            own: dict[str, int] = {s.name: 0 for s in systems}
            before = {s.name: cpu_ns(s.pids[0]) for s in systems}
            for _ in range(args.events):  # interleaved: both see the same noise
                for system in systems:
                    r0 = cpu_ns(server.pid)
                    c0 = cpu_ns(system.pids[0])
                    t0 = time.monotonic_ns()
                    want = xadd(system.stream, system is hot)
                    done = False
                    while not done:
                        for line in system.reports.lines(10):
                            if line[0] == "A" and int(line[1]) == want:
                                latencies[system.name].append((int(line[3]) - t0) / 1e6)
                                done = True
                    time.sleep(0.005 if args.gap else 0.0005)  # its trailing work
                    own[system.name] += cpu_ns(system.pids[0]) - c0
                    if args.gap:
                        time.sleep(args.gap)
                    walls[system.name] += (time.monotonic_ns() - t0) / 1e6
                    redis_cpu[system.name] += cpu_ns(server.pid) - r0
            results = {
                s.name: (
                    (cpu_ns(s.pids[0]) - before[s.name]) / args.events / 1e6,
                    own[s.name] / args.events / 1e6,
                    redis_cpu[s.name] / args.events / 1e6,
                    summary(latencies[s.name]),
                    walls[s.name] / args.events,
                )
                for s in systems
            }
            for tracer in [*tracers, *([recorder] if recorder is not None else [])]:
                tracer.send_signal(signal.SIGINT)  # both write their output on SIGINT
                tracer.wait(30)
        finally:
            client.close()
            hot.close()
            floor.close()
    rows = [
        [name, cpu, mine, rcpu, stats["p50"], stats["p99"], wall]
        for name, (cpu, mine, rcpu, stats, wall) in results.items()
    ]
    print(
        table(
            f"one worker, {args.size} B events, {args.events} each (ms)",
            [
                "worker",
                "CPU/event",
                "of it to applied+5ms",
                "redis CPU/event",
                "XADD->applied p50",
                "p99",
                "wall/event",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
