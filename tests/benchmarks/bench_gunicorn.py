"""hotreload against gunicorn's own reload, and what a subscriber costs a gunicorn worker.

Reload (N = 2, 4, 8 sync workers), both pods side by side, runs alternating:

- hotreload: the example app (``deploy/example``, ``preload_app``, its two subscribers) and
  ``hotreload watch`` on a kubelet-style mount. Time from the kubelet ``..data`` rename to the
  last worker's ``rate_limits`` callback returning. No worker restarts.
- HUP: the same app written without hotreload (same config types and routes, the files read
  at import; ``_gunicorn_apps.plain_app``), ``preload_app`` off (with it on, HUP never delivers
  the new config: new workers fork from the master's old import). The rename, then at once
  ``kill -HUP`` to the master; time until every new worker has loaded the app and is about to
  serve (gunicorn's ``post_worker_init``) and every old worker has exited.
- HUP, trivial app (context only, not a target): the same with an app that imports nothing
  but the stdlib and reads one number from the file (``_gunicorn_apps.trivial_app``).

After every run a few requests check that every answer carries the new config.

Memory (N = 4): RSS, PSS and USS (private) per worker from ``/proc/PID/smaps_rollup``, for the
example app and the plain app, each with ``preload_app`` on and off, after boot and 40
requests; the difference is what hotreload adds to a worker. The workers also report whether
``watchdog`` is imported (it must not be).

    python -m tests.benchmarks.bench_gunicorn [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subscriber.testing import RedisServer, free_port
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import (
    REPO,
    Processes,
    Reports,
    processes,
    ratio,
    smaps_rollup,
    summary,
    table,
)

EXAMPLE = REPO / "deploy" / "example"
FLAGS = (EXAMPLE / "config" / "flags.json").read_bytes()


def limits(seq: int, size: int = 1024) -> bytes:
    head = f"default:\n  requests_per_second: {seq}\n  burst: 10\n".encode()
    pad = b"# padding padding padding padding padding padding padding padding padding\n"
    body = head + pad * ((size - len(head)) // len(pad) + 1)
    return body[:size].rsplit(b"\n", 1)[0] + b"\n"


@dataclass
class Seen:
    """What the workers of one gunicorn reported (CLOCK_MONOTONIC ns)."""

    booted: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (seq, t)
    exited: dict[int, int] = field(default_factory=dict)  # pid -> t
    applied: dict[int, int] = field(default_factory=dict)  # pid -> t
    watchdog: int = 0  # booted workers that had watchdog imported


@dataclass
class Pod:
    """One gunicorn (and, for the hotreload app, its publisher) on its own mount."""

    name: str
    app: str  # "hotreload" or "plain"
    root: Path
    procs: Processes
    redis_url: str
    workers: int
    preload: bool
    reports: Reports = field(default_factory=Reports)
    master: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    port: int = 0
    pids: dict[int, int] = field(default_factory=dict)  # worker pid -> seq it runs
    watchdog_in_workers: int = 0
    last_update: float = 0.0

    @property
    def mount(self) -> Path:
        return self.root / "mount"

    def start(self, seq: int) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        atomic_write(str(self.mount), {"rate_limits.yaml": limits(seq), "flags.json": FLAGS})
        if self.app == "hotreload":
            self.daemon = self.procs.python(
                "-m", "publisher", "watch", str(self.mount), "--redis", self.redis_url,
                "--metrics-port", "0", "--log-level", "WARNING",
            )  # fmt: skip
        multiproc = self.root / "prometheus"
        multiproc.mkdir(exist_ok=True)
        self.port = free_port()
        env = {
            "HOTRELOAD_REDIS_URL": self.redis_url,
            "HOTRELOAD_CONFIG_DIR": str(self.mount),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(self.workers),
            "HR_BENCH_PRELOAD": "1" if self.preload else "0",
            "HR_BENCH_HOTRELOAD": "1" if self.app == "hotreload" else "0",
            **self.reports.env,
        }
        log = (self.root / "gunicorn.log").open("wb")
        self.master = self.procs.python(
            "-m", "gunicorn", "-c", "python:tests.benchmarks._gunicorn_conf",
            "--chdir", str(EXAMPLE), f"tests.benchmarks._gunicorn_apps:{self.app}_app",
            env=env, pass_fds=[self.reports.fd], stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        seen = self.collect(lambda seen: len(seen.booted) >= self.workers, timeout=60)
        self.pids = {pid: s for pid, (s, _t) in seen.booted.items()}
        self.watchdog_in_workers = seen.watchdog
        self.last_update = time.monotonic()

    def collect(self, done: Callable[[Seen], bool], timeout: float, seq: int = -1) -> Seen:
        """Read the workers' reports until ``done(seen)``; ``applied`` counts ``seq`` only."""
        seen = Seen()
        deadline = time.monotonic() + timeout
        while not done(seen):
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited; see {self.root}/gunicorn.log")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no complete reload within {timeout} s")
            for line in self.reports.lines(remaining):
                if line[0] == "B":
                    seen.booted[int(line[1])] = (int(line[2]), int(line[3]))
                    seen.watchdog += int(line[4])
                elif line[0] == "X":
                    seen.exited[int(line[1])] = int(line[2])
                elif line[0] == "A" and int(line[1]) == seq:
                    seen.applied[int(line[2])] = int(line[3])
        return seen

    def space(self) -> None:
        wait = self.last_update + 0.13 + random.uniform(0, 0.02) - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def write(self, seq: int) -> int:
        self.space()
        self.reports.lines(0)
        summary_ = atomic_write(
            str(self.mount), {"rate_limits.yaml": limits(seq), "flags.json": FLAGS}
        )
        self.last_update = time.monotonic()
        renamed: int = summary_["t_rename_ns"]
        return renamed

    def hotreload_update(self, seq: int) -> float:
        renamed = self.write(seq)
        workers = set(self.pids)
        seen = self.collect(
            lambda seen: workers <= set(seen.applied) or bool(seen.exited), 30, seq=seq
        )
        if seen.exited:
            raise RuntimeError(f"{self.name}: workers {sorted(seen.exited)} exited in an update")
        self.pids = dict.fromkeys(self.pids, seq)
        return (max(seen.applied[pid] for pid in workers) - renamed) / 1e6

    def hup_update(self, seq: int) -> float:
        assert self.master is not None
        renamed = self.write(seq)
        os.kill(self.master.pid, signal.SIGHUP)
        old = set(self.pids)

        def fresh(seen: Seen) -> dict[int, int]:
            return {p: t for p, (s, t) in seen.booted.items() if s == seq and p not in old}

        seen = self.collect(
            lambda seen: len(fresh(seen)) >= self.workers and old <= set(seen.exited), 60
        )
        new = fresh(seen)
        self.pids = dict.fromkeys(new, seq)
        return (max([*new.values(), *(seen.exited[p] for p in old)]) - renamed) / 1e6

    def get(self, path: str = "/") -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body

    def check_serves(self, seq: int, requests: int) -> None:
        for _ in range(requests):
            current = json.loads(self.get("/"))
            served = current["rate_limits"]["default"]["requests_per_second"]
            if served != seq:
                raise AssertionError(
                    f"{self.name}: pid {current['pid']} served {served}, not {seq}"
                )

    def memory(self) -> dict[str, Any]:
        assert self.master is not None
        for _ in range(40):
            self.get("/")
        rows = [smaps_rollup(pid) for pid in self.pids]
        master = smaps_rollup(self.master.pid)
        mean = {k: round(sum(r[k] for r in rows) / len(rows), 1) for k in ("rss", "pss", "uss")}
        return {"workers": len(rows), "per_worker": mean, "master": master}

    def stop(self) -> None:
        if self.master is not None:
            self.procs.stop(self.master, timeout=30)
            self.master = None
        if self.daemon is not None:
            self.procs.stop(self.daemon)
            self.daemon = None
        self.reports.close()


