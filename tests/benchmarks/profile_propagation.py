"""Where the propagation time goes: CPU per update of each process, and optional py-spy flame
data of one worker and of the publisher (``pip install py-spy``; not a project dependency).

    python -m tests.benchmarks.profile_propagation [--workers 8] [--size 1024] [--updates 200]
        [--py-spy DIR]

Runs both systems of ``bench_propagation`` (hotreload and the floor) with N workers, makes
``--updates`` updates to each, and prints the CPU each kind of process spent per update
(schedstat, all threads): the workers (mean per worker), the publisher and redis-server. With
``--py-spy DIR`` it also records one worker and each publisher at 1000 Hz (collapsed stacks in
DIR, for ``flamegraph.pl`` or speedscope).

The second table splits each system's time at the moment Redis appended the entry: its
stream id is Redis's clock (CLOCK_REALTIME) in whole milliseconds at ``XADD``, so rename ->
appended is the publisher's share and appended -> the first / last worker the workers'. One
id is only good to a millisecond, so these are means over the updates, each id taken as the
middle of its millisecond (+0.5 ms): the mean is then exact to within the clocks' drift.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from subscriber._redis import connect
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import KIB, content, cpu_ns, processes, summary, table
from tests.benchmarks._systems import SPACING, System, make_systems
from tests.benchmarks.bench_propagation import TRAILING


def cpu_of(system: System) -> dict[str, int]:
    assert system.publisher is not None
    return {
        "workers": sum(cpu_ns(pid) for pid in system.pids),
        "publisher": cpu_ns(system.publisher.pid),
    }


THREAD_NAMES: dict[int, str] = {}  # tid -> Python thread name (py-spy dump, when there)


def name_threads(pid: int) -> None:
    """Python's thread names are not the kernel's: ask py-spy (when installed) once."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                          timeout=30, check=False).stdout  # fmt: skip
    for line in dump.splitlines():
        # Thread 0x7F... (active+gil): "MainThread"  /  Thread 1234 (idle): "name"
        if line.startswith("Thread ") and '"' in line:
            head, _, rest = line.partition(" (")
            native = rest.split(")", 1)[0]
            name = line.split('"')[1]
            tid = head.split()[1]
            THREAD_NAMES[int(tid, 16) if tid.startswith("0x") else int(tid)] = name
            del native


