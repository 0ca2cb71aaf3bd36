"""Failover: the master owning the config's slot is SIGKILLed; how long until every subscriber
runs the next change?

A real 6-node Redis Cluster (3 masters, 3 replicas, ``cluster-node-timeout`` 2000 ms) on
loopback; 8 subscribers in this process (4 threaded, 4 asyncio), each given the URL of a
different node (the owner, its replica, the others). Per run: SIGKILL the slot's master, then
a writer (redis-py's ``RedisCluster``) retries an ``XADD`` of the next version until the
cluster accepts it. Measured from the kill:

- ``writable``: the cluster accepted the write (the baseline: Redis's own failover, which no
  client can beat);
- ``all applied``: the last of the 8 subscribers applied it.

The difference is what the subscribers add: noticing the dead node, their capped reconnect
backoff (3 s), finding the promoted master. The killed node is restarted (it rejoins as a
replica) before the next run.

    python -m tests.benchmarks.bench_failover [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from redis.cluster import RedisCluster as ClusterClient

from subscriber import AsyncSubscriber, Subscriber
from subscriber.keys import stream_keys
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex
from subscriber.testing import RedisCluster
from tests.benchmarks._common import summary, table

KEY = "app.yaml"
EVENTS = stream_keys(KEY).events


def _fields(version: int) -> dict[Any, Any]:
    content = f"version: {version}\n".encode()
    return {"schema": SCHEMA_VERSION, "key": KEY, "version": version,
            "sha256": sha256_hex(content), "content": content, "published_at": now_ms(),
            "publisher": "bench"}  # fmt: skip


class _Fleet:
    """4 threaded Subscribers and 4 AsyncSubscribers on a loop thread of their own."""

    def __init__(self, urls: list[str]) -> None:
        self.threaded = [
            Subscriber(KEY, lambda _c: None, redis_url=url, block_ms=1000) for url in urls[:4]
        ]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.aio = [
            AsyncSubscriber(KEY, lambda _c: None, redis_url=url, block_ms=1000) for url in urls[4:8]
        ]

    def start(self) -> None:
        for sub in self.threaded:
            sub.start()
        for aio_sub in self.aio:
            asyncio.run_coroutine_threadsafe(aio_sub.start(), self.loop).result(30)

    def versions(self) -> list[int]:
        return [sub.version for sub in self.threaded] + [sub.version for sub in self.aio]

    def stop(self) -> None:
        for sub in self.threaded:
            sub.stop()
        for aio_sub in self.aio:
            asyncio.run_coroutine_threadsafe(aio_sub.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _write_when_writable(client: ClusterClient, version: int, deadline: float) -> float:
    while True:
        try:
            client.xadd(EVENTS, _fields(version))
            return time.monotonic()
        except Exception:  # refused or unreachable until the failover ends
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run(quick: bool = False, runs: int = 0) -> dict[str, Any]:
    runs = runs or (3 if quick else 10)
    # every kill makes each subscriber warn once ("lost Redis"): expected here, not news
    logging.getLogger("subscriber").setLevel(logging.ERROR)
    began = time.monotonic()
    writable: list[float] = []
    applied: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-failover-") as tmp,
        RedisCluster(Path(tmp) / "cluster") as cluster,
    ):
        owner = cluster.master_for(EVENTS)
        others = [node for node in cluster.nodes if node.port != owner.port]
        urls = [owner.url, *[node.url for node in others]]
        urls = (urls * 2)[:8]
        client = ClusterClient(host="127.0.0.1", port=others[0].port, socket_timeout=2,
                               socket_connect_timeout=1)  # fmt: skip
        client.xadd(EVENTS, _fields(1))
        fleet = _Fleet(urls)
        try:
            fleet.start()
            for version in range(2, runs + 2):
                owner = cluster.master_for(EVENTS)
                killed = time.monotonic()
                cluster.kill(owner)
                accepted = _write_when_writable(client, version, killed + 60)
                deadline = time.monotonic() + 60
                while min(fleet.versions()) < version:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not every subscriber on v{version}: "
                                           f"{fleet.versions()}")  # fmt: skip
                    time.sleep(0.005)
                done = time.monotonic()
                writable.append((accepted - killed) * 1000)
                applied.append((done - killed) * 1000)
                cluster.restart(owner)
                cluster.wait_ok()
        finally:
            fleet.stop()
            client.close()
    return {
        "runs": runs,
        "writable": summary(writable),
        "all_applied": summary(applied),
        "added_p50_ms": round(summary(applied)["p50"] - summary(writable)["p50"], 1),
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    writable, applied = result["writable"], result["all_applied"]
    return table(
        "failover: SIGKILL of the slot's master -> (ms; 6-node cluster, node timeout 2 s, "
        "8 subscribers)",
        ["runs", "writable p50", "writable max", "all applied p50", "all applied max",
         "added p50"],
        [[result["runs"], writable["p50"], writable["max"], applied["p50"], applied["max"],
          result["added_p50_ms"]]],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.quick, args.runs)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
