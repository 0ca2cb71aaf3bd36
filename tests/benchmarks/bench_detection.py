"""Detection latency of ``publisher.FileWatcher``: from the change on disk to the callback.

- kubelet: one key of a ConfigMap-style volume updated by the vendored AtomicWriter; measured
  from ``t_rename_ns`` (just before the ``..data_tmp`` -> ``..data`` rename) to the callback's
  first line. The floor watches the same directory during the same updates: a bare watchdog
  observer whose handler notes the ``..data`` move (no read, no hash, no callback thread).
- in-place: truncate + write + close of a file in a plain directory; measured from just after
  ``close()`` to the callback. By design this includes ``settle``: plain-directory content is
  handed out once two reads ``settle`` apart agree.

Updates are spaced a little more than ``settle`` apart so that each one is a lone change.
p50/p99/max over the run counts shown.

Bursts: kubelet swaps every 20 and 50 ms for 2 s (faster than one per ``settle``): how many
reports the watcher makes, and the last swap's rename -> the report of its content.

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
from typing import Any

from watchdog.events import DirMovedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from publisher.filewatcher import FileWatcher
from publisher.watcher import MountContent, MountWatcher
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import ratio, summary, table


class Stopwatch:
    """A FileWatcher callback that notes when it is entered and wakes the measuring thread."""

    def __init__(self) -> None:
        self.entered_ns = 0
        self.called = threading.Event()

    def __call__(self, content: str) -> None:
        self.entered_ns = time.monotonic_ns()
        self.called.set()


class RawWatch(FileSystemEventHandler):
    """The floor: a bare watchdog handler noting when ``..data`` is moved into place."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_ns = 0
        self.seen = threading.Event()

    def on_moved(self, event: FileSystemEvent) -> None:
        if os.path.basename(str(event.dest_path)) == "..data":
            self.seen_ns = time.monotonic_ns()
            self.seen.set()


def measure(
    runs: int,
    settle: float,
    watcher: FileWatcher,
    stopwatch: Stopwatch,
    change: Callable[[int], int],
    *,
    raw: RawWatch | None = None,
) -> tuple[list[float], list[float]]:
    """``change(i)`` makes the i-th change and returns its monotonic_ns; latencies in ms."""
    latencies, floor = [], []
    for i in range(1, runs + 1):
        stopwatch.called.clear()
        if raw is not None:
            raw.seen.clear()
        changed_ns = change(i)
        if not stopwatch.called.wait(10):
            raise SystemExit(f"update {i} was not detected within 10 s")
        latencies.append((stopwatch.entered_ns - changed_ns) / 1e6)
        if raw is not None:
            if not raw.seen.wait(10):
                raise SystemExit(f"update {i} was not seen by the raw watch within 10 s")
            floor.append((raw.seen_ns - changed_ns) / 1e6)
        # Let the settle window after this report pass, with jitter against phase locking.
        time.sleep(settle + random.uniform(0.005, 0.02))
    assert watcher.reload_count == runs + 1  # the initial load is reload 1
    return latencies, floor


def bench_kubelet(root: Path, runs: int, settle: float) -> tuple[list[float], list[float]]:
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

    raw = RawWatch()
    observer = Observer()
    observer.schedule(
        raw, str(directory), recursive=False, event_filter=[FileMovedEvent, DirMovedEvent]
    )
    observer.start()
    try:
        with FileWatcher(directory / "app.yaml", stopwatch, settle=settle) as watcher:
            return measure(runs, settle, watcher, stopwatch, change, raw=raw)
    finally:
        observer.stop()
        observer.join(5)


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
        return measure(runs, settle, watcher, stopwatch, change)[0]


def bench_burst(root: Path, interval: float, duration: float, settle: float) -> dict[str, Any]:
    """Swaps every ``interval`` s for ``duration`` s: swaps, reports, the last one's latency."""
    directory = root / f"burst-{round(interval * 1000)}"
    directory.mkdir()
    atomic_write(str(directory), {"app.yaml": b"0"})
    reports: list[tuple[int, bytes]] = []  # (monotonic ns, content)

    def on_change(content: MountContent) -> None:
        reports.append((time.monotonic_ns(), content.files.get("app.yaml", b"")))

    with MountWatcher(directory, on_change, settle=settle):
        swaps, last_ns = 0, 0
        end = time.monotonic() + duration
        while time.monotonic() < end:
            swaps += 1
            last_ns = atomic_write(str(directory), {"app.yaml": str(swaps).encode()})["t_rename_ns"]
            time.sleep(interval)
        final = str(swaps).encode()
        deadline = time.monotonic() + 10
        while not any(data == final for _, data in reports) and time.monotonic() < deadline:
            time.sleep(0.005)
    arrived = next(at for at, data in reports if data == final)
    return {
        "interval_ms": round(interval * 1000),
        "swaps": swaps,
        "reports": len(reports),
        "last_ms": round((arrived - last_ns) / 1e6, 2),
    }


def run(quick: bool = False, updates: int = 0, in_place: int = -1) -> dict[str, Any]:
    updates = updates or (40 if quick else 150)
    in_place = in_place if in_place >= 0 else (10 if quick else 40)
    settle = 0.1
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hr-bench-detect-") as root:
        kubelet, floor = bench_kubelet(Path(root), updates, settle)
        plain = bench_in_place(Path(root), in_place, settle) if in_place else []
        bursts = [bench_burst(Path(root), interval, 2.0, settle) for interval in (0.02, 0.05)]
    hot, raw = summary(kubelet), summary(floor)
    return {
        "settle_s": settle,
        "kubelet": hot,
        "kubelet_floor": raw,
        "ratio_p50": ratio(hot["p50"], raw["p50"]),
        "in_place": summary(plain),
        "bursts": bursts,
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    hot, raw, plain = result["kubelet"], result["kubelet_floor"], result["in_place"]
    rows = [
        ["kubelet rename -> FileWatcher callback", hot["n"], hot["p50"], hot["p99"], hot["max"]],
        ["kubelet rename -> bare watchdog handler", raw["n"], raw["p50"], raw["p99"], raw["max"]],
    ]
    if plain["n"]:
        rows.append(["in-place close -> callback (incl. settle)", plain["n"], plain["p50"],
                     plain["p99"], plain["max"]])  # fmt: skip
    bursts = table(
        "kubelet swap bursts (2 s each): reports made, last swap's rename -> its report",
        ["swap every ms", "swaps", "reports", "last ms"],
        [[b["interval_ms"], b["swaps"], b["reports"], b["last_ms"]] for b in result["bursts"]],
    )
    return (
        table(
            f"detection: FileWatcher (settle {result['settle_s']} s), same updates (ms)",
            ["what", "runs", "p50", "p99", "max"],
            rows,
        )
        + "\n"
        + bursts
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--updates", type=int, default=500, help="kubelet updates (500)")
    parser.add_argument("--in-place", type=int, default=200, help="in-place writes (200)")
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()}, watchdog {version('watchdog')}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs"
    )
    print(render(run(updates=args.updates, in_place=args.in_place)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