def threads_cpu(pid: int) -> dict[str, int]:
    """CPU (ns) of each thread of ``pid`` by name (threads of one name summed)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = THREAD_NAMES.get(int(task.name), task.name)
            out[name] = out.get(name, 0) + int((task / "schedstat").read_text().split()[0])
    return out


def split_update(
    system: System, reader: Any, seq: int, size: int, redis_pid: int
) -> dict[str, float]:
    """``System.update``, also returning when Redis appended the entry (see the module):
    rename -> appended, -> first and -> last worker applied (ms); and the CPU the workers
    (all of them), the publisher and redis-server spent from the moment before kubelet's
    write to the last worker's report (ms): what competes for the cores in the update's
    window, the held reports excluded."""
    wait = system.last_update + SPACING - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    system.reports.lines(0)
    pids = [*system.pids, system.publisher.pid if system.publisher else 0, redis_pid]
    threads0 = threads_cpu(pids[-2]) if pids[-2] else {}
    cpu0 = [cpu_ns(pid) for pid in pids]
    renamed: int = atomic_write(str(system.mount), {system.key: content(seq, size)})["t_rename_ns"]
    system.last_update = time.monotonic()
    times: list[int] = []
    deadline = time.monotonic() + 30
    while len(times) < system.workers and time.monotonic() < deadline:
        for line in system.reports.lines(1):
            if line[0] == "A" and int(line[1]) == seq:
                times.append(int(line[3]))
    if len(times) < system.workers:
        raise RuntimeError(f"{system.name}: update {seq} not applied within 30 s")
    cpu1 = [cpu_ns(pid) for pid in pids]
    threads1 = threads_cpu(pids[-2]) if pids[-2] else {}
    spent = [(b - a) / 1e6 for a, b in zip(cpu0, cpu1, strict=True)]
    offset = time.time_ns() - time.monotonic_ns()  # CLOCK_REALTIME - CLOCK_MONOTONIC
    newest = reader.xrevrange(system.stream, count=1)
    millis = int(newest[0][0].split(b"-")[0])
    appended = millis * 1_000_000 + 500_000 - offset
    times.sort()
    return {"appended_ms": (appended - renamed) / 1e6, "first_ms": (times[0] - renamed) / 1e6,
            "last_ms": (times[-1] - renamed) / 1e6, "workers_cpu": sum(spent[:-2]),
            "publisher_cpu": spent[-2], "redis_cpu": spent[-1],
            **{f"thread {name}": (ns - threads0.get(name, 0)) / 1e6
               for name, ns in threads1.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--size", type=int, default=KIB)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--metrics", action="store_true", help="daemon with its ack follower")
    parser.add_argument("--py-spy", type=Path, default=None, help="record flame data here")
    args = parser.parse_args(argv)
    splits: dict[str, list[dict[str, float]]] = {"hotreload": [], "floor": []}
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
            # a sweep of the daemon's (every 4 checks of 1 s) after every worker wrote its row
            time.sleep(4.5)
            for system in (hot, floor):
                assert system.publisher is not None
                name_threads(system.publisher.pid)
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
                            "--format", "raw", "--output", str(out), "--nonblocking",
                        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                time.sleep(1.0)
            before = {s.name: cpu_of(s) for s in (hot, floor)}
            redis_before = cpu_ns(server.pid)
            latencies: dict[str, list[float]] = {"hotreload": [], "floor": []}
            redis_cpu: dict[str, int] = {"hotreload": 0, "floor": 0}
            calls: dict[str, dict[str, list[int]]] = {"hotreload": {}, "floor": {}}
            seq = 0
            reader = connect(server.url, socket_timeout=10)
            for _ in range(args.updates):
                for system in (hot, floor):
                    seq += 1
                    r0, c0 = cpu_ns(server.pid), command_stats(reader)
                    result = split_update(system, reader, seq, args.size, server.pid)
                    splits[system.name].append(result)
                    time.sleep(min(0.5, result["last_ms"] / 1000) + TRAILING)
                    redis_cpu[system.name] += cpu_ns(server.pid) - r0
                    tally(calls[system.name], c0, command_stats(reader))
                    latencies[system.name].append(result["last_ms"])
            after = {s.name: cpu_of(s) for s in (hot, floor)}
            reader.close()
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
    print(render_split(splits))
    print(render_calls(calls, args.updates))
    return 0


def command_stats(client: Any) -> dict[str, tuple[int, int]]:
    """Redis's ``INFO commandstats``: command -> (calls, usec), Lua's own calls included."""
    stats = client.info("commandstats")
    return {name[8:]: (v["calls"], v["usec"]) for name, v in stats.items()}


def tally(
    into: dict[str, list[int]],
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
) -> None:
    for name, (count, usec) in after.items():
        was = before.get(name, (0, 0))
        if count > was[0]:
            total = into.setdefault(name, [0, 0])
            total[0] += count - was[0]
            total[1] += usec - was[1]


def render_calls(calls: dict[str, dict[str, list[int]]], updates: int) -> str:
    """Redis's work per update and quiet gap, by command: calls and server time (us); the
    measuring client's own ``INFO`` and ``XREVRANGE`` are counted in both systems alike."""
    rows = []
    for name, by in calls.items():
        for command, (count, usec) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            rows.append([name, command, round(count / updates, 2), round(usec / updates, 1)])
    return table(
        "Redis's commands per update (commandstats; script calls inside EVALSHA included)",
        ["system", "command", "calls", "usec"],
        rows,
    )


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3)


def render_split(splits: dict[str, list[dict[str, float]]]) -> str:
    rows = []
    for name, results in splits.items():
        appended = [r["appended_ms"] for r in results]
        rows.append([name, len(results), mean(appended),
                     mean([r["first_ms"] - r["appended_ms"] for r in results]),
                     mean([r["last_ms"] - r["appended_ms"] for r in results]),
                     mean([r["last_ms"] for r in results]),
                     mean([r["workers_cpu"] for r in results]),
                     mean([r["publisher_cpu"] for r in results]),
                     mean([r["redis_cpu"] for r in results])])  # fmt: skip
    threads = [
        [name, thread[7:], mean([r.get(thread, 0.0) for r in results])]
        for name, results in splits.items()
        for thread in sorted({k for r in results for k in r if k.startswith("thread ")})
    ]
    print(table("the publisher's CPU in the window by thread, mean (ms)",
                ["system", "thread", "CPU"], threads))  # fmt: skip
    return table(
        "where the time goes, means (ms): rename -> Redis appended the entry (publisher), "
        "-> the first / the last worker applied (workers); CPU in the update's window (the "
        "kubelet write to the last report): all workers, the publisher, redis-server",
        ["system", "updates", "rename->appended", "->first", "->last", "rename->last",
         "workers CPU", "publisher CPU", "redis CPU"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
