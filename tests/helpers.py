"""Plain helpers shared by tests (fixtures are in conftest.py): polling waits, sync and
async; the app callback most tests hand a subscriber; ``hotreload watch`` as a process;
reading the events stream; a slow link to a Redis.

One copy of each, so that a change of how the daemon is started or how long a wait may take
is made once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Event, decode_event, sign, signing_key

if TYPE_CHECKING:
    from publisher.daemon import Daemon
    from subscriber.testing import RedisServer
    from tests.conftest import Processes

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    what: str = "",
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy (and return that); fail after
    ``timeout`` seconds, naming ``what`` (or the predicate)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(interval)


def settles(read: Callable[[], T], expected: object, timeout: float = 10.0) -> T:
    """Poll ``read()`` until it equals ``expected`` and return it; after ``timeout`` seconds
    return the last reading, for the caller's ``assert`` to show the difference. For what a
    worker reports to Redis: acks and states go on the round trip after the callback
    returned, so an in-process ``version`` moves first (reading them at once is a race)."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


async def eventually(predicate: Callable[[], T | None], what: str = "", timeout: float = 10.0) -> T:
    """``wait_until`` inside an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        await asyncio.sleep(0.02)


class Recorder:
    """An app callback: refuses content containing ``REJECT`` (``ValueError(reason)``),
    records the rest, and the thread and asyncio task each call ran in; fails if it is ever
    re-entered (callbacks of one subscriber never run concurrently)."""

    def __init__(self, reason: str = "rate must be a positive integer") -> None:
        self.reason = reason
        self.applied: list[str] = []
        self.threads: set[str] = set()
        self.tasks: set[str] = set()
        self._inside = False

    def __call__(self, text: str) -> None:
        assert not self._inside, "callbacks ran concurrently"
        self._inside = True
        try:
            self.threads.add(threading.current_thread().name)
            try:
                task = asyncio.current_task()
            except RuntimeError:  # no running loop: a thread's callback
                task = None
            self.tasks.add(task.get_name() if task else "")
            if "REJECT" in text:
                raise ValueError(self.reason)
            self.applied.append(text)
        finally:
            self._inside = False


@dataclass
class DaemonProcess:
    """A ``hotreload watch`` process and the file its output goes to."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a clean stop) and return the exit code."""
        self.process.send_signal(sig)
        return self.process.wait(10)


def start_daemon(
    processes: Processes,
    log_dir: Path,
    url: str,
    *args: str | Path,
    name: str = "daemon",
    metrics_port: int = 0,
    env: dict[str, str] | None = None,
    log_level: str = "DEBUG",
) -> DaemonProcess:
    """``hotreload watch *args --redis url`` (paths and options in ``args``), logging at
    ``log_level``, its output appended to ``log_dir/<name>.log`` (a restart under the same
    name logs after the previous daemon's lines). ``metrics_port`` 0 turns the metrics server
    off; give a free port where a test reads /metrics or the ack follower must run (never
    the default 9102, which another test's daemon may hold)."""
    log = log_dir / f"{name}.log"
    with log.open("ab") as fh:
        process = processes.python(
            "-m", "publisher", "watch", *map(str, args),
            "--redis", url, "--metrics-port", str(metrics_port), "--log-level", log_level,
            stdout=fh, stderr=subprocess.STDOUT, env=env or {},
        )  # fmt: skip
    return DaemonProcess(process, log)


def events(client: redis.Redis, key: str, prefix: str = "hotreload") -> list[Event]:
    """Every entry of ``key``'s events stream, decoded and hash-verified."""
    raw = cast(
        list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys(key, prefix).events)
    )
    return [decode_event(i, f) for i, f in raw]


HOUR_MS = 3_600_000


def published_long_ago(
    fields: dict[bytes, bytes], *, secret: bytes | str | None = None, age_ms: int = HOUR_MS
) -> dict[bytes, bytes]:
    """An entry's fields (as ``XRANGE`` returns them) as if it had been published ``age_ms``
    earlier: what an old entry appended again looks like. A worker tells such a replay by
    its stream id being far after its ``published_at``; an entry appended again seconds
    after it was signed is, to a fresh worker, the original. A signed entry is signed again
    (the tests hold the key: ``secret``) for its older ``published_at``."""
    published_at = int(fields[b"published_at"]) - age_ms
    aged = {**fields, b"published_at": str(published_at).encode()}
    if fields.get(b"sig"):
        if secret is None:
            raise ValueError("the entry is signed: give the signing key to sign it again")
        aged[b"sig"] = sign(
            signing_key(secret),
            fields[b"key"].decode(),
            int(fields[b"version"]),
            fields[b"sha256"].decode(),
            published_at,
        ).encode()
    return aged


def has_events(client: redis.Redis, key: str, count: int) -> Callable[[], bool]:
    """A predicate for ``wait_until``: ``key`` has exactly ``count`` entries."""
    return lambda: len(events(client, key)) == count


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks -> seconds)."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def race_publishers(url: str, contents: list[bytes], racers: int = 4, **options: Any) -> None:
    """``racers`` publishers (as that many pods would) publish ``contents`` to ``app.yaml``,
    each content at the same moment (a barrier), each with its own connection."""
    import threading

    from publisher.publish import Publisher

    barrier = threading.Barrier(racers)
    errors: list[BaseException] = []

    def run() -> None:
        client = connect(url, socket_timeout=5)
        publisher = Publisher(client, history=1000, **options)
        try:
            for content in contents:
                barrier.wait(10)
                publisher.publish("app.yaml", content)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=run) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


