"""The daemon's HTTP endpoints under load: ``/healthz`` latency while 200 clients scrape
``/metrics`` as fast as they can, against the same daemon unloaded in the same run.

Why: kubelet gives a liveness probe a few seconds (``timeoutSeconds``); a probe queued behind
scrapers that times out restarts a healthy publisher. Issue 23 measured 200 scrapers taking
the daemon to 98 % of a core with ``/healthz`` at p90 1 s. Timings on these shared cores are
noisy, so the numbers that mean something are the ratios to the unloaded baseline.

One ``hotreload watch`` on a private redis-server with 200 keys (a ``/metrics`` body of a few
hundred KiB). Measured, one after the other:

- unloaded: ``/healthz`` round trips (a fresh connection each, as kubelet makes them);
- loaded: the same while 200 concurrent clients (one asyncio loop in this process) scrape
  ``/metrics`` in a loop; the daemon's CPU (% of one core) and its most threads meanwhile;
- publish: a kubelet update of one key -> its entry read by a client blocked on the stream,
  unloaded and loaded (the scrapers' cost to the daemon's real job).

    python -m tests.benchmarks.bench_endpoints [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, free_port
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import processes, ratio, summary, table, wait_for

SCRAPERS = 200
KEYS = 200


def request(port: int, path: str, timeout: float = 5.0) -> tuple[int, float]:
    """One GET on a fresh connection: (status, milliseconds), status 0 if it failed or took
    longer than ``timeout`` in all."""
    began = time.monotonic()
    deadline = began + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
    except OSError:
        return 0, (time.monotonic() - began) * 1000
    head = b"".join(chunks).split(b"\r\n", 1)[0].split()
    status = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
    return status, (time.monotonic() - began) * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``, finished threads included (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no thread count for {pid}")


class Scrapers:
    """``count`` clients scraping ``http://127.0.0.1:port/metrics`` in a loop, on one asyncio
    loop in a thread, until ``stop()``; ``scrapes`` counts the 200s, ``refused`` the 503s
    (too many at once), ``failures`` everything else (errors, timeouts, other answers)."""

    def __init__(self, port: int, count: int = SCRAPERS) -> None:
        self.port = port
        self.count = count
        self.scrapes = 0
        self.refused = 0
        self.failures = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def __enter__(self) -> Scrapers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)

    async def _main(self) -> None:
        await asyncio.gather(*(self._scrape() for _ in range(self.count)))

    async def _scrape(self) -> None:
        while not self._stopping.is_set():
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 10
                )
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 30)
                status = body[9:12] if body.startswith(b"HTTP/1.") else b""
                self.scrapes += status == b"200"
                self.refused += status == b"503"
                self.failures += status not in (b"200", b"503")
            except (OSError, TimeoutError):
                self.failures += 1
                await asyncio.sleep(0.05)
            finally:
                if writer is not None:
                    writer.close()


def probe_series(port: int, count: int, spacing: float = 0.05) -> list[float]:
    """``count`` ``/healthz`` round trips (ms); a failed or non-200 one counts as 5000 ms."""
    found = []
    for _ in range(count):
        status, took = request(port, "/healthz")
        found.append(took if status == 200 else 5000.0)
        time.sleep(spacing)
    return found


class Updates:
    """Kubelet updates of one key of ``mount``, timed from the rename to the entry's arrival
    at a reader blocked on the key's events stream (the daemon's publish latency)."""

    def __init__(self, mount: Path, payload: dict[str, bytes], url: str) -> None:
        self.mount, self.payload = mount, dict(payload)
        self.key = sorted(payload)[0]
        self.stream = stream_keys(self.key).events
        self.client = connect(url, socket_timeout=10)
        self.seq = 0

    def series(self, count: int, spacing: float = 0.1) -> list[float]:
        found = []
        for _ in range(count):
            newest = cast(list[tuple[bytes, Any]], self.client.xrevrange(self.stream, count=1))
            last = newest[0][0] if newest else b"0-0"
            self.seq += 1
            self.payload[self.key] = f"seq: {self.seq}\n".encode()
            renamed = atomic_write(str(self.mount), self.payload)["t_rename_ns"]
            if self.client.xread({self.stream: last}, count=1, block=5000):
                found.append((time.monotonic_ns() - renamed) / 1e6)
            time.sleep(spacing)
        return found

    def close(self) -> None:
        self.client.close()


def run(quick: bool = False) -> dict[str, Any]:
    probes = 40 if quick else 150
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-endpoints-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        mount = Path(tmp) / "config"
        mount.mkdir()
        payload = {f"key-{i:03d}.yaml": f"n: {i}\n".encode() for i in range(KEYS)}
        atomic_write(str(mount), payload)
        port = free_port()
        daemon = procs.python(
            "-m", "publisher", "watch", str(mount), "--redis", server.url,
            "--metrics-port", str(port), "--log-level", "WARNING",
        )  # fmt: skip
        wait_for(lambda: request(port, "/readyz")[0] == 200, "the daemon is ready", 60)
        metrics_bytes = len(b"".join(_body(port, "/metrics")))
        unloaded = probe_series(port, probes)
        updates = Updates(mount, payload, server.url)
        publish_unloaded = updates.series(probes // 4)
        with Scrapers(port) as scrapers:
            time.sleep(1.0)  # every scraper connected and looping
            cpu_before, clock_before = cpu_seconds(daemon.pid), time.monotonic()
            most_threads = 0
            loaded = []
            for _ in range(probes):
                loaded += probe_series(port, 1)
                most_threads = max(most_threads, threads_of(daemon.pid))
            cpu_pct = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - clock_before)
            publish_loaded = updates.series(probes // 4)
            updates.close()
            scraped, refused, failed = scrapers.scrapes, scrapers.refused, scrapers.failures
    base, load = summary(unloaded), summary(loaded)
    return {
        "scrapers": SCRAPERS,
        "keys": KEYS,
        "metrics_bytes": metrics_bytes,
        "unloaded": base,
        "loaded": load,
        "p90_ms": {"unloaded": _p90(unloaded), "loaded": _p90(loaded)},
        "ratio_p50": ratio(load["p50"], base["p50"]),
        "ratio_p90": ratio(_p90(loaded), _p90(unloaded)),
        "publish": {"unloaded": summary(publish_unloaded), "loaded": summary(publish_loaded)},
        "daemon_cpu_pct": round(100 * cpu_pct, 1),
        "daemon_threads_max": most_threads,
        "scrapes": scraped,
        "scrapes_refused": refused,
        "scrape_failures": failed,
        "seconds": round(time.monotonic() - began, 1),
    }


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3)


def _body(port: int, path: str) -> list[bytes]:
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return chunks


def render(result: dict[str, Any]) -> str:
    rows = [
        [what, result[what]["n"], result[what]["p50"], result["p90_ms"][what],
         result[what]["p99"], result[what]["max"]]
        for what in ("unloaded", "loaded")
    ]  # fmt: skip
    rows.append(["x loaded/unloaded", "", result["ratio_p50"], result["ratio_p90"], "", ""])
    publish = result["publish"]
    rows += [
        [f"publish, {what}", publish[what]["n"], publish[what]["p50"], "",
         publish[what]["p99"], publish[what]["max"]]
        for what in ("unloaded", "loaded")
    ]  # fmt: skip
    return "\n".join([
        table(
            f"endpoints: /healthz round trips (ms) while {result['scrapers']} clients scrape "
            f"/metrics ({result['keys']} keys, {result['metrics_bytes'] // 1024} KiB)",
            ["/healthz", "n", "p50", "p90", "p99", "max"],
            rows,
        ),
        f"daemon under load: {result['daemon_cpu_pct']} % CPU, at most "
        f"{result['daemon_threads_max']} threads; {result['scrapes']} scrapes, "
        f"{result['scrapes_refused']} refused (503), {result['scrape_failures']} failed",
    ])  # fmt: skip


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
