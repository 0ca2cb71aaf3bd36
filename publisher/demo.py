"""``hotreload demo`` (``make demo``): the whole system on this machine, end to end.

Starts private processes in a temp dir -- a Redis on a unix socket, ``hotreload watch`` on a
kubelet-style mount, the example gunicorn app with 4 workers -- then walks through a good
update, a bad one (rejected everywhere, previous config kept), a fix, a canary promoted after
its hold, a rollback, a worker killed and replaced, and the history, printing the operator's
views as it goes. Those views are real ``hotreload`` commands run as subprocesses (this module
never imports the CLI, which imports it for ``hotreload demo``). Stops everything it started
(by PID) and returns 0, in well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from publisher.inspect import history, wait_for
from subscriber._redis import connect
from subscriber.testing import RedisServer, free_port

__all__ = ["kubelet_update", "run_demo"]

RATE_LIMITS = "rate_limits.yaml"


def kubelet_update(mount: Path, payload: dict[str, bytes]) -> None:
    """Update ``mount`` the way kubelet updates a ConfigMap volume (atomic ``..data`` swap).

    New timestamped dir with every key, ``..data_tmp`` symlink renamed over ``..data``, key
    symlinks ``KEY -> ..data/KEY`` created once, old dir removed.
    """
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(random.getrandbits(32))
    new_dir = mount / stamp
    new_dir.mkdir(mode=0o755)
    for key, content in payload.items():
        (new_dir / key).write_bytes(content)
    data = mount / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    (mount / "..data_tmp").symlink_to(stamp)
    (mount / "..data_tmp").rename(data)
    for key in payload:
        if not (mount / key).is_symlink():
            (mount / key).symlink_to(f"..data/{key}")
    if old:
        shutil.rmtree(mount / old)


class Demo:
    def __init__(self, example_dir: Path, workdir: Path) -> None:
        self.example = example_dir
        self.workdir = workdir
        self.mount = workdir / "config"
        self.mount.mkdir()
        self.payload = {
            name: (example_dir / "config" / name).read_bytes()
            for name in (RATE_LIMITS, "flags.json")
        }
        self.redis = RedisServer(workdir / "redis")
        self.port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ processes
    def spawn(self, argv: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / log).open("wb") as fh:
            process = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.processes.append(process)
        return process

    def start(self) -> None:
        kubelet_update(self.mount, self.payload)
        self.redis.start()
        say(f"Redis on {self.redis.url} (pid {self.redis.pid})")
        env = {"HOTRELOAD_REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1"}
        self.daemon = self.watch()
        multiproc = self.workdir / "prometheus"
        multiproc.mkdir()
        self.gunicorn = self.spawn(
            [sys.executable, "-m", "gunicorn", "-c", str(self.example / "gunicorn.conf.py"),
             "--chdir", str(self.example), "app:app"],
            "gunicorn.log",
            {**env, "HOTRELOAD_CONFIG_DIR": str(self.mount), "WEB_CONCURRENCY": "4",
             "BIND": f"127.0.0.1:{self.port}", "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
        )  # fmt: skip
        say(f"gunicorn, 4 workers, preload_app (pid {self.gunicorn.pid}), :{self.port}")
        self.wait(lambda: len(self.served()) == 4, "every worker to serve", 30)

    def watch(self, *options: str) -> subprocess.Popen[bytes]:
        """``hotreload watch`` on the mount (``options`` added), the previous one stopped."""
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(15)
        env = {"HOTRELOAD_REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1"}
        argv = ["watch", str(self.mount), "--metrics-port", "0", *options]
        daemon = self.spawn([sys.executable, "-m", "publisher", *argv], "publisher.log", env)
        say(f"hotreload {' '.join(argv)} (pid {daemon.pid})")
        return daemon

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        self.redis.stop()

    # ------------------------------------------------------------------ looking
    def served(self, requests: int = 64) -> dict[int, dict[str, Any]]:
        """What each gunicorn worker serves (pid -> its ``/`` JSON), from many requests."""
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(requests):
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.port}/"
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
                seen.setdefault(body["pid"], body)
        return seen

    def wait(self, condition: Any, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs in {self.workdir}")
            time.sleep(0.05)

    def cli(self, *argv: str) -> None:
        """Run ``hotreload ARGV`` as its own process, its output straight to ours: what the
        demo shows is what an operator typing it would see."""
        print(f"\n$ hotreload {' '.join(argv)}", flush=True)
        command = [sys.executable, "-m", "publisher", *argv, "--redis", self.redis.url]
        code = subprocess.run(command, check=False, timeout=30).returncode
        if code:
            say(f"(exit {code})")

    def converge(self, content: bytes, what: str) -> float:
        """Publish ``content`` as rate_limits.yaml the kubelet way; time until all 4 apply."""
        client = connect(self.redis.url, socket_timeout=5)
        try:
            before = len(history(client, RATE_LIMITS, prefix="hotreload", limit=1000))
            self.payload[RATE_LIMITS] = content
            started = time.perf_counter()
            kubelet_update(self.mount, self.payload)
            while len(history(client, RATE_LIMITS, prefix="hotreload", limit=1000)) == (before):
                time.sleep(0.001)
            result = wait_for(
                client, RATE_LIMITS, prefix="hotreload", timeout=15, poll_interval=0.002
            )
        finally:
            client.close()
        elapsed = (time.perf_counter() - started) * 1000
        state = result.convergence.state
        say(f"{what}: {state} on all 4 workers {elapsed:.0f} ms after the kubelet swap")
        return elapsed

    # ------------------------------------------------------------------ the story
    def run(self) -> None:
        step("1. Start: Redis, the publisher, gunicorn with 4 workers")
        self.start()
        self.cli("status")

        step("2. A good update: burst 100 -> 150 on the default rate limit")
        good = self.payload[RATE_LIMITS].replace(b"burst: 100", b"burst: 150")
        self.converge(good, "good update")
        served = self.served()
        bursts = sorted({c["rate_limits"]["default"]["burst"] for c in served.values()})
        say(f"workers {sorted(served)} now serve default burst {bursts}")

        step("3. A bad update: requests_per_second: 0 (the app's types require > 0)")
        bad = good.replace(b"requests_per_second: 50", b"requests_per_second: 0", 1)
        self.converge(bad, "bad update")
        self.cli("status", RATE_LIMITS)
        served = self.served()
        rps = sorted({c["rate_limits"]["default"]["requests_per_second"] for c in served.values()})
        say(f"every worker still serves the previous config: requests_per_second {rps}")

        step("4. The fix: requests_per_second: 40")
        fixed = good.replace(b"requests_per_second: 50", b"requests_per_second: 40", 1)
        self.converge(fixed, "fix")
        self.cli("status", RATE_LIMITS)

        step("5. A canary: the publisher restarted with --canary 1 --canary-hold 2")
        self.daemon = self.watch("--canary", "1", "--canary-hold", "2")
        canary = fixed.replace(b"burst: 150", b"burst: 175")
        started = time.perf_counter()
        self.payload[RATE_LIMITS] = canary
        kubelet_update(self.mount, self.payload)
        self.wait(lambda: 175 in self.bursts().values(), "the canary worker", 30)
        per_worker = self.bursts()
        say(f"burst per worker: {per_worker}: one canary worker runs it, the others wait")
        self.cli("status", RATE_LIMITS)
        self.wait(lambda: set(self.bursts().values()) == {175}, "the promotion", 30)
        elapsed = time.perf_counter() - started
        say(f"promoted {elapsed:.1f} s after the kubelet swap: every worker serves burst 175")

        step("6. Rollback: every worker back on the previous content, no kubelet wait")
        started = time.perf_counter()
        self.cli("rollback", RATE_LIMITS)
        self.wait(lambda: set(self.bursts().values()) == {150}, "the rollback", 15)
        elapsed = (time.perf_counter() - started) * 1000
        say(f"rolled back on all 4 workers {elapsed:.0f} ms after the command started")
        say("the mount still shows burst 175: pinned, published again only once it changes")
        self.cli("status", RATE_LIMITS)

        step("7. kill -9 one worker: gunicorn replaces it, and it replays before serving")
        assert self.gunicorn is not None
        # requests reach the workers the kernel picks: sample until all 4 answered, and keep
        # what the replacement served as soon as it answers (a later sample may miss it)
        before: set[int] = set()

        def all_answered() -> bool:
            before.update(self.served())
            return len(before) >= 4

        self.wait(all_answered, "all 4 workers to answer")
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        fresh: dict[int, dict[str, Any]] = {}

        def replaced() -> bool:
            now = self.served()
            fresh.update((pid, body) for pid, body in now.items() if pid not in before)
            return bool(fresh) and victim not in now

        self.wait(replaced, "the replacement worker")
        for pid in sorted(fresh):
            version = fresh[pid]["versions"][RATE_LIMITS]
            rps = fresh[pid]["rate_limits"]["default"]["requests_per_second"]
            say(f"new worker {pid} serves version {version} (requests_per_second {rps})")

        step("8. The history, and what every worker reported")
        self.cli("history", RATE_LIMITS)
        self.cli("diff", RATE_LIMITS, "1")

    def bursts(self) -> dict[int, int]:
        return {p: c["rate_limits"]["default"]["burst"] for p, c in self.served().items()}


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def find_example_dir() -> Path | None:
    """``deploy/example`` of the checkout this package runs from (``make demo``)."""
    candidate = Path(__file__).resolve().parents[1] / "deploy" / "example"
    return candidate if (candidate / "app.py").exists() else None


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: a short temp dir
    with tempfile.TemporaryDirectory(prefix="hotreload-demo-") as tmp:
        yield Path(tmp)


def run_demo(example_dir: Path) -> int:
    began = time.monotonic()
    with _workdir() as workdir:
        demo = Demo(example_dir, workdir)
        try:
            demo.run()
        finally:
            demo.stop()
    step(f"Done in {time.monotonic() - began:.1f} s; every process started was stopped.")
    return 0
