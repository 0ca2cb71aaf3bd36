"""Real gunicorn (preload_app, 4 workers) running the example app with the subscriber hooks;
what the hooks do for memory (``pre_fork``, the freeze) under real gunicorn too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from subscriber._redis import connect
from subscriber.protocol import WorkerState
from subscriber.testing import RedisServer, free_port
from tests.benchmarks._common import processes as bench_processes
from tests.benchmarks._common import smaps_rollup
from tests.benchmarks.bench_gunicorn import Pod as BenchPod
from tests.conftest import REPO, KubeletMount, Processes
from tests.helpers import start_daemon, wait_until
from tests.workers.harness import worker_states

EXAMPLE = REPO / "deploy" / "example"
GOOD_LIMITS = (EXAMPLE / "config" / "rate_limits.yaml").read_bytes()
FLAGS = (EXAMPLE / "config" / "flags.json").read_bytes()


@dataclass
class Pod:
    """The processes of one pod: publisher daemon and gunicorn, on one mount and Redis."""

    mount: KubeletMount
    redis: RedisServer
    gunicorn: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str = "/") -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            exc.close()
            return exc.code, body

    def served_by_worker(self, requests: int = 200) -> dict[int, dict[str, Any]]:
        """The config each worker pid served, from many requests (the kernel spreads them)."""
        served: dict[int, dict[str, Any]] = {}
        for _ in range(requests):
            status, body = self.get("/")
            assert status == 200, body
            current = json.loads(body)
            served.setdefault(current["pid"], current)
        return served

    def served_by_all(self) -> dict[int, dict[str, Any]]:
        """``served_by_worker`` once all 4 workers answered (the kernel spreads connections
        unevenly, so one sample of 200 requests can miss a worker on a busy machine)."""

        def sample() -> dict[int, dict[str, Any]]:
            served = self.served_by_worker()
            return served if len(served) == 4 else {}

        return wait_until(sample, "every worker answering")

    def workers(self, key: str) -> dict[str, WorkerState]:
        return {
            w: s for w, s in worker_states(self.redis.url, key).items() if s.status != "stopped"
        }

    def worker_pids(self) -> set[int]:
        children = Path(f"/proc/{self.gunicorn.pid}/task/{self.gunicorn.pid}/children")
        return {int(pid) for pid in children.read_text().split()}


def limits(rps: int, burst: int) -> bytes:
    return f"default:\n  requests_per_second: {rps}\n  burst: {burst}\n".encode()


def start_pod(
    tmp_path: Path,
    kubelet_mount: KubeletMount,
    redis_server: RedisServer,
    processes: Processes,
    worker_class: str = "sync",
) -> Pod:
    kubelet_mount.write({"rate_limits.yaml": GOOD_LIMITS, "flags.json": FLAGS})
    start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        "HOTRELOAD_REDIS_URL": redis_server.url,
        "HOTRELOAD_CONFIG_DIR": str(kubelet_mount.directory),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "4",
        "WORKER_CLASS": worker_class,
        "THREADS": "4" if worker_class == "gthread" else "1",
    }
    with log.open("wb") as fh:
        gunicorn = processes.python(
            "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"), "--chdir", str(EXAMPLE),
            "app:app", env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    pod = Pod(kubelet_mount, redis_server, gunicorn, port, log)

    def serving() -> bool:
        """Every worker has a config for both keys: its ``post_worker_init`` returned, so it
        accepts requests. Not merely 4 rows: a worker writes its row (``starting``) as its
        ``start()`` begins, then waits for the daemon's first publish, serving nothing; a
        daemon whose first publish waits for the workers' next heartbeat (rows written in
        Redis's first second, ``publisher._restored``) held 4 workers so for 5 s, and the
        test's first request timed out (once in 40 loaded runs)."""
        assert gunicorn.poll() is None, log.read_text()
        return all(
            len(states) == 4 and all(s.status in ("applied", "fallback") for s in states.values())
            for states in map(pod.workers, ("rate_limits.yaml", "flags.json"))
        )

    wait_until(serving, "4 workers serving", timeout=30)
    return pod


@pytest.fixture
def pod(
    tmp_path: Path, kubelet_mount: KubeletMount, redis_server: RedisServer, processes: Processes
) -> Pod:
    return start_pod(tmp_path, kubelet_mount, redis_server, processes)


def all_serve(pod: Pod, key: str, expected: Any) -> bool:
    served = pod.served_by_worker()
    return len(served) == 4 and all(c[key] == expected for c in served.values())


