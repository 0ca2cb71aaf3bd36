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

Memory (N = 4 workers, ``preload_app`` on and off, 2 rounds in a random order; 1 round and
on only with ``--quick``): RSS, PSS and USS (private: ``Private_Clean + Private_Dirty``) per
worker from ``/proc/PID/smaps_rollup``, mean over the workers of every round, for

- the plain app (nothing of hotreload, not even the hooks),
- the same app importing ``Subscriber`` and ``TypedConfig`` with the hooks, starting nothing,
- the example app (2 running subscribers), with the hooks as ``deploy/example`` has them,
- the same without ``pre_fork`` in its conf (a conf written before the hook existed),
- the example app plus 18 keys (20 subscribers, one shared follower per worker),
- the example app with its subscribers' metrics off (``metrics=False``),
- the importing app with one redis-py connection per worker (made as a subscriber makes its
  own, then a ``PING``) and no subscriber,

each after boot, 40 requests, 5 config updates (apps with subscribers), 40 requests and 6 s
(past one heartbeat), read before and after a full collection in every worker (``GET /__gc``):
the state a long-running worker reaches once it collects its oldest generation. "running
adds" (example - imported) is what a running Subscriber costs a worker; "import adds" what
importing hotreload does; "metrics off" (and "its metrics add": example - quiet) and "a
redis-py connection adds" split the first. The workers also report whether ``watchdog`` is
imported (it must not be). ``--modules DIR`` makes each worker list the modules it imported
after the fork.

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
from tests.benchmarks._gunicorn_apps import EXTRA_KEYS

EXAMPLE = REPO / "deploy" / "example"
SUBSCRIBING = ("hotreload", "twenty", "quiet")  # apps running subscribers (need the publisher)
HOOKED = ("hotreload", "twenty", "quiet", "imported", "client")  # gunicorn runs the hooks
# name -> (app, pre_fork hook): the example app also with a conf that lacks pre_fork
MEMORY_PODS = {
    "plain": ("plain", False),
    "imported": ("imported", True),
    "hotreload": ("hotreload", True),
    "no_pre_fork": ("hotreload", False),
    "twenty": ("twenty", True),
    "quiet": ("quiet", True),
    "client": ("client", True),
}
UPDATES = 5  # config updates applied before memory is read
SETTLE = 6.0  # s: past one heartbeat (5 s) after the last update
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
    app: str  # "hotreload", "twenty", "quiet", "imported", "client", "plain" or "trivial"
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
    modules: Path | None = None  # where workers list the modules they imported after the fork
    pre_fork: bool = True  # the conf has subscriber.gunicorn.pre_fork (apps in HOOKED)

    @property
    def mount(self) -> Path:
        return self.root / "mount"

    def start(self, seq: int) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        atomic_write(str(self.mount), self.files(seq))
        if self.app in SUBSCRIBING:
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
            "HR_BENCH_HOTRELOAD": "1" if self.app in HOOKED else "0",
            "HR_BENCH_PRE_FORK": "1" if self.pre_fork else "0",
            **self.reports.env,
            **({"HR_BENCH_MODULES": str(self.modules)} if self.modules else {}),
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

    def files(self, seq: int) -> dict[str, bytes]:
        files = {"rate_limits.yaml": limits(seq), "flags.json": FLAGS}
        if self.app == "twenty":
            files.update((key, b'{"n": %d}' % seq) for key in EXTRA_KEYS)
        return files

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
        summary_ = atomic_write(str(self.mount), self.files(seq))
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

    def memory(self, seq: int) -> dict[str, Any]:
        """Serve 40 requests, apply ``UPDATES`` updates (apps with subscribers), serve 40
        more, let a heartbeat pass; then RSS, PSS and USS of every worker (MiB)."""
        assert self.master is not None
        for _ in range(40):
            self.get("/")
        if self.app in SUBSCRIBING:
            for step in range(1, UPDATES + 1):
                self.hotreload_update(seq + step)
        for _ in range(40):
            self.get("/")
        time.sleep(SETTLE)
        served = [smaps_rollup(pid) for pid in self.pids]
        self.collect_garbage()
        rows = [smaps_rollup(pid) for pid in self.pids]
        return {"served": served, "workers": rows, "master": smaps_rollup(self.master.pid)}

    def collect_garbage(self) -> None:
        """A full collection in every worker (``GET /__gc`` until each one answered)."""
        collected: set[int] = set()
        for _ in range(400):
            collected.add(int(self.get("/__gc")))
            if collected >= set(self.pids):
                return
        raise RuntimeError(f"{self.name}: not every worker answered /__gc")

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