def start_redis_without_probe(server: RedisServer, url: str) -> subprocess.Popen[bytes]:
    """Start ``server`` and wait until ``url`` (its credentials included) answers a PING --
    not ``server.start()``, whose readiness probe has no password, for a server whose
    default user is off. A server that never answers is stopped here, by its PID."""
    process = subprocess.Popen(server._args(), stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _pings(url), timeout=10)
    except BaseException:
        process.kill()
        process.wait(5)
        raise
    return process


def _pings(url: str) -> bool:
    try:
        probe = connect(url, socket_timeout=1)
    except redis.RedisError:
        return False
    try:
        return bool(probe.ping())
    except redis.RedisError:
        return False
    finally:
        probe.close()


LOOP = "the-loop"  # the name of ``running``'s thread


@contextmanager
def running(daemon: Daemon) -> Iterator[threading.Thread]:
    """``daemon.run()`` on a thread named ``LOOP``; stopped and joined on the way out."""
    loop = threading.Thread(target=daemon.run, name=LOOP, daemon=True)
    loop.start()
    try:
        yield loop
    finally:
        daemon.request_stop()
        loop.join(15)
        assert not loop.is_alive()


@contextmanager
def slow_link(
    server: RedisServer, rate: float, flowing: threading.Event | None = None
) -> Iterator[str]:
    """A unix socket (its URL yielded) in front of ``server``'s that passes Redis's replies on
    at ``rate`` bytes a second: a reply that keeps arriving, from a Redis that is not frozen.
    ``flowing``: replies pass only while it is set (cleared: a reply stalled part way)."""
    path = str(server.directory / "slow.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    links: list[socket.socket] = []

    def pump(source: socket.socket, sink: socket.socket, rate: float) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if flowing is not None and rate < 1e12:
                    flowing.wait()
                sink.sendall(data)
                time.sleep(len(data) / rate)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with suppress(OSError):
            while True:
                near, _ = listener.accept()
                far = socket.socket(socket.AF_UNIX)
                far.connect(server.socket_path)
                links.extend((near, far))
                for ends in ((near, far, 1e12), (far, near, rate)):
                    threading.Thread(target=pump, args=ends, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"unix://{path}"
    finally:
        if flowing is not None:
            flowing.set()  # a pump waiting on it ends
        for end in (listener, *links):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@dataclass
class LostAnswer:
    """What ``lost_answer_link`` yields: its ``url``; ``answered``, set once Redis answered a
    request carrying ``marker`` (it ran it) and the answer is held, to be dropped. Clearing
    it (with another ``marker``, say) drops the next such answer too."""

    url: str
    answered: threading.Event
    marker: bytes

    def reachable(self, yes: bool) -> None:
        """``False``: a new connection fails connecting, as to a dead Redis (not accepted and
        closed by the relay): the socket's path is renamed away; ``True``: back."""
        path = self.url.removeprefix("unix://")
        os.rename(*((path + ".away", path) if yes else (path, path + ".away")))


@contextmanager
def lost_answer_link(
    server: RedisServer, marker: bytes, release: threading.Event | None = None
) -> Iterator[LostAnswer]:
    """A unix socket in front of ``server``'s that passes everything, except Redis's answer to
    the first request carrying ``marker`` (e.g. a content the publish script is given): that
    request reaches Redis and runs, its answer is held until ``release`` is set (so that a
    test may kill Redis meanwhile, the command run and the client still waiting; None: not
    held), then dropped, both sockets of that connection closed: the client gets a
    ``ConnectionError`` where the answer should be, as from a Redis SIGKILLed right after it
    ran the command."""
    path = str(server.directory / "lost.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    links: list[socket.socket] = []
    lost = LostAnswer(f"unix://{path}", threading.Event(), marker)
    marked: set[socket.socket] = set()  # the connections whose next answer is dropped

    def requests(near: socket.socket, far: socket.socket) -> None:
        with suppress(OSError):
            while data := near.recv(65536):
                if lost.marker in data and not lost.answered.is_set():
                    marked.add(near)
                far.sendall(data)
        with suppress(OSError):
            far.shutdown(socket.SHUT_WR)

    def answers(near: socket.socket, far: socket.socket) -> None:
        with suppress(OSError):
            while data := far.recv(65536):
                if near in marked:
                    lost.answered.set()
                    if release is not None:
                        release.wait()
                    for end in (near, far):  # the answer goes nowhere
                        end.shutdown(socket.SHUT_RDWR)
                    return
                near.sendall(data)
        with suppress(OSError):
            near.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with suppress(OSError):
            while True:
                near, _ = listener.accept()
                far = socket.socket(socket.AF_UNIX)
                links.extend((near, far))
                try:
                    far.connect(server.socket_path)
                except OSError:  # Redis is down: so is this connection
                    near.close()
                    continue
                threading.Thread(target=requests, args=(near, far), daemon=True).start()
                threading.Thread(target=answers, args=(near, far), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield lost
    finally:
        if release is not None:
            release.set()  # a held answer ends
        for end in (listener, *links):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with suppress(OSError):
            os.unlink(path)