@pytest.mark.timeout(120)
def test_every_worker_applies_good_updates_rejects_bad_ones_and_replays_after_sigkill(
    pod: Pod,
) -> None:
    master = pod.gunicorn.pid
    # the master imported the app (preload) but holds no thread and no Redis connection
    assert len(os.listdir(f"/proc/{master}/task")) == 1
    workers = pod.worker_pids()

    def connection_pids() -> list[int]:
        client = connect(pod.redis.url, socket_timeout=5)
        try:
            names = [c["name"] for c in client.client_list()]
        finally:
            client.close()
        pids = [int(n.rsplit(":", 1)[1]) for n in names if n.rsplit(":", 1)[-1].isdigit()]
        return pids if len([p for p in pids if p in workers]) == 8 else []

    # one connection per subscriber (2) per worker (4), none from the master
    assert master not in wait_until(connection_pids)

    first = pod.served_by_all()
    assert all(c["rate_limits"]["default"]["burst"] == 100 for c in first.values())

    pod.mount.set("rate_limits.yaml", limits(60, 120))
    wait_until(
        lambda: all_serve(pod, "rate_limits", {"default": {"requests_per_second": 60,
                                                           "burst": 120}, "routes": {}}),
        timeout=15,
    )  # fmt: skip
    good_version = next(iter(pod.served_by_all().values()))["versions"]

    # a config the app's types reject: every worker keeps serving the previous one
    pod.mount.set("rate_limits.yaml", limits(0, 120))

    def all_rejected() -> dict[str, WorkerState]:
        states = pod.workers("rate_limits.yaml")
        return states if all(st.status == "rejected" for st in states.values()) else {}

    states = wait_until(all_rejected, timeout=15)
    for state in states.values():
        assert "requests_per_second" in state.error
        assert state.version == good_version["rate_limits.yaml"]
    served = pod.served_by_all()
    assert all(c["rate_limits"]["default"]["requests_per_second"] == 60 for c in served.values())

    # a worker killed with SIGKILL is replaced; its first answers carry the current config
    victim = next(iter(pod.worker_pids()))
    os.kill(victim, signal.SIGKILL)

    def replacement() -> int:
        pids = pod.worker_pids()
        fresh = pids - set(first)
        return fresh.pop() if victim not in pids and len(pids) == 4 and fresh else 0

    new_pid = wait_until(replacement, timeout=20)

    def served_including_new() -> dict[int, dict[str, Any]]:
        served = pod.served_by_worker()
        return served if new_pid in served else {}

    served = wait_until(served_including_new)
    assert served[new_pid]["rate_limits"]["default"]["requests_per_second"] == 60
    assert served[new_pid]["versions"] == good_version

    # /metrics aggregates the live workers (multiprocess mode)
    status, body = pod.get("/metrics")
    metrics = body.decode()
    assert status == 200
    rejected = [
        line for line in metrics.splitlines()
        if line.startswith('hotreload_subscriber_rejected_total{key="rate_limits.yaml"}')
    ]  # fmt: skip
    assert rejected
    assert float(rejected[0].split()[-1]) >= 4  # every worker rejected it once
    version = float(good_version["rate_limits.yaml"])
    version_line = f'hotreload_subscriber_version_min{{key="rate_limits.yaml"}} {version}'
    assert version_line in metrics

    pod.gunicorn.send_signal(signal.SIGTERM)
    assert pod.gunicorn.wait(30) == 0
    gone = worker_states(pod.redis.url, "rate_limits.yaml")
    assert sum(s.status == "stopped" for s in gone.values()) >= 4


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_threaded_and_gevent_workers_converge(
    worker_class: str,
    tmp_path: Path,
    kubelet_mount: KubeletMount,
    redis_server: RedisServer,
    processes: Processes,
) -> None:
    pod = start_pod(tmp_path, kubelet_mount, redis_server, processes, worker_class)
    pod.mount.set("flags.json", b'{"new_checkout": true}')
    wait_until(lambda: all_serve(pod, "flags", {"new_checkout": True}), timeout=15)
    pod.gunicorn.send_signal(signal.SIGTERM)
    assert pod.gunicorn.wait(30) == 0


