"""Rollout control: how fast a rollback reaches every worker, and how long a promotion takes
after its hold.

- **rollback vs publish**: 8 worker processes (``_pool.py sub``, forked from a preloaded
  parent, default settings) and ``hotreload watch``. Each run is one normal publish (a
  kubelet ``..data`` swap; timed from the rename to the last of the 8 callbacks) and one
  rollback request (the ``:control`` XADD ``hotreload rollback`` makes; timed from just before
  it to the last of the 8 callbacks, which run the previous content again). The next run's
  publish is a new content, which ends the pin. Same run, same Redis, alternating.
- **promotion delay**: ``hotreload watch --canary 1 --canary-hold 1`` and 8 workers; a new
  content is applied by the one canary worker first; the delay is from that apply + the hold
  to the last of the other 7 callbacks. Proof of survival is a heartbeat at least ``hold``
  after the apply, and the daemon judges running canaries every 0.25 s, so the delay is
  bounded by the workers' heartbeat interval plus that: measured with the default 5 s heartbeat and
  with 1 s.

    python -m tests.benchmarks.bench_rollout [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import KIB, Processes, content, processes, summary, table
from tests.benchmarks._systems import System

WORKERS = 8
HOLD_S = 1.0


def _daemon(procs: Processes, system: System, *options: str) -> None:
    system.mount.mkdir(parents=True, exist_ok=True)
    atomic_write(str(system.mount), {system.key: content(0, KIB)})
    argv = ["-m", "publisher", "watch", str(system.mount), "--redis", system.url,
            "--metrics-port", "0", "--log-level", "WARNING", *options]  # fmt: skip
    system.publisher = procs.python(*argv)
    system.wait_published(system.url)


def _applied(system: System, seq: int, count: int, timeout: float) -> list[int]:
    """CLOCK_MONOTONIC ns of the next ``count`` callbacks for update ``seq``."""
    times: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(times) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{len(times)} of {count} workers applied {seq} in {timeout} s")
        for line in system.reports.lines(remaining):
            if line[0] == "A" and int(line[1]) == seq:
                times[line[2]] = int(line[3])
    return sorted(times.values())


def rollback_vs_publish(procs: Processes, root: Path, url: str, runs: int) -> dict[str, Any]:
    system = System("hotreload", "sub", "app.yaml", root / "mount", url, procs)
    system.stream = stream_keys(system.key).events
    _daemon(procs, system)
    system.start_workers(WORKERS)
    client = connect(url, socket_timeout=5)
    publish_ms: list[float] = []
    rollback_ms: list[float] = []
    control = f"hotreload:{{{system.key}}}:control"
    try:
        for run, seq in enumerate(range(1, runs + 3)):
            published = system.update(seq, KIB)
            time.sleep(0.3)  # trailing acks and heartbeats settle
            system.reports.lines(0)
            started = time.monotonic_ns()
            client.xadd(control, {"op": "rollback", "to": "", "id": uuid.uuid4().hex,
                                  "by": "bench:0", "at": str(time.time_ns() // 10**6)})  # fmt: skip
            # the entry before the current one is the previous run's rollback, to content 0
            last = _applied(system, 0, WORKERS, 30)[-1]
            if run >= 2:  # warm-up
                publish_ms.append(published["last_ms"])
                rollback_ms.append((last - started) / 1e6)
            time.sleep(0.3)
            system.last_update = time.monotonic()
    finally:
        client.close()
        system.close()
    return {"publish": summary(publish_ms), "rollback": summary(rollback_ms)}


def promotion_delay(
    procs: Processes, root: Path, url: str, heartbeat: float, runs: int
) -> dict[str, Any]:
    system = System("hotreload", "sub", "app.yaml", root / f"mount-{heartbeat}", url, procs)
    system.stream = stream_keys(system.key).events
    client = connect(url, socket_timeout=5)
    client.delete(system.stream, stream_keys(system.key).workers, stream_keys(system.key).acks)
    client.close()
    _daemon(procs, system, "--canary", "1", "--canary-hold", str(HOLD_S))
    system.start_workers(WORKERS, extra=("--heartbeat", str(heartbeat)))
    delays: list[float] = []
    try:
        for seq in range(1, runs + 1):
            atomic_write(str(system.mount), {system.key: content(seq, KIB)})
            first = _applied(system, seq, 1, 30)[0]
            rest = _applied(system, seq, WORKERS - 1, 30 + heartbeat * 3)
            delays.append((rest[-1] - first) / 1e6 - HOLD_S * 1000)
            time.sleep(0.5)
    finally:
        system.close()
    return {"heartbeat_s": heartbeat, "delay_after_hold": summary(delays)}


def run(quick: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-rollout-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        rollback = rollback_vs_publish(procs, Path(tmp), server.url, 10 if quick else 40)
        promotions = [
            promotion_delay(procs, Path(tmp), server.url, beat, 3 if quick else runs)
            for beat, runs in ((1.0, 10), (5.0, 6))
        ]
    return {
        "workers": WORKERS,
        "hold_s": HOLD_S,
        "rollback": rollback,
        "promotion": promotions,
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    rb = result["rollback"]
    first = table(
        f"rollout: request or kubelet rename -> last of {result['workers']} workers applied (ms)",
        ["what", "runs", "p50", "p99", "max"],
        [[name, rb[name]["n"], rb[name]["p50"], rb[name]["p99"], rb[name]["max"]]
         for name in ("publish", "rollback")],
    )  # fmt: skip
    second = table(
        f"rollout: canary (1 of {result['workers']}, hold {result['hold_s']:g} s) apply + hold "
        "-> last other worker applied (ms)",
        ["heartbeat s", "runs", "p50", "p99", "max"],
        [[p["heartbeat_s"], p["delay_after_hold"]["n"], p["delay_after_hold"]["p50"],
          p["delay_after_hold"]["p99"], p["delay_after_hold"]["max"]]
         for p in result["promotion"]],
    )  # fmt: skip
    return first + "\n" + second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(run(args.quick)))


if __name__ == "__main__":
    main()
