"""Detection latency of ``publisher.FileWatcher``: from the change on disk to the callback.

- kubelet: one key of a ConfigMap-style volume updated by the vendored AtomicWriter; measured
  from ``t_rename_ns`` (just before the ``..data_tmp`` -> ``..data`` rename) to the callback's
  first line.
- in-place: truncate + write + close of a file in a plain directory; measured from just after
  ``close()`` to the callback. By design this includes ``settle``: plain-directory content is
  handed out once two reads ``settle`` apart agree.

Updates are spaced a little more than ``settle`` apart so that each one is a lone change (within
a burst, reports are folded into one per ``settle``). p50/p99/max over the run counts shown.

    python -m tests.benchmarks.bench_detection [--updates 500] [--in-place 200] [--settle 0.1]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from publisher.watcher import FileWatcher
from tests._vendor.k8s_atomic_writer import atomic_write


class Stopwatch:
    """A FileWatcher callback that notes when it is entered and wakes the measuring thread."""

    def __init__(self) -> None:
        self.entered_ns = 0
        self.called = threading.Event()

    def __call__(self, content: str) -> None:
        self.entered_ns = time.monotonic_ns()
        self.called.set()


def measure(
    runs: int,
    settle: float,
    watcher: FileWatcher,
    stopwatch: Stopwatch,
    change: Callable[[int], int],
) -> list[float]:
    """``change(i)`` makes the i-th change and returns its monotonic_ns; latencies in ms."""
    latencies = []
    for i in range(1, runs + 1):
        stopwatch.called.clear()
        changed_ns = change(i)
        if not stopwatch.called.wait(10):
            raise SystemExit(f"update {i} was not detected within 10 s")
        latencies.append((stopwatch.entered_ns - changed_ns) / 1e6)
        # Let the settle window after this report pass, with jitter against phase locking.
        time.sleep(settle + random.uniform(0.005, 0.02))
    assert watcher.reload_count == runs
    return latencies


def report(what: str, latencies: list[float]) -> None:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(
        f"{what:<34} n={len(ordered):<4} p50 {at(0.5):7.2f} ms   p99 {at(0.99):7.2f} ms   "
        f"max {ordered[-1]:7.2f} ms"
    )


def bench_kubelet(root: Path, runs: int, settle: float) -> list[float]:
    directory = root / "volume"
    directory.mkdir()
    other = b"other: untouched\n"
    atomic_write(str(directory), {"app.yaml": b"version: 0\n", "other.yaml": other})
    stopwatch = Stopwatch()

    def change(i: int) -> int:
        payload = {"app.yaml": f"version: {i}\n".encode(), "other.yaml": other}
        summary = atomic_write(str(directory), payload)
        rename_ns: int = summary["t_rename_ns"]
        return rename_ns

    with FileWatcher(directory / "app.yaml", stopwatch, settle=settle) as watcher:
        return measure(runs, settle, watcher, stopwatch, change)


def bench_in_place(root: Path, runs: int, settle: float) -> list[float]:
    directory = root / "plain"
    directory.mkdir()
    path = directory / "app.yaml"
    path.write_text("version: 0\n")
    stopwatch = Stopwatch()

    def change(i: int) -> int:
        with path.open("w") as file:
            file.write(f"version: {i}\n" + "#" * 1024)
        return time.monotonic_ns()

    with FileWatcher(path, stopwatch, settle=settle) as watcher:
        return measure(runs, settle, watcher, stopwatch, change)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=500, help="kubelet updates (500)")
    parser.add_argument("--in-place", type=int, default=200, help="in-place writes (200)")
    parser.add_argument("--settle", type=float, default=0.1, help="FileWatcher settle (0.1 s)")
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()}, watchdog {version('watchdog')}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs, settle {args.settle} s"
    )
    with tempfile.TemporaryDirectory() as root:
        report("kubelet rename -> callback", bench_kubelet(Path(root), args.updates, args.settle))
        if args.in_place:
            latencies = bench_in_place(Path(root), args.in_place, args.settle)
            report("in-place close -> callback", latencies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
