"""Drives worker processes (``subscriber_worker.py``) and reads what Redis shows about them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, decode_ack, decode_worker_state, sha256_hex
from tests.helpers import wait_until

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    from tests.conftest import Processes

T = TypeVar("T")


@dataclass
class Worker:
    """One running ``subscriber_worker`` process and the file it records into."""

    process: subprocess.Popen[bytes]
    out: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        # the worker may be appending a long line right now: only complete lines count
        complete = self.out.read_text().split("\n")[:-1]
        rows = [json.loads(line) for line in complete if line]
        return [r for r in rows if event is None or r["event"] == event]

    def applied(self) -> list[str]:
        return [r["text"] for r in self.lines("applied")]

    def last_applied(self) -> str | None:
        texts = self.applied()
        return texts[-1] if texts else None

    def log(self) -> str:
        path = Path(str(self.out) + ".log")
        return path.read_text() if path.exists() else ""

    def wait_started(self, timeout: float = 15.0) -> dict[str, Any]:
        def outcome() -> dict[str, Any] | None:
            rows = self.lines("started") + self.lines("failed")
            if not rows and self.process.poll() is not None:
                raise AssertionError(f"worker {self.pid} exited early: {self.log()}")
            return rows[0] if rows else None

        return wait_until(outcome, f"worker {self.pid} started", timeout)


def spawn_workers(
    processes: Processes, url: str, key: str, directory: Path, count: int, *extra: str
) -> list[Worker]:
    """Start ``count`` workers at once (they start in parallel); returns without waiting."""
    workers = []
    for index in range(count):
        out = directory / f"worker-{index}-{time.monotonic_ns()}.jsonl"
        argv = ["-m", "tests.workers.subscriber_worker", "--url", url, "--key", key]
        process = processes.python(*argv, "--out", str(out), *extra)
        workers.append(Worker(process, out))
    return workers


def worker_states(url: str, key: str) -> dict[str, WorkerState]:
    client = connect(url, socket_timeout=5.0)
    try:
        raw = cast("dict[bytes, bytes]", client.hgetall(stream_keys(key).workers))
    finally:
        client.close()
    return {name.decode(): decode_worker_state(value) for name, value in raw.items()}


def acks(url: str, key: str) -> list[Ack]:
    client = connect(url, socket_timeout=5.0)
    try:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(stream_keys(key).acks)
        )
    finally:
        client.close()
    return [decode_ack(fields) for _, fields in entries]


def state_of(worker: Worker, url: str, key: str) -> WorkerState | None:
    for state in worker_states(url, key).values():
        if state.pid == worker.pid:
            return state
    return None


def wait_converged(
    states: Callable[[], dict[str, WorkerState]],
    workers: list[Worker],
    text: str | bytes,
    version: int,
    timeout: float = 15.0,
) -> None:
    """Every one of ``workers`` reports (in :workers, as ``states()`` reads it) that it runs
    ``text`` as ``version``."""
    content = text.encode() if isinstance(text, str) else text
    wanted = (version, sha256_hex(content))
    pids = {worker.pid for worker in workers}

    def converged() -> bool:
        by_pid = {state.pid: state for state in states().values()}
        return all(p in by_pid and (by_pid[p].version, by_pid[p].sha256) == wanted for p in pids)

    wait_until(converged, f"{len(workers)} workers on version {version}", timeout)
