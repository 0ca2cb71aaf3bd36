"""The follow loop's CPU per event, in one thread, without scheduling noise.

    python -m tests.benchmarks.profile_cycle [--size 1024] [--events 5000] [--pyinstrument]

Each iteration XADDs one valid event and runs one cycle of the subscriber's follow loop
(``Subscriber._cycle``: the previous event's reports and the ``XREAD``, which finds the new
entry at once, then verify, callback, ack); the same for the floor worker's loop (``XREAD`` +
SHA-256 + decode). CPU is this thread's (``time.thread_time``), minus a loop that only XADDs.
With ``--pyinstrument`` the subscriber's loop is profiled (``pip install pyinstrument``; not a
project dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from subscriber import Subscriber
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex
from subscriber.testing import RedisServer
from tests.benchmarks._common import KIB, content, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=KIB)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--pyinstrument", action="store_true")
    args = parser.parse_args(argv)
    key = "app.yaml"
    events = stream_keys(key).events
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-cycle-") as tmp,
        RedisServer(Path(tmp) / "redis", unix=not args.tcp) as server,
    ):
        writer = connect(server.url, socket_timeout=10)
        bodies = [content(i, args.size) for i in range(2)]
        digests = [sha256_hex(b) for b in bodies]
        counter = [0]

        def xadd(stream: str) -> None:
            counter[0] += 1
            i = counter[0] % 2
            writer.xadd(stream, {
                "schema": SCHEMA_VERSION, "key": key, "version": counter[0],
                "sha256": digests[i], "content": bodies[i], "published_at": now_ms(),
                "publisher": "bench:0",
            }, maxlen=100, approximate=True)  # fmt: skip

        xadd(events)
        applied: list[int] = []
        sub = Subscriber(key, lambda text: applied.append(len(text)), redis_url=server.url)
        sub._identify()
        sub._follow_begins()
        client = sub._connect(8.0)
        sub._resync(client)

        def hot_once() -> None:
            xadd(events)
            sub._cycle(client)

        floor_client = connect(server.url, socket_timeout=8.0)
        floor_stream = "floor"
        xadd(floor_stream)
        newest = cast("list[tuple[bytes, Any]]", floor_client.xrevrange(floor_stream, count=1))
        last: list[Any] = [newest[0][0]]

        def floor_once() -> None:
            xadd(floor_stream)
            reply = cast(
                "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                floor_client.xread({floor_stream: last[0]}, count=8, block=5000),
            )
            entry_id, fields = reply[0][1][-1]
            data = fields[b"content"]
            if hashlib.sha256(data).hexdigest().encode() != fields[b"sha256"]:
                raise ValueError("checksum mismatch")
            applied.append(len(data.decode()))
            last[0] = entry_id

        def xadd_only() -> None:
            xadd("other")

        loops: dict[str, Callable[[], None]] = {
            "xadd only": xadd_only,
            "hotreload cycle": hot_once,
            "floor loop": floor_once,
        }
        cpu: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):  # interleaved rounds against drift
            for name, once in loops.items():
                for _ in range(50):
                    once()
                began = time.thread_time()
                for _ in range(args.events):
                    once()
                cpu[name].append((time.thread_time() - began) / args.events * 1e6)
        if args.pyinstrument:
            # not a project dependency: imported by name so type checks pass without it
            profiler = importlib.import_module("pyinstrument").Profiler(interval=0.0001)
            profiler.start()
            for _ in range(args.events):
                hot_once()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False))
        client.close()
        floor_client.close()
        writer.close()
    base = statistics.median(cpu["xadd only"])
    rows = [
        [name, statistics.median(v), min(v), statistics.median(v) - base] for name, v in cpu.items()
    ]
    print(
        table(
            f"CPU per event in one thread (us), {args.size} B, {args.rounds} x {args.events}",
            ["loop", "median", "best", "minus xadd"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