def reload_rows(root: Path, url: str, procs: Processes, quick: bool) -> list[dict[str, Any]]:
    sizes = {8: 5} if quick else {2: 12, 4: 20, 8: 20}
    rows = []
    seq = 100
    for n, runs in sizes.items():
        hot = Pod("hotreload", "hotreload", root / f"hot-{n}", procs, url, n, preload=True)
        hup = Pod("HUP", "plain", root / f"hup-{n}", procs, url, n, preload=False)
        trivial = Pod("trivial", "trivial", root / f"triv-{n}", procs, url, n, preload=False)
        pods = [hot, hup, trivial]
        try:
            for pod in pods:
                pod.start(seq)
            if hot.watchdog_in_workers:
                raise AssertionError("a hotreload worker imported watchdog")
            samples: dict[str, list[float]] = {pod.name: [] for pod in pods}
            started_pids = set(hot.pids)
            for run in range(runs + 1):
                for pod in random.sample(pods, len(pods)):
                    seq += 1
                    took = pod.hotreload_update(seq) if pod is hot else pod.hup_update(seq)
                    pod.check_serves(seq, 3 * n)
                    if run:  # the first run warms up
                        samples[pod.name].append(took)
                    time.sleep(0.05 + took / 1000)
            if set(hot.pids) != started_pids:
                raise AssertionError("hotreload workers were replaced during the runs")
            hot_s, hup_s = summary(samples["hotreload"]), summary(samples["HUP"])
            trivial_s = summary(samples["trivial"])
            rows.append({
                "workers": n, "hotreload": hot_s, "hup": hup_s, "hup_trivial": trivial_s,
                "speedup_p50": ratio(hup_s["p50"], hot_s["p50"]),
                "speedup_p99": ratio(hup_s["p99"], hot_s["p99"]),
                "speedup_trivial_p50": ratio(trivial_s["p50"], hot_s["p50"]),
                "workers_restarted_by_hotreload": 0,
                "watchdog_imported_in_workers": hot.watchdog_in_workers,
            })  # fmt: skip
        finally:
            for pod in pods:
                pod.stop()
    return rows