def memory_rows(
    root: Path, url: str, procs: Processes, quick: bool, *, rounds: int = 0,
    modules: Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per ``preload_app`` setting: the pods of ``MEMORY_PODS``, ``rounds`` rounds in a
    random order each, 4 workers each; means over every worker of every round."""
    rounds = rounds or (1 if quick else 2)
    rows = []
    for preload in (True,) if quick else (True, False):
        workers: dict[str, list[dict[str, float]]] = {name: [] for name in MEMORY_PODS}
        served: dict[str, list[dict[str, float]]] = {name: [] for name in MEMORY_PODS}
        masters: dict[str, list[dict[str, float]]] = {name: [] for name in MEMORY_PODS}
        watchdog = 0
        for round_ in range(rounds):
            for key in random.sample(list(MEMORY_PODS), len(MEMORY_PODS)):
                app, pre_fork = MEMORY_PODS[key]
                name = f"mem-{key}-{int(preload)}-{round_}"
                pod = Pod(name, app, root / name, procs, url, 4, preload=preload)
                pod.pre_fork = pre_fork
                if modules is not None:
                    pod.modules = modules / name
                    pod.modules.mkdir(parents=True, exist_ok=True)
                try:
                    pod.start(1)
                    found = pod.memory(1)
                    if app in SUBSCRIBING:
                        watchdog += pod.watchdog_in_workers
                finally:
                    pod.stop()
                workers[key] += found["workers"]
                served[key] += found["served"]
                masters[key].append(found["master"])
        figures: dict[str, dict[str, Any]] = {
            key: {"per_worker": _mean(workers[key]), "before_gc": _mean(served[key]),
                  "master": _mean(masters[key]), "workers": len(workers[key])}
            for key in MEMORY_PODS
        }  # fmt: skip

        rows.append({
            "preload_app": preload, "rounds": rounds, **figures,
            "hotreload": {**figures["hotreload"], "watchdog_imported_in_workers": watchdog},
            "running_adds": _delta(figures["hotreload"], figures["imported"]),
            "import_adds": _delta(figures["imported"], figures["plain"]),
            "hotreload_adds": _delta(figures["hotreload"], figures["plain"]),
            "twenty_adds": _delta(figures["twenty"], figures["imported"]),
            "no_pre_fork_adds": _delta(figures["no_pre_fork"], figures["imported"]),
            "quiet_adds": _delta(figures["quiet"], figures["imported"]),
            "metrics_add": _delta(figures["hotreload"], figures["quiet"]),
            "client_adds": _delta(figures["client"], figures["imported"]),
        })  # fmt: skip
    return rows


def _delta(pod: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    a, b = pod["per_worker"], base["per_worker"]
    found = {k: round(a[k] - b[k], 2) for k in ("rss", "pss", "uss")}
    before = pod["before_gc"]["uss"] - base["before_gc"]["uss"]
    return {**found, "uss_before_gc": round(before, 2)}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in ("rss", "pss", "uss")}


def run(
    quick: bool = False, memory_only: bool = False, rounds: int = 0, modules: Path | None = None
) -> dict[str, Any]:
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="hr-bench-guni-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
        processes() as procs,
    ):
        reload = [] if memory_only else reload_rows(Path(tmp), server.url, procs, quick)
        memory = memory_rows(Path(tmp), server.url, procs, quick, rounds=rounds, modules=modules)
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
    labels = {
        "plain": "plain app (no hotreload)",
        "imported": "imports subscriber, starts nothing",
        "hotreload": "example app: 2 running Subscribers",
        "twenty": "20 running Subscribers (shared follower)",
        "no_pre_fork": "example app, conf without pre_fork",
        "import_adds": "import adds (imported - plain)",
        "running_adds": "running adds (example - imported)",
        "hotreload_adds": "hotreload adds (example - plain)",
        "twenty_adds": "20 running add (twenty - imported)",
        "no_pre_fork_adds": "without pre_fork (its example - imported)",
        "quiet": "example app, subscriber metrics off",
        "client": "imports subscriber, one redis-py connection",
        "quiet_adds": "running adds, metrics off (quiet - imported)",
        "metrics_add": "its metrics add (example - quiet)",
        "client_adds": "a redis-py connection adds (client - imported)",
    }
    for r in result["memory"]:
        preload = "on" if r["preload_app"] else "off"
        for key in MEMORY_PODS:
            w, b = r[key]["per_worker"], r[key]["before_gc"]
            rows.append([preload, labels[key], r[key]["workers"], w["rss"], w["pss"], w["uss"],
                         b["uss"]])  # fmt: skip
        for what in ("import_adds", "running_adds", "hotreload_adds", "twenty_adds",
                     "no_pre_fork_adds", "quiet_adds", "metrics_add", "client_adds"):  # fmt: skip
            a = r[what]
            rows.append([preload, labels[what], "", a["rss"], a["pss"], a["uss"],
                         a["uss_before_gc"]])  # fmt: skip
    memory = table(
        "memory per gunicorn worker after a full gc (MiB, mean over the workers of every "
        "round; USS = private), and USS before that gc",
        ["preload_app", "app", "workers", "RSS", "PSS", "USS", "USS before gc"],
        rows,
    )
    return reload + "\n\n" + memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="skip the reload rows")
    parser.add_argument("--rounds", type=int, default=0, help="memory rounds (default 2, 1)")
    parser.add_argument(
        "--modules", type=Path, help="workers list the modules they import after the fork here"
    )
    args = parser.parse_args(argv)
    result = run(args.quick, args.memory_only, args.rounds, args.modules)
    print(render(result))
    print(f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
