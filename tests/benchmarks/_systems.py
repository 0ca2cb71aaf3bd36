"""The two systems the propagation benchmarks compare, started the same way.

- ``hotreload``: the real daemon (``python -m publisher watch MOUNT``) and worker processes
  each running a ``Subscriber`` (``_pool.py sub``).
- ``floor``: the least code doing the same job (``_floor_pub.py`` and ``_pool.py floor``).

Each has its own kubelet-style mount, key and report pipe; both may share one Redis. An
update is one ``atomic_write`` (the vendored kubelet writer); its latency runs from
``t_rename_ns`` to the last worker's report.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import Processes, Reports, content

# The daemon reports the first change after a quiet period at once but folds further changes
# within `settle` (0.1 s by default) into one report: updates to one system are spaced wider.
SPACING = 0.13


class UpdateTimeout(RuntimeError):
    pass


@dataclass
class System:
    name: str
    kind: str  # the _pool kind of its workers
    key: str
    mount: Path
    url: str
    procs: Processes
    reports: Reports = field(default_factory=Reports)
    stream: str = ""
    publisher: subprocess.Popen[bytes] | None = None
    pool: subprocess.Popen[bytes] | None = None
    workers: int = 0
    last_update: float = 0.0
    pids: list[int] = field(default_factory=list)

    def start_publisher(self, initial: bytes, metrics_port: int = 0) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        atomic_write(str(self.mount), {self.key: initial})
        if self.kind.endswith("floor"):
            argv = ["-m", "tests.benchmarks._floor_pub", str(self.mount), "--url", self.url,
                    "--key", self.key, "--stream", self.stream]  # fmt: skip
        else:
            argv = ["-m", "publisher", "watch", str(self.mount), "--redis", self.url,
                    "--metrics-port", str(metrics_port), "--log-level", "WARNING"]  # fmt: skip
        self.publisher = self.procs.python(*argv)

    def wait_published(self, client_url: str, timeout: float = 20.0) -> None:
        from subscriber._redis import connect

        client = connect(client_url, socket_timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while not client.xlen(self.stream):
                if self.publisher is not None and self.publisher.poll() is not None:
                    raise RuntimeError(f"{self.name}: the publisher exited")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: nothing published within {timeout} s")
                time.sleep(0.01)
        finally:
            client.close()

    def start_workers(
        self, count: int, *, per: int = 1, extra: tuple[str, ...] = (), timeout: float = 0
    ) -> None:
        argv = ["-m", "tests.benchmarks._pool", self.kind, "--count", str(count),
                "--per", str(per), "--url", self.url, "--key", self.key,
                "--stream", self.stream, *extra]  # fmt: skip
        self.pool = self.procs.python(*argv, env=self.reports.env, pass_fds=[self.reports.fd])
        self.workers = count
        self.pids = []
        deadline = time.monotonic() + (timeout or 60 + count * per * 1.0)
        while len(self.pids) < count:
            if self.pool.poll() is not None:
                raise RuntimeError(f"{self.name}: the worker pool exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {len(self.pids)} of {count} workers ready")
            for line in self.reports.lines(0.2):
                if line[0] == "R":
                    pid, started = int(line[2]), int(line[3])
                    self.procs.adopt(pid, started)
                    self.pids.append(pid)

    def stop_workers(self) -> None:
        if self.pool is not None:
            self.procs.stop(self.pool, timeout=30)
            self.pool = None
        for pid in self.pids:
            self.procs.adopted.pop(pid, None)
        self.pids = []
        self.workers = 0
        self.reports.lines(0)  # drop what is left

    def update(self, seq: int, size: int, timeout: float = 30.0) -> dict[str, float]:
        """One kubelet update; returns rename -> first and -> last worker applied (ms)."""
        wait = self.last_update + SPACING + random.uniform(0, 0.02) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.reports.lines(0)
        summary = atomic_write(str(self.mount), {self.key: content(seq, size)})
        self.last_update = time.monotonic()
        renamed: int = summary["t_rename_ns"]
        times: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while len(times) < self.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpdateTimeout(
                    f"{self.name}: {len(times)} of {self.workers} workers applied "
                    f"update {seq} within {timeout} s"
                )
            for line in self.reports.lines(remaining):
                if line[0] == "A" and int(line[1]) == seq:
                    times[line[2]] = int(line[3])
        ordered = sorted(times.values())
        return {
            "last_ms": (ordered[-1] - renamed) / 1e6,
            "first_ms": (ordered[0] - renamed) / 1e6,
        }

    def close(self) -> None:
        self.stop_workers()
        if self.publisher is not None:
            self.procs.stop(self.publisher)
            self.publisher = None
        self.reports.close()


def make_systems(
    root: Path, url: str, procs: Processes, *, async_kinds: bool = False
) -> tuple[System, System]:
    from subscriber.keys import stream_keys

    prefix = "async-" if async_kinds else ""
    hot = System("hotreload", prefix + "sub", "app.yaml", root / "hot-mount", url, procs)
    hot.stream = stream_keys(hot.key).events
    floor = System("floor", prefix + "floor", "app.yaml", root / "floor-mount", url, procs)
    floor.stream = "floor:app.yaml"
    return hot, floor
