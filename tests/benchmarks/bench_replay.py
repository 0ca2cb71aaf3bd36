"""Replay: ``Subscriber.start()`` with 100 versions of history, against the floor.

In this process, against a private redis-server on a unix socket (the per-pod default), for
1 KiB, 64 KiB and 1 MiB - 512 B configs:

- ``start()``, newest accepted: connect, fetch the newest entry, verify, apply, write the ack
  and the worker state, start the follower thread;
- ``start()``, walk-back: the newest entry is rejected by the callback, the one before applied
  (two fetches, two acks);
- floor: the least code that gets a worker its config: connect, ``XREVRANGE COUNT 1``, verify
  the SHA-256, decode.

Runs alternate between the three (so each sees the same noise); 3 warm-up runs each.

    python -m tests.benchmarks.bench_replay [--quick]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import redis

from subscriber import Subscriber
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, append_event
from tests.benchmarks._common import KIB, MIB_512, content, ratio, size_label, summary, table

HISTORY = 100


def seed(url: str, key: str, size: int, reject_newest: bool) -> None:
    for version in range(1, HISTORY + 1):
        append_event(url, key, content(version, size), version=version)
    if reject_newest:
        rejected = b"REJECT" + content(HISTORY + 1, size)[6:]
        append_event(url, key, rejected, version=HISTORY + 1)


def apply(text: str) -> None:
    if text.startswith("REJECT"):
        raise ValueError("rejected by the benchmark")


def time_start(url: str, key: str) -> float:
    sub = Subscriber(key, apply, redis_url=url, worker_id="bench-replay")
    began = time.perf_counter()
    sub.start()
    took = (time.perf_counter() - began) * 1000
    sub.stop()
    return took


def time_floor(url: str, stream: str) -> float:
    began = time.perf_counter()
    client = redis.Redis.from_url(url)
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrevrange(stream, count=1))
    fields = entries[0][1]
    data = fields[b"content"]
    if hashlib.sha256(data).hexdigest().encode() != fields[b"sha256"]:
        raise ValueError("checksum mismatch")
    data.decode()
    took = (time.perf_counter() - began) * 1000
    client.close()
    return took


def run(quick: bool = False) -> dict[str, Any]:
    runs = {KIB: 20, 64 * KIB: 30, MIB_512: 5} if quick else {KIB: 200, 64 * KIB: 200, MIB_512: 40}
    began = time.monotonic()
    # rejections in the walk-back runs are expected: keep them off the output
    logging.getLogger("subscriber").setLevel(logging.ERROR)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-replay-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        for size, count in runs.items():
            plain, walk = f"plain-{size}.yaml", f"walk-{size}.yaml"
            seed(server.url, plain, size, reject_newest=False)
            seed(server.url, walk, size, reject_newest=True)
            cases: dict[str, Callable[[], float]] = {
                "newest accepted": functools.partial(time_start, server.url, plain),
                "walk back past a rejected newest": functools.partial(time_start, server.url, walk),
                "floor": functools.partial(time_floor, server.url, stream_keys(plain).events),
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for index in range(count + 3):
                for name, once in cases.items():
                    took = once()
                    if index >= 3:
                        samples[name].append(took)
            floor = summary(samples["floor"])
            for name in ("newest accepted", "walk back past a rejected newest"):
                stats = summary(samples[name])
                rows.append({
                    "size": size_label(size), "size_bytes": size, "case": name,
                    "start": stats, "floor": floor,
                    "ratio_p50": ratio(stats["p50"], floor["p50"]),
                })  # fmt: skip
    return {"rows": rows, "history": HISTORY, "seconds": round(time.monotonic() - began, 1)}


def render(result: dict[str, Any]) -> str:
    return table(
        f"replay: start() with {result['history']} versions of history (ms), unix socket",
        ["size", "case", "runs", "p50", "p99", "floor p50", "floor p99", "x p50"],
        [
            [r["size"], r["case"], r["start"]["n"], r["start"]["p50"], r["start"]["p99"],
             r["floor"]["p50"], r["floor"]["p99"], r["ratio_p50"]]
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
