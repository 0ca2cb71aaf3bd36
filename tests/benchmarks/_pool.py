"""A pool of worker processes forked from one preloaded parent, like gunicorn's preload_app.

    python -m tests.benchmarks._pool KIND --count N --url URL --key KEY [--per M] ...

The parent imports what the workers need once, then forks ``N`` workers (so starting 128 of
them costs 128 forks, not 128 imports of redis-py) and waits; SIGTERM to the parent stops every
worker by PID and then the parent. Workers die with the parent (PR_SET_PDEATHSIG), and the
parent dies with the benchmark.

Kinds:

- ``sub``: one threaded ``Subscriber`` per process (default settings unless given).
- ``floor``: the least code doing a worker's job: a raw ``XREAD BLOCK`` loop that verifies
  the SHA-256 of each entry's content and decodes it, nothing else (no acks, no heartbeat).
- ``async-sub``: ``--per`` ``AsyncSubscriber`` objects in one event loop per process.
- ``async-floor``: ``--per`` raw ``redis.asyncio`` ``XREAD BLOCK`` loops per process.

Reports (one line each, to the fd in ``$HR_BENCH_FD``, CLOCK_MONOTONIC ns):

- ``R <index> <pid> <starttime>`` once the worker has its initial config;
- ``A <seq> <index> <t_ns>`` when the callback for update ``seq`` returned (async kinds:
  when the last of the process's ``--per`` callbacks for it returned).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import os
import signal
import sys
import time
from typing import Any, cast

from tests.benchmarks._common import REPORT_FD_ENV, report, seq_of, start_time

PR_SET_PDEATHSIG = 1
Entries = list[tuple[bytes, dict[bytes, bytes]]]
XreadReply = list[tuple[bytes, Entries]]


def die_with_parent(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sub", "floor", "async-sub", "async-floor"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--per", type=int, default=1)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--stream", default="", help="floor: the stream (default: KEY)")
    parser.add_argument("--block-ms", type=int, default=5000)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    return parser.parse_args(argv)


# -- threaded kinds ------------------------------------------------------------------------


def run_sub(args: argparse.Namespace, index: int, fd: int) -> None:
    from subscriber import Subscriber

    def apply(text: str) -> None:
        report(fd, "A", seq_of(text), index, time.monotonic_ns())

    # blocked before the subscriber's thread exists, so only sigwait below receives them
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sub = Subscriber(
        args.key,
        apply,
        redis_url=args.url,
        worker_id=f"bench-{index}",
        block_ms=args.block_ms,
        heartbeat_interval=args.heartbeat,
        start_timeout=60,
    )
    sub.start()
    report(fd, "R", index, os.getpid(), start_time(os.getpid()))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sub.stop()


def run_floor(args: argparse.Namespace, index: int, fd: int) -> None:
    import redis

    stream = args.stream or args.key
    client = redis.Redis.from_url(args.url, socket_timeout=args.block_ms / 1000 + 3)

    def apply(fields: dict[bytes, bytes]) -> str:
        data = fields[b"content"]
        if hashlib.sha256(data).hexdigest().encode() != fields[b"sha256"]:
            raise ValueError("checksum mismatch")
        return data.decode()

    newest = cast("Entries", client.xrevrange(stream, count=1))
    last = newest[0][0]
    apply(newest[0][1])
    report(fd, "R", index, os.getpid(), start_time(os.getpid()))
    while True:
        reply = cast("XreadReply", client.xread({stream: last}, count=8, block=args.block_ms))
        if not reply:
            continue
        entry_id, fields = reply[0][1][-1]
        text = apply(fields)
        report(fd, "A", seq_of(text), index, time.monotonic_ns())
        last = entry_id


# -- asyncio kinds -------------------------------------------------------------------------


class Tally:
    """Counts the callbacks of one process per update; reports when all ``per`` are in."""

    def __init__(self, fd: int, index: int, per: int) -> None:
        self.fd, self.index, self.per = fd, index, per
        self.counts: dict[int, int] = {}

    def applied(self, text: str) -> None:
        seq = seq_of(text)
        count = self.counts.get(seq, 0) + 1
        self.counts[seq] = count
        if count == self.per:
            report(self.fd, "A", seq, self.index, time.monotonic_ns())
            del self.counts[seq]


async def run_async_sub(args: argparse.Namespace, index: int, fd: int) -> None:
    from subscriber import AsyncSubscriber

    tally = Tally(fd, index, args.per)
    subs = [
        AsyncSubscriber(
            args.key,
            tally.applied,
            redis_url=args.url,
            worker_id=f"bench-{index}-{j}",
            block_ms=args.block_ms,
            heartbeat_interval=args.heartbeat,
            start_timeout=120,
        )
        for j in range(args.per)
    ]
    gate = asyncio.Semaphore(32)  # bounded concurrent connects: no SYN/accept storms

    async def start(sub: AsyncSubscriber) -> None:
        async with gate:
            await sub.start()

    await asyncio.gather(*(start(s) for s in subs))
    report(fd, "R", index, os.getpid(), start_time(os.getpid()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(s.stop() for s in subs))


async def run_async_floor(args: argparse.Namespace, index: int, fd: int) -> None:
    import redis.asyncio

    stream = args.stream or args.key
    tally = Tally(fd, index, args.per)

    def verified(fields: dict[bytes, bytes]) -> str:
        data = fields[b"content"]
        if hashlib.sha256(data).hexdigest().encode() != fields[b"sha256"]:
            raise ValueError("checksum mismatch")
        return data.decode()

    async def follow(ready: asyncio.Event, started: list[int]) -> None:
        client = redis.asyncio.Redis.from_url(args.url, socket_timeout=args.block_ms / 1000 + 3)
        try:
            newest = cast("Entries", await client.xrevrange(stream, count=1))
            last = newest[0][0]
            verified(newest[0][1])
            started.append(1)
            if len(started) == args.per:
                ready.set()
            while True:
                reply = cast(
                    "XreadReply", await client.xread({stream: last}, count=8, block=args.block_ms)
                )
                if reply:
                    last, fields = reply[0][1][-1]
                    tally.applied(verified(fields))
        finally:
            await client.aclose()

    ready = asyncio.Event()
    started: list[int] = []
    tasks = [asyncio.create_task(follow(ready, started)) for _ in range(args.per)]
    await ready.wait()
    report(fd, "R", index, os.getpid(), start_time(os.getpid()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the parent ----------------------------------------------------------------------------


def child(args: argparse.Namespace, index: int, fd: int) -> None:
    die_with_parent(signal.SIGKILL)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if args.kind == "sub":
        run_sub(args, index, fd)
    elif args.kind == "floor":
        run_floor(args, index, fd)
    elif args.kind == "async-sub":
        asyncio.run(run_async_sub(args, index, fd))
    else:
        asyncio.run(run_async_floor(args, index, fd))


def preload(kind: str) -> None:
    """Import in the parent what every worker needs (shared copy-on-write after fork)."""
    import redis

    if kind in ("sub", "async-sub"):
        import subscriber  # noqa: F401
    if kind.startswith("async"):
        import redis.asyncio  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    fd = int(os.environ[REPORT_FD_ENV])
    die_with_parent(signal.SIGTERM)
    preload(args.kind)
    pids: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        remaining = set(pids)
        while remaining and time.monotonic() < deadline:
            for pid in list(remaining):
                with contextlib.suppress(ChildProcessError):
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if not done:
                        continue
                remaining.discard(pid)
            time.sleep(0.01)
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(args.count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(args, index, fd)
            except BaseException as exc:
                print(f"worker {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    while True:
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
