"""One pod on this machine: a private redis-server, ``hotreload watch`` on a kubelet-style mount,
and worker processes (tests/workers/subscriber_worker.py) following one config key.

A scenario changes the config with :meth:`Pod.write` (a kubelet ``..data`` swap), injects its
fault, and then asks :meth:`Pod.reconverge` how long every live worker took to run the newest
content. :meth:`Pod.check` asserts what must hold whatever happened: no process died unless the
scenario killed it, every worker applied only contents the test wrote, never one marked invalid,
each in the order written (a worker's revision never goes back, whatever Redis went back to:
versions only go up, and workers hold that line), and the stream's versions only go up with
no content published twice in a row -- except the entries a scenario appended again on purpose
(``Pod.replayed``). A ``signed`` pod runs its daemon and workers with a signing key.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import decode_event, sha256_hex
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes
from tests.helpers import DaemonProcess, cpu_seconds, start_daemon, wait_until
from tests.workers.harness import Worker, spawn_workers, worker_states

KEY = "app.yaml"
WORKERS = 6
BLOCK_MS = 1000
# 1 s blocks and heartbeats: a frozen Redis is noticed after 1 + 3 s (the socket timeout margin)
WORKER_OPTIONS = ("--block-ms", str(BLOCK_MS), "--heartbeat", "1.0")
REJECT = "REJECT"
SIGNING_KEY = b"0f9e8d7c6b5a49382716f5e4d3c2b1a0"


def content(rev: int, *, invalid: bool = False, pad: int = 0) -> str:
    """A config whose first line names its revision; ``invalid`` marks it for the validator."""
    marker = f"note: {REJECT}\n" if invalid else ""
    return f"rev: {rev}\n{marker}" + ("x" * pad + "\n" if pad else "")


def rev_of(text: str) -> int:
    first = text.split("\n", 1)[0]
    assert first.startswith("rev: "), text[:80]
    return int(first.removeprefix("rev: "))


@dataclass
class CpuWindow:
    """CPU time (utime + stime from /proc) of the pod's processes over a wall-clock window."""

    names: dict[int, str]
    before: dict[int, float]
    began: float = field(default_factory=time.monotonic)

    def finish(self) -> dict[str, Any]:
        wall = time.monotonic() - self.began
        shares: dict[str, float] = {}
        for pid, name in self.names.items():
            try:
                shares[name] = (cpu_seconds(pid) - self.before[pid]) / wall
            except OSError:
                continue  # it ended meanwhile (a scenario that kills it)
        worker_shares = [v for k, v in shares.items() if k.startswith("worker")]
        daemon_shares = [v for k, v in shares.items() if k.startswith("daemon")]
        return {
            "window_s": round(wall, 2),
            "worker_max_pct": round(100 * max(worker_shares, default=0.0), 3),
            "workers_total_pct": round(100 * sum(worker_shares), 3),
            "daemon_pct": round(100 * sum(daemon_shares), 3),
        }


