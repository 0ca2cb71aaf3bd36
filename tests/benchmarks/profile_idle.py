"""The idle daemon per thread: CPU of each named thread and the Redis commands it sends.

    python -m tests.benchmarks.profile_idle [--keys 1 100 1000] [--window 60] [--runs 3]
        [--metrics-port-off] [--workers 32] [--against /path/to/other/checkout]
        [--yappi OUT_PREFIX]

``hotreload watch`` as deployed (metrics port on, so its ack follower runs), on a private
redis-server (unix socket) and a kubelet-style mount of N keys of 1 KiB. Once every key is
published and the daemon settled, a quiet window: every thread's schedstat time
(``/proc/PID/task/*/schedstat``) and wake-ups (voluntary context switches), by the name of
its Python thread (a thread of the daemon's
process writes ``{native_id: name}`` to a file every 2 s; that thread is left out), and the
commands Redis ran per second (``INFO commandstats``, reset before the window).

``--workers N`` (with ``--keys 1``): N idle workers of the key (``Subscriber`` processes of
this checkout, as in ``bench_idle``), which got ``bench_idle``'s 32 updates before the
window, so the key's ``:acks`` stream holds what a pod that has run a while holds and its
``:workers`` N states.

``--yappi OUT_PREFIX``: also a per-function profile of the window (yappi, CPU clock, every
thread but the wrapper's; yappi must be installed in the venv, it is not a dependency),
written to ``OUT_PREFIX-<code>-<keys>-<run>.txt``. Its overhead inflates the figures: use
it to see where the time goes, the runs without it for the figures.

``--against``: a second checkout (e.g. a worktree of main): each run measures it and this
one alternately, in the same window of machine load, so the two can be compared.

What one wake-up costs moves ~10x on these VMs within hours (docs/performance.md, "What an
idle figure means"), so each window also measures a reference beside the daemon: a Python
process whose thread sleeps 1 s at a time while its main thread joins it (the daemon's
shape: a loop thread, helper threads, a main thread waiting). A row gives the daemon's
wake-ups a second over all its threads (``wakeups_total_per_s``) and CPU per wake-up
(``us_per_wakeup``), the reference's (``ref``), and the daemon's CPU counted in the
reference's wake-ups (``ref_wakeups_per_s``: the daemon costs as much as a thread waking that
often right now): a figure to judge against the machine's current wake-up cost, which a
percentage alone is not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from subscriber._redis import connect
from subscriber._testing_process import stop_process
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, free_port
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import KIB, REPO, content, processes, wait_for
from tests.benchmarks._systems import System
from tests.benchmarks.bench_idle import PREFILL_UPDATES, commandstats, thread_cpu_ns
from tests.benchmarks.bench_keys import _all_published, names

_WRAPPER = """
import json, os, runpy, sys, threading, time
PROFILE = os.environ.get("HR_YAPPI")
if PROFILE:
    import yappi
    yappi.set_clock_type("cpu")
    yappi.start()
def names():
    while True:
        time.sleep(2)
        with open(os.environ["HR_THREADS"] + ".tmp", "w") as f:
            json.dump({t.native_id: t.name for t in threading.enumerate()}, f)
        os.replace(os.environ["HR_THREADS"] + ".tmp", os.environ["HR_THREADS"])
        if PROFILE and os.path.exists(PROFILE + ".reset"):
            os.unlink(PROFILE + ".reset")
            yappi.clear_stats()
        if PROFILE and os.path.exists(PROFILE + ".dump"):
            os.unlink(PROFILE + ".dump")
            by_tid = {t.native_id: t.name for t in threading.enumerate()}
            with open(PROFILE, "w") as out:
                for thread in yappi.get_thread_stats():
                    name = by_tid.get(thread.tid, thread.name)
                    if name == "profile_idle":
                        continue
                    stats = yappi.get_func_stats(filter={"ctx_id": thread.id})
                    out.write(f"== thread {name} cpu {thread.ttot * 1000:.1f} ms\\n")
                    stats.sort("ttot").print_all(out=out, columns={
                        0: ("name", 90), 1: ("ncall", 8), 2: ("tsub", 8), 3: ("ttot", 8)})
            os.replace(PROFILE, PROFILE + ".done")
threading.Thread(target=names, daemon=True, name="profile_idle").start()
sys.argv = ["hotreload", *sys.argv[1:]]
runpy.run_module("publisher", run_name="__main__")
"""


_REFERENCE = """
import threading, time
def tick():
    while True:
        time.sleep(1.0)
