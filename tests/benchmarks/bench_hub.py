r"""Many keys in one worker process (issue 22): shared follower vs one per key, same run.

One worker process follows 20 keys (``Subscriber``, or ``AsyncSubscriber`` with ``--async``)
on a private redis-server (unix socket), once with the default (``shared``: one connection
and one thread or task for all keys, ``subscriber._hub``) and once with ``shared=False`` (a
connection and a thread or task per key, as before issue 22), alternating, each mode in a
fresh process. Per mode:

- connections (``CLIENT LIST``, by the worker's client name) and threads
  (``threading.active_count()`` in the worker, main thread included) once every key runs;
- idle: the worker's CPU (every thread's schedstat time) and the round trips it makes
  (``XREAD`` calls in ``INFO commandstats``) over a quiet window;
- propagation of one key among 20: the parent ``XADD``s an entry carrying its
  CLOCK_MONOTONIC time to the middle key's stream; the worker's callback reports when it
  ran. ``--updates`` of them, 0.2 s apart.

    python -m tests.benchmarks.bench_hub [--quick] [--async] [--keys N] [--cluster]

``--cluster``: the same on a real 6-node Redis Cluster (3 masters; ``subscriber._clusterhub``
when shared), connections summed over every node (and the most on one node), ``XREAD`` calls
summed over the masters, and each change published through the real publish script (which
announces it on the key's ``:notify`` channel). A third mode, ``silent``, is shared with
changes ``XADD``\ ed without a notification (a daemon older than the notifications): they
are found by the catch-up read, once per block time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from subscriber._redis import connect
from subscriber.testing import RedisServer, append_event
from tests.benchmarks._common import cpu_ns, processes, ratio, summary, table, wait_for

SPACING = 0.2

_WORKER = """
import asyncio, os, sys, threading, time
from subscriber import AsyncSubscriber, Subscriber

url, count, shared, use_async, fd = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", \\
    sys.argv[4] == "1", int(sys.argv[5])
tag = sys.argv[6] if len(sys.argv) > 6 else ""

def applied(text):
    if text.startswith("t="):
        os.write(fd, b"%d %d\\n" % (int(text[2:].split()[0]), time.monotonic_ns()))

keys = [f"{tag}k{i:04d}.yaml" for i in range(count)]
options = dict(redis_url=url, worker_id="bench-hub:1", metrics=False, shared=shared)

def ready():
    os.write(fd, b"R %d\\n" % threading.active_count())

if use_async:
    async def main():
        subs = [AsyncSubscriber(key, applied, **options) for key in keys]
        for sub in subs:
            await sub.start()
        tasks = len([t for t in asyncio.all_tasks() if t.get_name().startswith("hotreload-")])
        os.write(fd, b"T %d\\n" % tasks)
        ready()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for sub in subs:
            await sub.stop()
    asyncio.run(main())
else:
    subs = [Subscriber(key, applied, **options).start() for key in keys]
    ready()
    sys.stdin.readline()
    for sub in subs:
        sub.stop()