def test_pre_fork_fills_the_shared_caches_and_freezes_without_io_or_threads(
    redis_server: RedisServer,
) -> None:
    """In a fresh interpreter, as gunicorn's master: ``pre_fork`` reads redis-py's version
    (cached), creates the metric families of the unstarted subscribers, runs the
    subscriber's connection code once in-process (``_warm``: its bytecode is quickened, the
    subscriber's logger has its level cache) and freezes the heap -- and connects nowhere,
    starts no thread, starts no subscriber."""
    code = textwrap.dedent(
        """
        import dis, gc, json, os, threading
        import prometheus_client
        from subscriber import Subscriber, metrics
        from subscriber.gunicorn import pre_fork

        sub = Subscriber("app.yaml", lambda text: None)
        def sockets():
            found = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    found += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
                except OSError:
                    pass  # the directory listing's own descriptor, closed by now
            return found
        def quickened(function):
            code = function.__code__
            plain = [i.opname for i in dis.get_instructions(code)]
            return plain != [i.opname for i in dis.get_instructions(code, adaptive=True)]
        from subscriber import _light
        from subscriber._light import Connection
        before = sockets()
        was_quickened = quickened(Connection.read_response)
        pre_fork(None, None)
        print(json.dumps({
            "frozen": gc.get_freeze_count(),
            "lib_version_cached": _light.lib_version.cache_info().currsize,
            "metrics": metrics._instance is not None,
            "new_sockets": sockets() - before,
            "threads": threading.active_count(),
            "started": sub.started,
            "quickened": [was_quickened, quickened(Connection.read_response)],
            "logger_cache": bool(sub._log._cache),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "HOTRELOAD_REDIS_URL": redis_server.url},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report.pop("frozen") > 10_000
    assert report == {
        "lib_version_cached": 1,
        "metrics": True,
        "new_sockets": 0,
        "threads": 1,
        "started": False,
        "quickened": [False, True],
        "logger_cache": True,
    }


@pytest.mark.timeout(180)
def test_preloaded_workers_keep_the_master_heap_shared_and_a_subscriber_stays_small(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gunicorn, preload_app, the example's hooks, 2 workers per app. A full collection in
    a worker copies almost nothing of the master's heap (gc.freeze; without it +10 MiB USS
    per worker); a worker running the example's 2 Subscribers holds at most 1.95 MiB more
    private memory (USS) than one of the same app that imports subscriber and starts
    nothing (issue 21: measured here 1.62-1.85 MiB, 11 runs, with ``subscriber._promfiles``
    writing the metric files with pwrite; 2.00-2.04 in the same minutes, alternating, and
    1.99-2.17 before, with the files mapped -- 64 KiB of USS per file; 2.38-2.50 through
    prometheus_client; 3.36 with redis-py's connection instead of ``subscriber._light``'s;
    bench_gunicorn has the figures)."""
    uss: dict[str, list[float]] = {}
    with bench_processes() as procs:
        for app in ("imported", "hotreload"):
            pod = BenchPod(app, app, tmp_path / app, procs, redis_server.url, 2, preload=True)
            before, after = _uss_around_a_collection(pod)
            for pid, private in after.items():
                assert private - before[pid] < 2.0, (app, before, after)
            uss[app] = list(after.values())
    imported = sum(uss["imported"]) / len(uss["imported"])
    running = sum(uss["hotreload"]) / len(uss["hotreload"])
    assert running - imported < 1.95, (running - imported, uss)


def _uss_around_a_collection(pod: BenchPod) -> tuple[dict[int, float], dict[int, float]]:
    """Start ``pod``, serve 20 requests, and read each worker's USS before and after a full
    collection in it; the pod is stopped whatever happens."""
    try:
        pod.start(1)
        for _ in range(20):
            pod.get("/")
        before = {pid: smaps_rollup(pid)["uss"] for pid in pod.pids}
        pod.collect_garbage()
        after = {pid: smaps_rollup(pid)["uss"] for pid in pod.pids}
    finally:
        pod.stop()
    return before, after


@pytest.mark.timeout(120)
def test_without_preload_or_pre_fork_a_workers_collection_leaves_the_master_heap_shared(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gunicorn with ``preload_app`` off and a conf that has ``post_worker_init`` but no
    ``pre_fork`` (written before it existed): the worker still inherits what the master
    imported (gunicorn, the conf's ``subscriber.gunicorn``), and ``post_worker_init``
    freezes it, so a full collection in the worker copies almost none of it (measured 0.1
    MiB; +5.8 MiB when the freeze was only done under ``preload_app``)."""
    with bench_processes() as procs:
        pod = BenchPod("imported", "imported", tmp_path, procs, redis_server.url, 2, preload=False)
        pod.pre_fork = False
        before, after = _uss_around_a_collection(pod)
    for pid, private in after.items():
        assert private - before[pid] < 2.0, (before, after)
