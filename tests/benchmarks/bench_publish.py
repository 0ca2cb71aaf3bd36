"""Publish latency: kubelet ``..data`` rename -> the entry is readable in Redis; and the
publish call itself against a plain ``XADD`` of the same entry.

End to end: the real daemon (``python -m publisher watch``) against the floor publisher (a
watchdog watch that reads, hashes and XADDs), side by side on one private redis-server,
updates alternating in random order. A reader blocked in ``XREAD`` on the updated stream
timestamps the entry's arrival (CLOCK_MONOTONIC, like the kubelet writer's ``t_rename_ns``).

The call (issue 21): ``Publisher.publish`` of a new content (hashed beforehand, as the daemon
does on intake) against, on the same connection in random order, a plain ``XADD`` of the same
fields (``MAXLEN ~`` the same history) and the least any script does (``EVALSHA`` of a script
that only makes that ``XADD``: every content passes through Lua once), each on its own key.

    python -m tests.benchmarks.bench_publish [--quick] [--only-call] [--kib RUNS]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex
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


_XADD_ONLY = """
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'schema', ARGV[2], 'key',
  ARGV[3], 'version', ARGV[4], 'sha256', ARGV[5], 'content', ARGV[6], 'published_at', ARGV[7],
  'publisher', ARGV[8])
"""
HISTORY = 100  # the daemon's default


def run_call(quick: bool = False) -> list[dict[str, Any]]:
    """``Publisher.publish`` against a plain ``XADD`` and an XADD-only script (see above)."""
    runs = (
        {KIB: 40, 64 * KIB: 20, 256 * KIB: 20, MIB_512: 20}
        if quick
        else {KIB: 300, 64 * KIB: 200, 256 * KIB: 100, MIB_512: 100}
    )
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-call-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        client = connect(server.url, socket_timeout=15)
        try:
            publisher = Publisher(client, history=HISTORY)
            xadd_only = client.register_script(_XADD_ONLY)
            seq = 0
            for size, count in runs.items():
                samples: dict[str, list[float]] = {"publish": [], "xadd": [], "script": []}
                versions = {"xadd": 0, "script": 0}
                for run_index in range(count + 5):
                    names = list(samples)
                    random.shuffle(names)
                    for name in names:
                        seq += 1
                        data = content(seq, size)
                        digest = sha256_hex(data)  # the daemon hashes on intake
                        key = f"call-{name}-{size}"
                        started = time.perf_counter_ns()
                        if name == "publish":
                            if not publisher.publish(key, data, sha256=digest).written:
                                raise RuntimeError("a new content was not written")
                        else:
                            versions[name] += 1
                            fields: list[bytes | str | int] = [
                                SCHEMA_VERSION, key, versions[name], digest, data, now_ms(),
                                "bench:1",
                            ]  # fmt: skip
                            stream = f"hotreload:{{{key}}}:events"
                            if name == "xadd":
                                client.xadd(stream, dict(zip(
                                    ["schema", "key", "version", "sha256", "content",
                                     "published_at", "publisher"], fields, strict=True)),
                                    maxlen=HISTORY, approximate=True)  # fmt: skip
                            else:
                                xadd_only(keys=[stream], args=[HISTORY, *fields])
                        elapsed = (time.perf_counter_ns() - started) / 1e6
                        if run_index >= 5:  # warm-up: the script cache, the allocator
                            samples[name].append(elapsed)
                pub, xadd, script = (summary(samples[n]) for n in ("publish", "xadd", "script"))
                rows.append({
                    "size": size_label(size), "size_bytes": size,
                    "publish": pub, "xadd": xadd, "script": script,
                    "ratio_p50": ratio(pub["p50"], xadd["p50"]),
                    "script_ratio_p50": ratio(script["p50"], xadd["p50"]),
                })  # fmt: skip
        finally:
            client.close()
    return rows


def run(quick: bool = False, only_call: bool = False, kib_runs: int = 0) -> dict[str, Any]:
    if only_call:
        began = time.monotonic()
        return {"rows": [], "call": run_call(quick), "seconds": round(time.monotonic() - began, 1)}
    runs = {KIB: 20, MIB_512: 5} if quick else {KIB: 100, 64 * KIB: 60, MIB_512: 20}
    if kib_runs:
        runs = {KIB: kib_runs}
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
    call = [] if kib_runs else run_call(quick)
    return {"rows": rows, "call": call, "seconds": round(time.monotonic() - began, 1)}


def render(result: dict[str, Any]) -> str:
    parts = [render_e2e(result)] if result["rows"] else []
    if result.get("call"):
        parts.append(table(
            "publish call vs plain XADD of the same entry, same connection (ms), unix socket",
            ["size", "runs", "publish p50", "publish p99", "XADD p50", "XADD p99",
             "script-only p50", "x p50", "script-only x p50"],
            [
                [r["size"], r["publish"]["n"], r["publish"]["p50"], r["publish"]["p99"],
                 r["xadd"]["p50"], r["xadd"]["p99"], r["script"]["p50"], r["ratio_p50"],
                 r["script_ratio_p50"]]
                for r in result["call"]
            ],
        ))  # fmt: skip
    return "\n\n".join(parts)


def render_e2e(result: dict[str, Any]) -> str:
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
    parser.add_argument(
        "--kib", type=int, default=0, metavar="RUNS", help="rename -> entry, 1 KiB only, RUNS pairs"
    )
    parser.add_argument("--only-call", action="store_true", help="the publish call alone")
    args = parser.parse_args(argv)
    result = run(args.quick, args.only_call, args.kib)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