def memory_rows(root: Path, url: str, procs: Processes, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for preload in (True,) if quick else (True, False):
        figures = {}
        for app in ("hotreload", "plain"):
            name = f"mem-{app}-{int(preload)}"
            pod = Pod(name, app, root / name, procs, url, 4, preload=preload)
            try:
                pod.start(1)
                figures[app] = pod.memory()
                figures[app]["watchdog_imported_in_workers"] = pod.watchdog_in_workers
            finally:
                pod.stop()
        added = {
            k: round(figures["hotreload"]["per_worker"][k] - figures["plain"]["per_worker"][k], 1)
            for k in ("rss", "pss", "uss")
        }
        rows.append({"preload_app": preload, **figures, "hotreload_adds": added})
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-guni-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        reload = reload_rows(Path(tmp), server.url, procs, quick)
        memory = memory_rows(Path(tmp), server.url, procs, quick)
    return {"reload": reload, "memory": memory, "seconds": round(time.monotonic() - began, 1)}


def render(result: dict[str, Any]) -> str:
    reload = table(
        "reload: kubelet rename -> every gunicorn worker runs the new config (ms)",
        ["N", "runs", "hot p50", "hot p99", "HUP p50", "HUP p99", "HUP/hot p50", "HUP/hot p99",
         "trivial HUP p50", "trivial/hot p50"],
        [
            [r["workers"], r["hotreload"]["n"], r["hotreload"]["p50"], r["hotreload"]["p99"],
             r["hup"]["p50"], r["hup"]["p99"], r["speedup_p50"], r["speedup_p99"],
             r["hup_trivial"]["p50"], r["speedup_trivial_p50"]]
            for r in result["reload"]
        ],
    )  # fmt: skip
    rows = []
    for r in result["memory"]:
        for app in ("hotreload", "plain"):
            w = r[app]["per_worker"]
            rows.append(["on" if r["preload_app"] else "off", app, w["rss"], w["pss"], w["uss"]])
        a = r["hotreload_adds"]
        rows.append(["on" if r["preload_app"] else "off", "hotreload adds", a["rss"], a["pss"],
                     a["uss"]])  # fmt: skip
    memory = table(
        "memory per gunicorn worker (MiB, mean of 4 workers)",
        ["preload_app", "app", "RSS", "PSS", "USS"],
        rows,
    )
    return reload + "\n\n" + memory


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