thread = threading.Thread(target=tick, name="reference", daemon=True)
thread.start()
print(thread.native_id, flush=True)
thread.join()
"""


def measure(
    repo: Path,
    count: int,
    window: float,
    metrics: bool,
    *,
    workers: int = 0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One quiet window of a daemon run from checkout ``repo`` (``workers``: idle workers of
    the first key; ``profile``: where to write a yappi profile of the window)."""
    keys = names(count)
    with (
        tempfile.TemporaryDirectory(prefix="hr-profile-idle-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
        reference() as ref_tid,
    ):
        mount = Path(tmp) / "mount"
        mount.mkdir()
        atomic_write(str(mount), {key: content(0, KIB) for key in keys})
        threads_file = Path(tmp) / "threads.json"
        env = dict(os.environ, PYTHONPATH=str(repo), HR_THREADS=str(threads_file))
        yappi_out = Path(tmp) / "yappi.txt"
        if profile is not None:
            env["HR_YAPPI"] = str(yappi_out)
        port = str(free_port() if metrics else 0)
        argv = ["watch", str(mount), "--redis", server.url, "--metrics-port", port]
        daemon = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, *argv, "--log-level", "WARNING"], env=env, cwd=repo
        )
        client = connect(server.url, socket_timeout=10)
        pod = System("hotreload", "sub", keys[0], mount, server.url, procs)
        pod.stream = stream_keys(keys[0]).events
        try:
            wait_for(lambda: _all_published(client, keys), f"{count} keys published", 600)
            if workers:
                pod.start_workers(workers)
                for seq in range(1, 1 + PREFILL_UPDATES):  # :acks at its trimmed length
                    pod.update(seq, KIB)  # the mount holds this one key (--keys 1)
            # start-up work behind; with workers, the ack follower's pass after their last
            # acks too (its next 10 s tick: 6 s was not always enough, and one such pass in
            # a window, ~14 ms of CPU, moved a 60 s figure by ~0.02 %)
            time.sleep(4.0 + count / 400 + (16.0 if workers else 0.0))
            client.config_resetstat()
            if profile is not None:
                Path(f"{yappi_out}.reset").touch()
                wait_for(lambda: not Path(f"{yappi_out}.reset").exists(), "yappi reset", 10)
            woken, ref_before = thread_wakeups(daemon.pid), _task(ref_tid)
            before, began = thread_cpu_ns(daemon.pid), time.monotonic()
            time.sleep(window)
            after, wall = thread_cpu_ns(daemon.pid), time.monotonic() - began
            woken_after, ref_after = thread_wakeups(daemon.pid), _task(ref_tid)
            if profile is not None:
                Path(f"{yappi_out}.dump").touch()
                wait_for(lambda: Path(f"{yappi_out}.done").exists(), "yappi dump", 30)
                profile.write_text(Path(f"{yappi_out}.done").read_text())
            stats = commandstats(server.url)
            thread_names = json.loads(threads_file.read_text())
        finally:
            client.close()
            pod.stop_workers()
            pod.reports.close()
            stop_process(daemon, 10)
    threads: dict[str, float] = {}
    wakeups: dict[str, float] = {}
    spent_ns = total_woken = 0
    for tid, ns in after.items():
        name = thread_names.get(str(tid), "(unnamed)")
        if name == "profile_idle":
            continue
        if name.startswith("hotreload-watch "):
            name = "hotreload-watch"
        spent_ns += ns - before.get(tid, 0)
        total_woken += woken_after.get(tid, 0) - woken.get(tid, 0)
        pct = (ns - before.get(tid, 0)) / 1e9 / wall * 100
        threads[name] = round(threads.get(name, 0.0) + pct, 4)
        woke = (woken_after.get(tid, 0) - woken.get(tid, 0)) / wall
        wakeups[name] = round(wakeups.get(name, 0.0) + woke, 2)
    ref_ns, ref_woken = ref_after[0] - ref_before[0], ref_after[1] - ref_before[1]
    ref_cost = ref_ns / max(1, ref_woken)  # ns of CPU per wake-up of the reference
    return {
        "keys": count,
        "workers": workers,
        "window_s": round(wall, 1),
        "total_pct": round(sum(threads.values()), 4),
        "wakeups_total_per_s": round(total_woken / wall, 2),
        "us_per_wakeup": round(spent_ns / 1000 / max(1, total_woken), 1),
        "ref": {
            "pct": round(ref_ns / 1e9 / wall * 100, 4),
            "wakeups_per_s": round(ref_woken / wall, 2),
            "us_per_wakeup": round(ref_cost / 1000, 1),
        },
        "ref_wakeups_per_s": round(spent_ns / ref_cost / wall, 2),
        "threads_pct": dict(sorted(threads.items(), key=lambda item: -item[1])),
        "wakeups_per_s": {name: wakeups[name] for name in threads if wakeups[name]},
        "commands_per_s": {
            command: round(calls / wall, 2)
            for command, calls in sorted(stats.items())
            if not command.startswith("config")
        },
        "load_1m": round(os.getloadavg()[0], 2),
    }


@contextlib.contextmanager
def reference() -> Iterator[int]:
    """The reference process (``_REFERENCE``) for the window; yields its thread's id."""
    proc = subprocess.Popen([sys.executable, "-c", _REFERENCE], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        stop_process(proc, 5)


def _task(tid: int) -> tuple[int, int]:
    """A thread's CPU (ns, schedstat) and voluntary context switches, by its id alone
    (``/proc/TID`` is its task)."""
    cpu = int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return cpu, int(line.split()[1])
    return cpu, 0


def thread_wakeups(pid: int) -> dict[int, int]:
    """Each thread's voluntary context switches (``/proc/PID/task/*/status``): how often it
    blocked, so about how often it woke up."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    counts[int(task.name)] = int(line.split()[1])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--metrics-port-off", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="idle workers of the first key")
    parser.add_argument("--yappi", type=Path, help="write per-function profiles here (prefix)")
    parser.add_argument("--against", type=Path, help="another checkout, run alternately")
    args = parser.parse_args(argv)
    if args.workers and args.keys != [1]:
        parser.error("--workers: with --keys 1 only (an update writes the one key)")
    checkouts = [("this", REPO)] + ([("against", args.against.resolve())] if args.against else [])
    for run in range(1, args.runs + 1):
        for count in args.keys:
            for label, repo in checkouts if run % 2 else checkouts[::-1]:
                profile = None
                if args.yappi:
                    profile = Path(f"{args.yappi}-{label}-{count}-{run}.txt")
                row = measure(
                    repo,
                    count,
                    args.window,
                    not args.metrics_port_off,
                    workers=args.workers,
                    profile=profile,
                )
                print(json.dumps({"run": run, "code": label, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