"""


def _xread_calls(client: Any) -> int:
    stats = cast(dict[str, Any], client.info("commandstats"))
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def _xadd(url: str, key: str, text: bytes, version: int) -> None:
    append_event(url, key, text, version=version)


def measure(
    url: str,
    keys: int,
    *,
    shared: bool,
    use_async: bool,
    window: float,
    updates: int,
    nodes: list[str] | None = None,
    publish: Callable[[str, bytes, int], None] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """One mode in a fresh worker process; ``nodes``: every node's URL (a cluster),
    ``publish(key, content, version)``: how a change is written (default ``XADD``)."""
    client = connect(url, socket_timeout=10)
    admins = [connect(node, socket_timeout=10) for node in nodes or []] or [client]
    read_fd, write_fd = os.pipe()
    lines: list[str] = []
    buffer = b""

    def read_lines() -> None:
        nonlocal buffer
        import select

        while select.select([read_fd], [], [], 0)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            buffer += chunk
        *done, buffer = buffer.split(b"\n")
        lines.extend(line.decode() for line in done)

    with processes() as procs:
        worker = procs.python(
            "-c", textwrap.dedent(_WORKER), url, str(keys), "1" if shared else "0",
            "1" if use_async else "0", str(write_fd), tag,
            pass_fds=(write_fd,), stdin=subprocess.PIPE,
        )  # fmt: skip
        os.close(write_fd)
        try:

            def is_ready() -> bool:
                read_lines()
                return any(line.startswith("R ") for line in lines)

            wait_for(is_ready, "the worker started every key", 120)
            threads = int(next(line for line in lines if line.startswith("R ")).split()[1])
            tasks = next((int(x.split()[1]) for x in lines if x.startswith("T ")), None)
            time.sleep(2.0)  # start-up connections closed, heartbeats in step
            per_node = [
                sum(1 for c in clients if c["name"] == "hotreload-sub:bench-hub:1")
                for clients in (cast(list[dict[str, Any]], a.client_list()) for a in admins)
            ]
            connections = sum(per_node)
            cpu_before, reads_before = cpu_ns(worker.pid), sum(map(_xread_calls, admins))
            time.sleep(window)
            idle_cpu = (cpu_ns(worker.pid) - cpu_before) / 1e9 / window * 100
            reads_per_s = (sum(map(_xread_calls, admins)) - reads_before) / window
            middle = f"{tag}k{keys // 2:04d}.yaml"
            write = publish or partial(_xadd, url)
            latencies: list[float] = []
            for seq in range(updates):
                time.sleep(SPACING)
                sent = time.monotonic_ns()
                write(middle, f"t={sent} {seq}".encode(), 2 + seq)

                def arrived(sent: int = sent) -> bool:
                    read_lines()
                    return any(line.startswith(f"{sent} ") for line in lines)

                wait_for(arrived, f"update {seq} applied", 10)
                line = next(line for line in lines if line.startswith(f"{sent} "))
                latencies.append((int(line.split()[1]) - sent) / 1e6)
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(30)
        finally:
            os.close(read_fd)
            for admin in {id(a): a for a in [client, *admins]}.values():
                admin.close()
    return {
        "mode": "shared" if shared else "own",
        "connections": connections,
        "most_on_a_node": max(per_node),
        "threads": threads,
        "tasks": tasks,
        "idle_cpu_pct": round(idle_cpu, 4),
        "reads_per_s": round(reads_per_s, 3),
        "one_key_ms": summary(latencies),
    }


def run(
    quick: bool = False, use_async: bool = False, keys: int = 20, rounds: int | None = None
) -> dict[str, Any]:
    window = 10.0 if quick else 30.0
    updates = 20 if quick else 50
    rounds = rounds or (1 if quick else 2)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hr-bench-hub-") as tmp:
        for index in range(rounds):
            for shared in (False, True) if index % 2 == 0 else (True, False):
                with RedisServer(Path(tmp) / f"r{index}{int(shared)}") as server:
                    for key in range(keys):
                        append_event(server.url, f"k{key:04d}.yaml", b"v1", version=1)
                    row = measure(
                        server.url,
                        keys,
                        shared=shared,
                        use_async=use_async,
                        window=window,
                        updates=updates,
                    )
                    row["round"] = index + 1
                    rows.append(row)
    own = [r for r in rows if r["mode"] == "own"]
    mine = [r for r in rows if r["mode"] == "shared"]
    return {
        "keys": keys,
        "async": use_async,
        "window_s": window,
        "updates": updates,
        "rounds": rounds,
        "rows": rows,
        "one_key_p50_shared_vs_own": ratio(
            sum(r["one_key_ms"]["p50"] for r in mine) / len(mine),
            sum(r["one_key_ms"]["p50"] for r in own) / len(own),
        ),
    }


def run_cluster(
    quick: bool = False, use_async: bool = False, keys: int = 20, rounds: int | None = None
) -> dict[str, Any]:
    """The modes own, shared and silent on one real Redis Cluster, alternating."""
    from publisher._admin import connect_any
    from publisher.publish import Publisher
    from subscriber.keys import stream_keys
    from subscriber.testing import RedisCluster

    window = 10.0 if quick else 30.0
    updates = 20 if quick else 50
    rounds = rounds or (1 if quick else 2)
    rows: list[dict[str, Any]] = []
    modes = ["own", "shared", "silent"]
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-hub-") as tmp,
        RedisCluster(Path(tmp)) as cluster,
    ):
        admin = connect_any(cluster.url, socket_timeout=10)
        publisher = Publisher(admin)  # type: ignore[arg-type]
        nodes = [node.url for node in cluster.nodes]
        masters: dict[str, str] = {}

        def notify(key: str, text: bytes, _version: int) -> None:
            publisher.publish(key, text)

        def silent(key: str, text: bytes, version: int) -> None:
            append_event(masters[key], key, text, version=version)

        try:
            for index in range(rounds):
                for mode in modes if index % 2 == 0 else modes[::-1]:
                    tag = f"r{index}{mode}-"
                    for key in range(keys):
                        publisher.publish(f"{tag}k{key:04d}.yaml", b"v1")
                    middle = f"{tag}k{keys // 2:04d}.yaml"
                    masters[middle] = cluster.master_for(stream_keys(middle).events).url
                    row = measure(
                        cluster.url,
                        keys,
                        shared=mode != "own",
                        use_async=use_async,
                        window=window,
                        # found once per block time (5 s): a few are enough
                        updates=min(updates, 6) if mode == "silent" else updates,
                        nodes=nodes,
                        publish=silent if mode == "silent" else notify,
                        tag=tag,
                    )
                    row["mode"], row["round"] = mode, index + 1
                    rows.append(row)
        finally:
            admin.close()
    return {
        "keys": keys,
        "async": use_async,
        "cluster": True,
        "window_s": window,
        "updates": updates,
        "rounds": rounds,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    kind = "AsyncSubscriber" if result["async"] else "Subscriber"
    if result.get("cluster"):
        kind += " (Redis Cluster, 3 masters)"
    return table(
        f"{result['keys']} {kind}s in one process: shared follower vs one per key "
        f"(idle over {result['window_s']:.0f} s; one key changed {result['updates']} times)",
        ["round", "mode", "connections", "most on a node", "threads", "tasks", "idle CPU %",
         "XREAD/s", "one key p50 ms", "p99 ms"],
        [
            [r["round"], r["mode"], r["connections"], r["most_on_a_node"], r["threads"],
             r["tasks"] or "-",
             r["idle_cpu_pct"], r["reads_per_s"], r["one_key_ms"]["p50"], r["one_key_ms"]["p99"]]
            for r in result["rows"]
        ],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cluster", action="store_true")
    args = parser.parse_args()
    if args.cluster:
        result = run_cluster(
            quick=args.quick, use_async=args.use_async, keys=args.keys, rounds=args.rounds
        )
    else:
        result = run(quick=args.quick, use_async=args.use_async, keys=args.keys, rounds=args.rounds)
    print(render(result))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
