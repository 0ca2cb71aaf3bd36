"""CPU per subscriber and update of many asyncio subscribers in one process (bench_scale's
case, one of its 4 processes): ``AsyncSubscriber`` objects against raw ``redis.asyncio``
``XREAD`` loops that verify the hash, one kind per run.

    python -m tests.benchmarks.profile_async [--kind hot|floor] [--per 250] [--updates 40]
        [--profile] [--cluster]

No publisher: this process XADDs valid entries (from a thread, so the loop measured is the
subscribers' alone) and waits until every subscriber's callback saw each one; the process's
CPU per update over the subscribers is what the kinds cost. ``--profile`` prints cProfile's
top functions (its overhead inflates the figures several times; read it for shares).
``--cluster``: on a 6-node Redis Cluster (bench_scale ``--cluster``'s case): each XADD is
announced on the key's shard channel as the publish script does; the subscribers are given a
master that does not own the key's slot, the floor's loops the owner.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import redis.asyncio

from subscriber import AsyncSubscriber
from subscriber._clusterplan import notify_channel
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex
from subscriber.testing import RedisCluster, RedisServer
from tests.benchmarks._common import KIB, content, seq_of

KEY = "app.yaml"


def _cpu_ticks(pid: int | None) -> int:
    """User + system clock ticks of process ``pid`` (0 without one)."""
    if pid is None:
        return 0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def measure(url: str, owner: str, args: argparse.Namespace, server: int | None) -> str:
    """``url`` for the subscribers, ``owner`` (the stream's node) for the writer and floor;
    ``server``: the pid of the stream's redis-server (its CPU per update is printed)."""
    stream = stream_keys(KEY).events
    writer = connect(owner, socket_timeout=10)
    seq = 0

    def xadd() -> None:
        nonlocal seq
        seq += 1
        body = content(seq, KIB)
        pipe = writer.pipeline(transaction=False)
        pipe.xadd(stream, {"schema": SCHEMA_VERSION, "key": KEY, "version": seq,
                           "sha256": sha256_hex(body), "content": body,
                           "published_at": now_ms(), "publisher": "bench:0"})  # fmt: skip
        if args.cluster:  # what publish.lua announces
            pipe.spublish(notify_channel(stream), str(seq))
        pipe.execute()

    xadd()
    done = asyncio.Event()
    counts: dict[int, int] = {}

    def applied(text: str) -> None:
        number = seq_of(text)
        counts[number] = counts.get(number, 0) + 1
        if counts[number] == args.per:
            done.set()

    subs: list[AsyncSubscriber] = []
    tasks: list[asyncio.Task[None]] = []
    if args.kind == "hot":
        gate = asyncio.Semaphore(32)

        async def start(sub: AsyncSubscriber) -> None:
            async with gate:
                await sub.start()

        subs = [AsyncSubscriber(KEY, applied, redis_url=url, worker_id=f"w-{j}")
                for j in range(args.per)]  # fmt: skip
        await asyncio.gather(*(start(sub) for sub in subs))
    else:

        async def follow() -> None:
            client = redis.asyncio.Redis.from_url(owner, socket_timeout=8)
            try:
                newest = cast("list[Any]", await client.xrevrange(stream, count=1))
                last = newest[0][0]
                while True:
                    reply = cast("list[Any]", await client.xread({stream: last}, 8, 5000))
                    if reply:
                        last, fields = reply[0][1][-1]
                        data = fields[b"content"]
                        if hashlib.sha256(data).hexdigest().encode() != fields[b"sha256"]:
                            raise ValueError("checksum mismatch")
                        applied(data.decode())
            finally:
                await client.aclose()

        tasks = [asyncio.create_task(follow()) for _ in range(args.per)]
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    profiler = cProfile.Profile() if args.profile else None
    latencies: list[float] = []
    if args.stats:
        writer.config_resetstat()
    began = time.process_time()
    server_began = _cpu_ticks(server)
    if profiler is not None:
        profiler.enable()
    for _ in range(args.updates):
        done.clear()
        sent = time.monotonic()
        await loop.run_in_executor(None, xadd)
        await asyncio.wait_for(done.wait(), 30)
        latencies.append((time.monotonic() - sent) * 1000)
        await asyncio.sleep(0.05)
    if profiler is not None:
        profiler.disable()
    cpu_ms = (time.process_time() - began) / args.updates * 1000
    ticks = os.sysconf("SC_CLK_TCK")
    server_ms = (_cpu_ticks(server) - server_began) / ticks / args.updates * 1000
    latencies.sort()
    lines = [
        f"{args.kind}: {args.per} subscribers, {args.updates} updates: CPU per update "
        f"{cpu_ms:.2f} ms = {cpu_ms / args.per * 1000:.1f} us per subscriber; "
        f"XADD -> all applied p50 {latencies[len(latencies) // 2]:.2f} ms; the stream's "
        f"redis-server: {server_ms:.1f} ms of CPU per update"
    ]
    if args.stats:  # the stream's node: usec per update by command
        stats = writer.info("commandstats")
        lines += [f"  {name}: {value['calls'] / args.updates:.0f} calls, "
                  f"{value['usec'] / args.updates / 1000:.2f} ms per update"
                  for name, value in sorted(stats.items())]  # fmt: skip
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(40)
        lines.append(out.getvalue())
    await asyncio.gather(*(sub.stop() for sub in subs))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    writer.close()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kind", choices=["hot", "floor"], default="hot")
    parser.add_argument("--per", type=int, default=250)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tcp", action="store_true", help="one Redis on loopback TCP")
    parser.add_argument("--stats", action="store_true", help="the node's commandstats")
    parser.add_argument("--sort", default="tottime", help="cProfile order (--profile)")
    parser.add_argument("--cluster", action="store_true", help="on a 6-node Redis Cluster")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hr-bench-pa-") as tmp:
        if not args.cluster:
            with RedisServer(Path(tmp) / "redis", unix=not args.tcp) as server:
                print(asyncio.run(measure(server.url, server.url, args, server.pid)))
            return 0
        with RedisCluster(Path(tmp) / "cluster") as cluster:
            owner = cluster.master_for(stream_keys(KEY).events)
            elsewhere = next(n for n in cluster.master_nodes() if n.port != owner.port)
            print(asyncio.run(measure(elsewhere.url, owner.url, args, owner.pid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