class Pod:
    def __init__(
        self,
        directory: Path,
        redis_dir: Path,
        processes: Processes,
        *,
        appendonly: bool = False,
        signed: bool = False,
    ) -> None:
        self.directory = directory
        self.processes = processes
        self.redis = RedisServer(redis_dir, appendonly=appendonly)
        self.mount = KubeletMount(directory / "config")
        self.daemons: list[DaemonProcess] = []
        self.workers: list[Worker] = []
        self.killed: set[int] = set()  # pids a scenario ended on purpose
        self.written: list[str] = []  # every content written to the mount, in order
        self.rev = 0
        self.daemon_args: tuple[str, ...] = ()  # every daemon of the pod is started with them
        self.key_file: Path | None = None  # signed: the daemon's and the workers' key
        if signed:
            self.key_file = directory / "signing.key"
            self.key_file.write_bytes(SIGNING_KEY)
        # ids of the entries a scenario appended again (old versions): not the publisher's
        self.replayed: set[str] = set()

    # -- setup --------------------------------------------------------------------------

    def start(
        self, *, workers: int = WORKERS, daemon_args: tuple[str, ...] = (), size: int = 0
    ) -> Pod:
        self.redis.start()
        self.write(pad=size)
        self.daemon_args = daemon_args
        self.start_daemon(*daemon_args)
        self.spawn(workers)
        self.reconverge(timeout=30)
        return self

    def signing(self) -> tuple[str, ...]:
        return ("--signing-key-file", str(self.key_file)) if self.key_file else ()

    def start_daemon(self, *extra: str) -> DaemonProcess:
        extra = (*self.signing(), *extra)
        daemon = start_daemon(
            self.processes, self.directory, self.redis.url, self.mount.directory, *extra,
            name=f"daemon-{len(self.daemons)}",
        )  # fmt: skip
        self.daemons.append(daemon)
        return daemon

    def spawn(self, count: int) -> list[Worker]:
        """``count`` more workers, alternately a threaded ``Subscriber`` and an
        ``AsyncSubscriber``; returns once each has started."""
        new = []
        for index in range(len(self.workers), len(self.workers) + count):
            mode = ("--async",) if index % 2 else ()
            new += spawn_workers(
                self.processes, self.redis.url, KEY, self.directory, 1, *WORKER_OPTIONS,
                *self.signing(), *mode,
            )  # fmt: skip
        for worker in new:
            outcome = worker.wait_started(timeout=30)
            assert outcome["event"] == "started", outcome
        self.workers += new
        return new

    # -- changes and faults ---------------------------------------------------------------

    def write(self, *, invalid: bool = False, pad: int = 0) -> str:
        """The next revision, swapped in as kubelet does; returns its text."""
        self.rev += 1
        text = content(self.rev, invalid=invalid, pad=pad)
        self.mount.set(KEY, text.encode())
        self.written.append(text)
        return text

    def newest_valid(self) -> str:
        return next(t for t in reversed(self.written) if REJECT not in t)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)
        self.killed.add(pid)
        for process in [w.process for w in self.workers] + [d.process for d in self.daemons]:
            if process.pid == pid and sig in {signal.SIGKILL, signal.SIGTERM}:
                process.wait(10)

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.pid not in self.killed]

    def live_daemons(self) -> list[DaemonProcess]:
        return [d for d in self.daemons if d.pid not in self.killed]

    def cpu_window(self) -> CpuWindow:
        names = {
            w.pid: f"worker-{i}" for i, w in enumerate(self.workers) if w.pid not in self.killed
        }
        names |= {
            d.pid: f"daemon-{i}" for i, d in enumerate(self.daemons) if d.pid not in self.killed
        }
        return CpuWindow(names, {pid: cpu_seconds(pid) for pid in names})

    def client(self) -> redis.Redis:
        return connect(self.redis.url, socket_timeout=5.0)

    # -- convergence -----------------------------------------------------------------------

    def converged(self, text: str | None = None) -> bool:
        wanted = text if text is not None else self.newest_valid()
        return all(w.last_applied() == wanted for w in self.live_workers())

    def reconverge(self, text: str | None = None, timeout: float = 20.0) -> float:
        """Seconds until every live worker applied ``text`` (default: the newest valid one),
        then until :workers shows it too (what ``hotreload wait`` reads)."""
        wanted = text if text is not None else self.newest_valid()
        began = time.monotonic()
        try:
            wait_until(lambda: self.converged(wanted), f"every worker on {wanted[:20]!r}", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None
        elapsed = time.monotonic() - began
        digest = sha256_hex(wanted.encode())
        pids = {w.pid for w in self.live_workers()}

        def reported() -> bool:
            states = {s.pid: s for s in worker_states(self.redis.url, KEY).values()}
            return all(p in states and states[p].sha256 == digest for p in pids)

        wait_until(reported, "every worker reports it in :workers", 10)
        return elapsed

    def readopted(self, above: int, timeout: float = 30.0) -> float:
        """Seconds until every live worker reports in :workers that it runs the newest valid
        content, applied (not holding), at a version above ``above``: the stream went behind
        the workers (or had an old entry appended) with no change to the mount, so each
        worker already runs that content and adopts the version published above it."""
        digest = sha256_hex(self.newest_valid().encode())
        pids = {w.pid for w in self.live_workers()}

        def adopted() -> bool:
            try:
                states = {s.pid: s for s in worker_states(self.redis.url, KEY).values()}
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                return False
            return all(
                p in states
                and (states[p].status, states[p].sha256) == ("applied", digest)
                and states[p].version > above
                for p in pids
            )

        began = time.monotonic()
        try:
            wait_until(adopted, f"every worker applied above v{above}", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None
        return time.monotonic() - began

    def highest_version(self) -> int:
        return max((int(f[b"version"]) for _, f in self.stream()), default=0)

    def diagnose(self) -> str:
        lines = [f"written: {[rev_of(t) for t in self.written]}"]
        for i, w in enumerate(self.workers):
            applied = [rev_of(t) for t in w.applied()]
            lines.append(f"worker-{i} pid {w.pid} rc={w.process.poll()} applied={applied}")
            lines.append("  log tail: " + " | ".join(w.log().splitlines()[-5:]))
        for i, d in enumerate(self.daemons):
            lines.append(f"daemon-{i} pid {d.pid} rc={d.process.poll()}")
            lines.append("  log tail: " + " | ".join(d.output().splitlines()[-12:]))
        return "\n".join(lines)

    # -- what must hold whatever the fault -------------------------------------------------

    def stream(self) -> list[tuple[str, dict[bytes, bytes]]]:
        client = self.client()
        try:
            raw = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                client.xrange(stream_keys(KEY).events),
            )
        finally:
            client.close()
        return [(i.decode(), f) for i, f in raw]

    def check(self) -> dict[str, int]:
        """Assert the invariants; returns counts for the report."""
        for worker in self.workers:
            if worker.pid not in self.killed:
                assert worker.process.poll() is None, f"worker {worker.pid} died\n{self.diagnose()}"
        for daemon in self.daemons:
            if daemon.pid not in self.killed:
                assert daemon.process.poll() is None, f"daemon {daemon.pid} died\n{daemon.output()}"
                assert "Traceback" not in daemon.output(), daemon.output()
        assert self.redis.process is not None
        assert self.redis.process.poll() is None
        written = set(self.written)
        applied_total = 0
        for worker in self.workers:
            rows = worker.lines("applied")
            applied_total += len(rows)
            revs = []
            for row in rows:
                text = row["text"]
                assert text in written, f"worker {worker.pid} applied unknown content {text!r}"
                assert REJECT not in text, f"worker {worker.pid} applied rejected content"
                assert row["sha256"] == sha256_hex(text.encode())
                revs.append(rev_of(text))
            # one process never goes back to an older revision, nor applies one twice, even
            # when Redis went back to older data or an old entry was appended again
            assert revs == sorted(set(revs)), f"worker {worker.pid} applied revisions {revs}"
            assert "Traceback" not in worker.log(), worker.log()
        entries = self.stream()
        versions = [int(f[b"version"]) for i, f in entries if i not in self.replayed]
        assert versions == sorted(set(versions)), f"versions not strictly increasing: {versions}"
        hashes = [f[b"sha256"] for _, f in entries]
        assert all(a != b for a, b in itertools.pairwise(hashes)), (
            "same content twice: "
            + ", ".join(
                f"v{f[b'version'].decode()} {f[b'sha256'][:8].decode()} "
                f"{f.get(b'publisher', b'?').decode()}"
                for _, f in entries
            )
            + "".join(f"\n--- daemon {d.pid}\n{d.output()}" for d in self.daemons)
        )
        for entry_id, fields in entries:
            event = decode_event(entry_id, fields)  # verifies the hash
            assert event.content.decode() in written
        return {"applied_total": applied_total, "stream_entries": len(entries)}
