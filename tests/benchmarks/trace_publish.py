"""Where the publisher's time goes between a kubelet swap and the entry in Redis, in process.

A ``Daemon`` runs on a thread of this process against a private redis-server; each update is
written the way kubelet writes it (``atomic_write``, whose ``t_rename_ns`` is the origin) and
every stage is time-stamped (CLOCK_MONOTONIC) by wrapping the daemon's own objects:

- ``coming``: the watcher's pre-read saw the new directory (``Daemon._coming``); ``asked``:
  the workers' floor was asked for (``publisher._earlyfloor``);
- ``swap_event``: watchdog's thread handed the ``..data`` move to the watcher; ``scan``: the
  swap's read was decided (``_check_and_scan`` on the watcher's worker, or ``_swap_here`` on
  watchdog's thread); ``read`` / ``read_done``: ``MountWatcher._scan``;
- ``delivered``: the watcher hands the swap's content to the daemon (``Intake.accept`` entry);
- ``accepted``: the intake recorded it (and woke the loop);
- ``woke``: the loop's ``Intake.wait`` returned (the last time before the call);
- ``take``, ``taken``: the publish reads the floor asked for (its reply);
- ``call``: the publish call began (``Release.publish``); ``returned``: it returned;
- ``entry``: a reader blocked in ``XREAD`` on the stream got the entry.

Also which thread made the call (``on_watcher``: the publish ran on the thread that delivered
the swap, i.e. no hand-off to the loop). p50 / p90 per stage, in ms after the rename::

    python -m tests.benchmarks.trace_publish [--runs 60] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

from publisher import _earlyfloor
from publisher.daemon import Daemon
from publisher.watcher import MountWatcher
from subscriber._redis import connect
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import content

STAGES = (
    "coming",
    "asked",
    "swap_event",
    "scan",
    "read",
    "read_done",
    "delivered",
    "accepted",
    "woke",
    "take",
    "taken",
    "call",
    "returned",
    "entry",
)


def _wrap(
    obj: Any, name: str, before: str | None, after: str | None, marks: dict[str, Any]
) -> None:
    inner = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            marks.setdefault(before, time.monotonic_ns())
            if before in {"call", "read"}:
                marks.setdefault(f"{before}_thread", threading.get_ident())
        try:
            return inner(*args, **kwargs)
        finally:
            if after == "woke" and "call" not in marks:
                marks["woke"] = time.monotonic_ns()  # the last wake-up before the call
            elif after is not None:
                marks.setdefault(after, time.monotonic_ns())
                if after == "accepted":
                    marks.setdefault("accept_thread", threading.get_ident())

    setattr(obj, name, wrapper)


def run(runs: int, size: int) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    on_watcher = late_floor = read_here = 0
    with (
        tempfile.TemporaryDirectory(prefix="hr-trace-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        mount = Path(tmp) / "mount"
        mount.mkdir()
        atomic_write(str(mount), {"app": content(0, size)})
        daemon = Daemon([str(mount)], redis_url=server.url)
        marks: dict[str, Any] = {}
        _wrap(daemon._intake, "accept", "delivered", "accepted", marks)
        _wrap(daemon._intake, "wait", None, "woke", marks)
        _wrap(daemon, "_coming", "coming", "asked", marks)
        _wrap(daemon._release, "publish", "call", "returned", marks)
        _wrap(daemon._early, "take", "take", "taken", marks)
        on_event = MountWatcher._on_event

        def swap_seen(watcher: MountWatcher, event: Any) -> None:
            paths = (event.src_path, getattr(event, "dest_path", b""))
            if any(os.fsdecode(path).endswith("/..data") for path in paths):
                marks.setdefault("swap_event", time.monotonic_ns())
                marks.setdefault("event_thread", threading.get_ident())
            on_event(watcher, event)

        MountWatcher._on_event = swap_seen  # type: ignore[method-assign,assignment]
        _wrap(MountWatcher, "_check_and_scan", "scan", None, marks)
        if hasattr(MountWatcher, "_swap_here"):  # read on watchdog's thread (swaps_on_event)
            _wrap(MountWatcher, "_swap_here", "scan", None, marks)
        _wrap(MountWatcher, "_scan", "read", "read_done", marks)
        _wrap(_earlyfloor, "read_workers_seen", "late_floor", None, marks)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        reader = connect(server.url, socket_timeout=15)
        try:
            stream = "hotreload:{app}:events"
            deadline = time.monotonic() + 10
            while not reader.xlen(stream):
                if time.monotonic() > deadline:
                    raise RuntimeError("the initial content was not published")
                time.sleep(0.01)
            time.sleep(0.3)
            for seq in range(1, runs + 3):
                newest = cast("list[tuple[bytes, Any]]", reader.xrevrange(stream, count=1))
                last = newest[0][0]
                marks.clear()
                renamed = atomic_write(str(mount), {"app": content(seq, size)})["t_rename_ns"]
                if not reader.xread({stream: last}, count=1, block=10_000):
                    raise RuntimeError(f"update {seq} was not published within 10 s")
                entry = time.monotonic_ns()
                time.sleep(0.05)  # let the stages after the entry land
                if seq <= 2:
                    continue
                row = {"entry": (entry - renamed) / 1e6}
                for stage in STAGES[:-1]:
                    if stage in marks:
                        row[stage] = (marks[stage] - renamed) / 1e6
                rows.append(row)
                on_watcher += marks.get("call_thread") == marks.get("accept_thread")
                late_floor += "late_floor" in marks
                read_here += marks.get("read_thread") == marks.get("event_thread")
                time.sleep(0.1)
        finally:
            reader.close()
            daemon.request_stop()
            thread.join(10)
    result: dict[str, Any] = {
        "runs": len(rows),
        "on_watcher": on_watcher,
        "on_event": read_here,
        "late": late_floor,
    }
    for stage in STAGES:
        values = sorted(row[stage] for row in rows if stage in row)
        if values:
            result[stage] = (
                round(statistics.median(values), 3),
                round(values[int(len(values) * 0.9)], 3),
                len(values),
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    result = run(args.runs, args.size)
    print(
        f"{result['runs']} updates, publish call on the delivering thread: {result['on_watcher']}"
        f", the workers' floor read at the publish (not before the swap): {result['late']}"
        f", the swap read on the thread that saw the rename: {result['on_event']}"
    )
    for stage in STAGES:
        if stage in result:
            p50, p90, n = result[stage]
            print(f"  {stage:<10} p50 {p50:7.3f} ms  p90 {p90:7.3f} ms  ({n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
