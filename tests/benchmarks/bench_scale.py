"""Scale: 1,000 asyncio subscribers on one Redis (or a Redis Cluster), over 4 processes.

Kubelet ``..data`` rename -> the last of 1,000 ``AsyncSubscriber`` callbacks returned (each
process reports when its 250th callback for the update returned; CLOCK_MONOTONIC). The floor
runs side by side on its own redis-server: the floor publisher and 1,000 raw ``redis.asyncio``
``XREAD BLOCK`` loops that verify the hash, in 4 processes too. Updates alternate in random
order, 1 KiB content, unix sockets; each subscriber holds its own connection.

"acks early": per hotreload update, how many of its subscribers' acks Redis had appended
before the last process's 250th callback returned (the ``:acks`` ids in the update's window,
Redis's clock against this process's, both realtime, ms): reports sent while others still
apply compete with them for the cores (``_aiohold.wait_held``). p50 and max over the runs.

``--cluster``: both systems on one real 6-node Redis Cluster (3 masters, 3 replicas, TCP on
loopback). hotreload's daemon and subscribers are given the URL of a master that does NOT own
the key's slot (each subscriber finds the owner with CLUSTER SLOTS and moves there); the floor,
which knows nothing of clusters, is given the URL of its stream's master directly.

    python -m tests.benchmarks.bench_scale [--quick] [--cluster] [--subscribers N] [--processes N]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisCluster, RedisServer
from tests.benchmarks._common import KIB, content, processes, ratio, summary, table
from tests.benchmarks._systems import make_systems


@contextlib.contextmanager
def _servers(tmp: Path, cluster: bool) -> Iterator[dict[str, str]]:
    """URLs: ``hot``/``floor`` for the systems, ``hot_read``/``floor_read`` to read their
    streams directly (in a cluster: the master of each stream's slot)."""
    if not cluster:
        with RedisServer(tmp / "r-hot") as hot, RedisServer(tmp / "r-floor") as floor:
            yield {"hot": hot.url, "floor": floor.url, "hot_read": hot.url,
                   "floor_read": floor.url}  # fmt: skip
        return
    with RedisCluster(tmp / "cluster") as redis_cluster:
        hot_owner = redis_cluster.master_for(stream_keys("app.yaml").events)
        floor_owner = redis_cluster.master_for("floor:app.yaml")
        elsewhere = next(n for n in redis_cluster.master_nodes() if n.port != hot_owner.port)
        yield {"hot": elsewhere.url, "floor": floor_owner.url, "hot_read": hot_owner.url,
               "floor_read": floor_owner.url}  # fmt: skip


def _acks_early(url: str, key: str, last_ms: float) -> int:
    """The acks of ``key`` appended within the ``last_ms`` before now (just after the
    update's last callback returned)."""
    end = time.time() * 1000
    client = connect(url, socket_timeout=10)
    try:
        entries = client.xrange(stream_keys(key).acks, min=int(end - last_ms), max=int(end))
    finally:
        client.close()
    return len(cast("list[Any]", entries))


def run(
    quick: bool = False, subscribers: int = 1000, workers: int = 4, cluster: bool = False
) -> dict[str, Any]:
    runs = 3 if quick else 15
    per = subscribers // workers
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-scale-") as tmp,
        _servers(Path(tmp), cluster) as urls,
        processes() as procs,
    ):
        hot, _ = make_systems(Path(tmp) / "hot", urls["hot"], procs, async_kinds=True)
        _, floor = make_systems(Path(tmp) / "floor", urls["floor"], procs, async_kinds=True)
        try:
            for system in (hot, floor):
                system.start_publisher(content(0, KIB))
                system.wait_published(urls[f"{system.name.replace('hotreload', 'hot')}_read"])
            started = {}
            for system in (hot, floor):
                t0 = time.monotonic()
                system.start_workers(workers, per=per, timeout=300)
                started[system.name] = round(time.monotonic() - t0, 2)
            samples: dict[str, list[float]] = {"hotreload": [], "floor": []}
            early: list[float] = []
            seq = 0
            for index in range(runs + 1):
                for system in random.sample([hot, floor], 2):
                    seq += 1
                    result = system.update(seq, KIB, timeout=60)
                    if index:  # the first pair warms up
                        samples[system.name].append(result["last_ms"])
                        if system is hot:
                            early.append(_acks_early(urls["hot_read"], hot.key, result["last_ms"]))
                    time.sleep(min(1.0, result["last_ms"] / 1000) + 0.02)
        finally:
            hot.close()
            floor.close()
    hot_s, floor_s = summary(samples["hotreload"]), summary(samples["floor"])
    return {
        "redis": "cluster (3 masters + 3 replicas, TCP)" if cluster else "one redis-server (unix)",
        "subscribers": per * workers,
        "processes": workers,
        "hotreload": hot_s,
        "floor": floor_s,
        "ratio_p50": ratio(hot_s["p50"], floor_s["p50"]),
        "ratio_p99": ratio(hot_s["p99"], floor_s["p99"]),
        "acks_early": summary(early),
        "start_all_s": started,
        "seconds": round(time.monotonic() - began, 1),
    }


def render(result: dict[str, Any]) -> str:
    hot, floor = result["hotreload"], result["floor"]
    return table(
        f"scale: rename -> all {result['subscribers']} asyncio subscribers applied "
        f"({result['processes']} processes, {result.get('redis', 'one Redis')}; ms)",
        ["runs", "hot p50", "hot p99", "floor p50", "floor p99", "x p50", "x p99",
         "start all (s) hot/floor", "acks early p50/max"],
        [[hot["n"], hot["p50"], hot["p99"], floor["p50"], floor["p99"], result["ratio_p50"],
          result["ratio_p99"],
          f"{result['start_all_s']['hotreload']}/{result['start_all_s']['floor']}",
          f"{result['acks_early'].get('p50')}/{result['acks_early'].get('max')}"]],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--cluster", action="store_true", help="on a 6-node Redis Cluster")
    args = parser.parse_args(argv)
    result = run(args.quick, args.subscribers, args.processes, args.cluster)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
