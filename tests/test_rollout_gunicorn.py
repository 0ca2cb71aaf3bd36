"""Rollout control under real gunicorn (4 workers, preload_app), sync and asyncio workers.

The entries are written as the publisher writes them (``append_event`` with an audience), so
this tests the workers alone: a canary runs in the one worker it names and nowhere else; a
halt puts it back while the others acknowledge without a callback; and a canary that crashes
the worker right after it applied it (``os._exit``) does not crash-loop the pod: gunicorn's
replacement worker (a new pid, hence a new worker id outside the audience) replays the stable
version and stays up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from subscriber.protocol import Ack, WorkerState
from subscriber.testing import RedisServer, append_event, free_port
from tests.conftest import REPO, Processes
from tests.helpers import wait_until
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
CONF = REPO / "deploy" / "example" / "gunicorn.conf.py"


class Pod:
    def __init__(self, gunicorn: subprocess.Popen[bytes], url: str, port: int, log: Path):
        self.gunicorn, self.url, self.port, self.log = gunicorn, url, port, log

    def live(self) -> dict[int, WorkerState]:
        """The live workers' states by pid (stopped ones and dead pids left out)."""
        children = Path(f"/proc/{self.gunicorn.pid}/task/{self.gunicorn.pid}/children")
        pids = {int(pid) for pid in children.read_text().split()}
        states = worker_states(self.url, KEY).values()
        return {s.pid: s for s in states if s.pid in pids and s.status != "stopped"}

    def served(self) -> dict[int, dict[str, Any]]:
        """What each worker serves, once all 4 answered (the kernel spreads connections)."""

        def sample() -> dict[int, dict[str, Any]]:
            seen: dict[int, dict[str, Any]] = {}
            for _ in range(100):
                url = f"http://127.0.0.1:{self.port}/"
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
                seen.setdefault(body["pid"], body)
            return seen if len(seen) == 4 else {}

        return wait_until(sample, "every worker answering", timeout=30)


def ack_for(url: str, worker: str, entry_id: str) -> Ack | None:
    found = [a for a in acks(url, KEY) if (a.worker, a.entry_id) == (worker, entry_id)]
    return found[0] if found else None


def start_pod(
    tmp_path: Path, redis_server: RedisServer, processes: Processes, worker_class: str
) -> Pod:
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        "HOTRELOAD_REDIS_URL": redis_server.url,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "4",
        "WORKER_CLASS": worker_class,
        "CANARY_ASYNC": "1" if "uvicorn" in worker_class else "0",
        "CANARY_CRASH_FLAG": str(tmp_path / "crash"),
    }
    with log.open("wb") as fh:
        gunicorn = processes.python(
            "-m", "gunicorn", "-c", str(CONF), "--chdir", str(REPO),
            "tests.workers.canary_app:app", env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    pod = Pod(gunicorn, redis_server.url, port, log)

    def four_ready() -> bool:
        assert gunicorn.poll() is None, log.read_text()
        live = pod.live()
        return len(live) == 4 and all(s.status == "applied" and s.audience for s in live.values())

    wait_until(four_ready, "4 workers running version 1", timeout=60)
    return pod


@pytest.mark.timeout(180)
@pytest.mark.parametrize("worker_class", ["sync", "uvicorn.workers.UvicornWorker"])
def test_a_canary_reaches_one_worker_halts_and_a_crashing_canary_cannot_crash_loop_the_pod(
    worker_class: str, tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    pod = start_pod(tmp_path, redis_server, processes, worker_class)
    first = pod.live()
    canary_pid, crash_pid, *others = sorted(first)
    canary_worker = first[canary_pid].worker

    # a canary for one worker: it alone runs it; the others read past it silently
    canary = append_event(url, KEY, b"rate: 2", version=2, audience=[canary_worker])
    wait_until(lambda: ack_for(url, canary_worker, canary), "the canary worker's ack")
    served = pod.served()
    assert served[canary_pid]["text"] == "rate: 2"
    assert all(served[pid]["text"] == "rate: 1" for pid in (crash_pid, *others))
    halt = append_event(url, KEY, b"rate: 1", version=3, rollout="halt", rollout_of=2)

    def everyone_acked_the_halt() -> list[Ack]:
        found = [ack_for(url, first[pid].worker, halt) for pid in first]
        return [a for a in found if a is not None] if all(found) else []

    halt_acks = {a.worker: a for a in wait_until(everyone_acked_the_halt, "the halt acked")}
    assert not halt_acks[canary_worker].unchanged  # the canary worker reverted
    assert all(halt_acks[first[pid].worker].unchanged for pid in (crash_pid, *others))
    assert not any(ack_for(url, first[pid].worker, canary) for pid in (crash_pid, *others))
    assert all(s["text"] == "rate: 1" for s in pod.served().values())

    # a canary that kills the worker running it, right after it applied (and acked) it
    (tmp_path / "crash").write_text("1")
    crash_worker = first[crash_pid].worker
    crash = append_event(url, KEY, b"rate: CRASH", version=4, audience=[crash_worker])
    ack = wait_until(lambda: ack_for(url, crash_worker, crash), "the crashing canary applied")
    assert ack.status == "applied"

    def replaced() -> int:
        live = pod.live()
        fresh = set(live) - set(first)
        return fresh.pop() if crash_pid not in live and len(live) == 4 and fresh else 0

    new_pid = wait_until(replaced, "gunicorn replaced the crashed worker", timeout=30)
    replacement = pod.live()[new_pid]
    assert (replacement.version, replacement.status, replacement.seen) == (3, "applied", 3)
    assert ack_for(url, replacement.worker, crash) is None
    served = pod.served()
    assert all(s["text"] == "rate: 1" for s in served.values())  # the replacement: stable
    assert new_pid in served
    # no crash loop: the same four workers, gunicorn up, the crash flag still set
    assert set(pod.live()) == set(served)
    assert pod.gunicorn.poll() is None
    assert (tmp_path / "crash").exists()

    pod.gunicorn.send_signal(signal.SIGTERM)
    assert pod.gunicorn.wait(30) == 0, pod.log.read_text()
    assert os.path.exists(pod.log)
