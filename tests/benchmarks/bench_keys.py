"""Many keys: the daemon's idle CPU at 1, 100, 1,000 (and 10,000) keys, one key's change.

Each row has its own private redis-server (unix socket) and a kubelet-style mount holding N
keys of 1 KiB (written by the vendored AtomicWriter, one update = one new timestamped
directory with every file, as kubelet writes it). ``hotreload watch`` runs as deployed, its
metrics port on (so its ack follower runs too; /metrics is fetched plain and gzipped at the
end). Once every key is published and the daemon settled, its CPU (every thread's schedstat
time) is read over a quiet window: 60 s (20 s with ``--quick``, which leaves 10,000 out), so
the full run sees two of the watcher's 30 s resyncs (every file read again).

Propagation: one key (the middle one) changes, the others keep their content; measured from
``t_rename_ns`` (the writer's clock reading right before the swap) to a raw ``XREAD BLOCK``
on that key's stream returning the new entry in a reader process of its own (blocked before
the write begins: the writer goes on after the swap, as kubelet does), against the same with
a one-key mount in the same run. The daemon has to tell which of the N files changed.
``--propagation``: only that, at 1 and 1,000 keys (no idle window, no /metrics; quicker).

    python -m tests.benchmarks.bench_keys [--quick | --propagation]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import tempfile
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, free_port
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import (
    KIB,
    content,
    cpu_ns,
    processes,
    ratio,
    summary,
    table,
    wait_for,
)
from tests.benchmarks.bench_idle import commandstats, loop_and_threads_pct, thread_cpu_ns

KEY_COUNTS = (1, 100, 1000)
KEY_COUNTS_FULL = (1, 100, 1000, 10_000)
SPACING = 0.3  # between updates: wider than the daemon's settle window


def names(count: int) -> list[str]:
    return [f"k{i:04d}.yaml" for i in range(count)]


def _all_published(client: Any, keys: list[str]) -> bool:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(stream_keys(key).events)
    return all(pipe.execute())


def metrics_bytes(port: int) -> dict[str, int]:
    """The /metrics body's size, plain and as a gzip-asking scraper gets it."""
    sizes = {}
    for label, accept in (("plain", "identity"), ("gzip", "gzip")):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": accept}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http://
            sizes[label] = len(response.read())
    return sizes


def _read_arrivals(url: str, stream: str, pipe: Connection) -> None:
    """The reader process: for each id received, ``XREAD BLOCK`` after it; sends back the new
    entry's id and the ``time.monotonic_ns()`` it arrived (system-wide, comparable)."""
    client = connect(url, socket_timeout=15)
    while (last := pipe.recv()) is not None:
        reply: Any = client.xread({stream: last}, count=1, block=10_000)
        pipe.send((reply[0][1][0][0], time.monotonic_ns()) if reply else None)
    client.close()


class Arrivals:
    """Times a new entry's arrival in a process of its own: the writer goes on after its
    swap (links, the old directory's 1,000 files removed: ~10 ms at 1,000 keys), and a read
    made only once it returned counted that in."""

    def __init__(self, url: str, stream: str) -> None:
        self._pipe, child = multiprocessing.get_context("fork").Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=_read_arrivals, args=(url, stream, child), daemon=True
        )

    def __enter__(self) -> Arrivals:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(None)
        self._process.join(15)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def expect(self, after: bytes) -> None:
        self._pipe.send(after)
        time.sleep(0.02)  # the XREAD is sent and blocked before the update begins

    def arrived(self, what: str) -> tuple[bytes, int]:
        if not self._pipe.poll(12) or (answer := self._pipe.recv()) is None:
            raise RuntimeError(f"{what} not published within 10 s")
        return cast("tuple[bytes, int]", answer)


def measure(count: int, window: float | None, updates: int) -> dict[str, Any]:
    """One row; ``window`` None: no idle CPU, no /metrics (propagation only)."""
    keys = names(count)
    changed = keys[len(keys) // 2]
    files = {key: content(0, KIB) for key in keys}
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-keys-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        mount = Path(tmp) / "mount"
        mount.mkdir()
        atomic_write(str(mount), files)
        port = free_port()
        daemon = procs.python(
            "-m", "publisher", "watch", str(mount), "--redis", server.url,
            "--metrics-port", str(port), "--log-level", "WARNING",
        )  # fmt: skip
        client = connect(server.url, socket_timeout=10)
        try:
            wait_for(lambda: _all_published(client, keys), f"{count} keys published", 600)
            # the first checks after start, and the ack follower's first status pass, which
            # classifies every key once (10,000 keys: ~25 s), then quiet
            time.sleep(3.0 + count / 400)
            idle_pct, split, calls = None, None, None
            if window is not None:
                client.config_resetstat()
                before, threads_before = cpu_ns(daemon.pid), thread_cpu_ns(daemon.pid)
                time.sleep(window)
                idle_pct = round((cpu_ns(daemon.pid) - before) / 1e9 / window * 100, 4)
                split = loop_and_threads_pct(
                    daemon.pid, threads_before, thread_cpu_ns(daemon.pid), window
                )
                calls = sum(n for c, n in commandstats(server.url).items() if c[:6] != "config")
            stream = stream_keys(changed).events
            newest = cast("list[tuple[bytes, Any]]", client.xrevrange(stream, count=1))
            last = newest[0][0]
            latencies = []
            with Arrivals(server.url, stream) as arrivals:
                for seq in range(1, updates + 1):
                    time.sleep(SPACING)
                    arrivals.expect(last)  # the reader blocks before the writer starts
                    files[changed] = content(seq, KIB)
                    renamed = atomic_write(str(mount), files)["t_rename_ns"]
                    last, received = arrivals.arrived(f"{count} keys: update {seq}")
                    latencies.append((received - renamed) / 1e6)
            metrics = metrics_bytes(port) if window is not None else {}
        finally:
            client.close()
            procs.stop(daemon)
    return {
        "keys": count,
        "idle_cpu_pct": idle_pct,
        "idle_split": split or {},
        "idle_commands_per_s": round(calls / window, 2) if calls is not None and window else None,
        "change_ms": summary(latencies),
        "metrics_kib": {k: round(v / 1024, 1) for k, v in metrics.items()},
    }


def run(quick: bool = False, propagation: bool = False) -> dict[str, Any]:
    window = None if propagation else 20.0 if quick else 60.0
    updates = 20 if quick else 50
    counts = (1, 1000) if propagation else KEY_COUNTS if quick else KEY_COUNTS_FULL
    rows = [measure(count, window, updates) for count in counts]
    base = rows[0]["change_ms"]["p50"]
    for row in rows:
        row["change_p50_vs_one_key"] = ratio(row["change_ms"]["p50"], base)
    return {"window_s": window, "updates": updates, "rows": rows}


def render(result: dict[str, Any]) -> str:
    window = f"{result['window_s']:.0f} s" if result["window_s"] else "(not measured)"
    return table(
        f"many keys: idle daemon CPU over {window}, one key changed "
        f"({result['updates']} updates), rename -> entry read",
        [
            "keys",
            "idle CPU %",
            "loop / other threads %",
            "commands/s",
            "change p50 ms",
            "p99 ms",
            "p50 vs 1 key",
            "/metrics KiB",
            "gzip",
        ],
        [
            [
                row["keys"],
                row["idle_cpu_pct"],
                "{} / {}".format(
                    *(row["idle_split"].get(k) for k in ("loop_pct", "other_threads_pct"))
                ),
                row["idle_commands_per_s"],
                row["change_ms"]["p50"],
                row["change_ms"]["p99"],
                row["change_p50_vs_one_key"],
                row["metrics_kib"].get("plain"),
                row["metrics_kib"].get("gzip"),
            ]
            for row in result["rows"]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--propagation", action="store_true", help="only one key's change at 1 and 1,000 keys"
    )
    args = parser.parse_args()
    result = run(quick=args.quick, propagation=args.propagation)
    print(render(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
