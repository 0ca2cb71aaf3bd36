"""What one oversized Redis reply costs a reader (issue 23, the reader-side memory bound).

Whoever may ``XADD`` to ``:events`` or ``HSET`` ``:workers`` decides how long a bulk string
Redis sends; every connection hotreload makes reads with ``subscriber._replycap``'s parser,
which drops a bulk string over ``REPLY_CAP`` as it arrives (an ``Oversized`` marker takes its
place) and keeps the connection usable: sync and asyncio, over a unix socket, TLS, Sentinel
and Redis Cluster; a reply cut short and then interrupted is never parsed again. Real
processes, real redis-server, peak RSS from ``/proc/PID/status`` (VmHWM). Measured on this
machine (2 shared cores, redis-server 7.0.15, redis-py 8.2.0, unix socket), before -> after:

- one 100 MB entry, a process with 4 threaded ``Subscriber``s: 35 -> 607..705 MiB peak
  before (3 runs), 35 -> 35 MiB now; 4 ``AsyncSubscriber``s: 34 -> 608 before, 34 -> 36 now;
  the entry is acked as malformed ("entry is 100000131 bytes, over the 1064448 limit") and
  version 3 applied;
- ``hotreload history`` over that stream: 322 MiB before, 35 MiB now;
- one 50 MiB ``:workers`` value: ``hotreload status`` 186 MiB before, 35 MiB now; the daemon
  reading it for a publish: 39 -> 189 MiB before, 39 -> 39 MiB now.

With the 64 MB entry used here (to keep it quick) the tests fail without the cap: the worker
peaked at 484 (threaded) / 420 MiB (asyncio), ``history`` at 227 MiB, ``status`` at 186 MiB.
The same tests pass with redis-py 8.0.1 (the oldest admitted; ``make test-oldest``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio

from publisher._admin import connect_any
from publisher.publish import Publisher
from subscriber._redis import connect, connect_async, reply_parser
from subscriber._replycap import (
    REPLY_CAP,
    CappedParser,
    Oversized,
    _CappedBuffer,
)
from subscriber.keys import stream_keys
from subscriber.protocol import MAX_CONTENT_BYTES, MAX_ENTRY_BYTES, decode_event
from subscriber.testing import RedisCluster, RedisServer, append_event, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, settles, slow_link, start_daemon, wait_until
from tests.test_sentinel import SentinelSetup, sentinel  # noqa: F401  (a fixture)
from tests.test_tls import TlsRedis, pki, tls_redis  # noqa: F401  (fixtures)

MiB = 1024 * 1024
KEY = "app.yaml"
KEYS = stream_keys(KEY)
HUGE = 64 * MiB  # an entry a hostile writer appends (100 MB measured by hand: the same)
# What reading one such reply may add to a process's peak RSS: before the cap it added about
# three times its size (the socket buffer, the copies ``SocketBuffer.read`` makes).
BOUND_MIB = 16


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)


def peak_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def hostile_entry(client: redis.Redis, version: int, size: int = HUGE) -> None:
    """An entry whose content is ``size`` bytes, XADDed as anyone who may write the stream."""
    fields = {"schema": 1, "key": KEY, "version": version, "sha256": "0" * 64,
              "content": b"x" * size, "published_at": 1, "publisher": "evil:1"}  # fmt: skip
    client.xadd(KEYS.events, fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the parser on its own
def test_the_cap_cuts_nothing_legitimate() -> None:
    """No legitimate bulk string is longer than a whole entry may be: a content (a snapshot
    is one) at most ``MAX_CONTENT_BYTES``, a worker state 16 KiB."""
    assert REPLY_CAP == MAX_ENTRY_BYTES > MAX_CONTENT_BYTES
    marker = Oversized(5 * MiB)
    assert isinstance(marker, bytes)
    assert len(marker) == 5 * MiB
    assert (
        bytes(marker) == f"<5242880 bytes, over the {REPLY_CAP}-byte reply cap: not read>".encode()
    )
    assert str(marker) == repr(marker) == bytes(marker).decode()


def test_an_oversized_value_is_dropped_and_the_connection_stays_usable(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    largest = os.urandom(REPLY_CAP)
    client.set("largest", largest)
    client.set("over", b"y" * (REPLY_CAP + 1))
    client.set("huge", b"z" * (20 * MiB))
    pipe = client.pipeline(transaction=False)
    for name in ("largest", "over", "huge", "missing"):
        pipe.get(name)
    pipe.ping()
    got, over, huge, missing, pong = pipe.execute()
    assert got == largest  # a bulk string at the cap is read whole
    assert isinstance(over, Oversized)
    assert len(over) == REPLY_CAP + 1
    assert isinstance(huge, Oversized)
    assert len(huge) == 20 * MiB
    assert (missing, pong) == (None, True)
    assert client.get("largest") == largest  # the same connection, still in step
    # an entry's other fields arrive as they are; the entry is refused with its true size
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    hostile_entry(client, 2, 3 * MiB)
    (_, fields), *_ = cast(Any, client.xrevrange(KEYS.events, count=1))
    assert fields[b"publisher"] == b"evil:1"
    assert isinstance(fields[b"content"], Oversized)
    with pytest.raises(Exception, match=f"over the {MAX_ENTRY_BYTES} limit"):
        decode_event("2-0", fields)


def test_the_asyncio_parser_drops_it_too(redis_server: RedisServer, client: redis.Redis) -> None:
    client.set("huge", b"z" * (20 * MiB))
    client.set("small", b"s")

    async def read() -> list[object]:
        aclient = connect_async(redis_server.url, socket_timeout=5)
        try:
            return [await aclient.get(name) for name in ("huge", "small", "huge", "small")]
        finally:
            await aclient.aclose()

    huge, small, again, small_again = asyncio.run(read())
    assert isinstance(huge, Oversized)
    assert len(huge) == 20 * MiB
    assert isinstance(again, Oversized)
    assert small == small_again == b"s"


def test_a_reply_cut_short_then_interrupted_is_never_read_again() -> None:
    """redis-py rewinds a reply that failed part way to read it again; after bytes were
    dropped that would misparse, so the buffer says the stream is lost instead."""
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(0.3)  # as redis-py sets it: socket_timeout
        buffer = _CappedBuffer(ours, 65536, 0.3)
        total = 3 * MiB
        sender = threading.Thread(target=theirs.sendall, args=(b"q" * (total // 2),))
        sender.start()
        with pytest.raises(redis.TimeoutError):  # half of it came, then nothing
            buffer.read(total)
        sender.join()
        buffer.rewind(0)
        with pytest.raises(redis.ConnectionError, match="cut short"):
            buffer.readline()
        assert buffer.can_read()  # "has data": a pool replaces the connection
        buffer.close()
    finally:
        ours.close()
        theirs.close()


def test_an_asyncio_reply_cut_short_then_cancelled_is_never_parsed_again() -> None:
    """redis-py parses a cancelled asyncio reply again from the bytes it kept; after bytes
    were dropped that would misparse, so the parser refuses and the connection is replaced."""

    async def cut_then_cancel() -> None:
        connection = redis.asyncio.Connection()  # never connected: its stream is ours
        reader = asyncio.StreamReader()
        connection._reader = reader
        parser = reply_parser(aio=True)(socket_read_size=65536)
        parser.on_connect(connection)
        reader.feed_data(b"$%d\r\n" % (3 * MiB) + b"q" * MiB)  # a third of it, then nothing
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(parser.read_response(), 0.2)
        reader.feed_data(b"q" * (2 * MiB) + b"\r\n+OK\r\n")
        with pytest.raises(redis.ConnectionError, match="cut short"):
            await asyncio.wait_for(parser.read_response(), 2)

    asyncio.run(cut_then_cancel())


def test_an_asyncio_value_read_in_chunks_then_cancelled_is_read_whole_again() -> None:
    """A bulk string under the cap but over 64 KiB is read a chunk at a time (progress per
    chunk, ``_aioreplycap``), each kept as redis-py keeps what it read: a read cancelled part
    way is parsed again from them, and the value comes whole."""

    async def chunks_then_cancel() -> tuple[object, object]:
        connection = redis.asyncio.Connection()  # never connected: its stream is ours
        reader = asyncio.StreamReader()
        connection._reader = reader
        parser = reply_parser(aio=True)(socket_read_size=65536)
        parser.on_connect(connection)
        value = os.urandom(300_000)
        reader.feed_data(b"*2\r\n$%d\r\n" % len(value) + value[:200_000])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(parser.read_response(), 0.2)
        assert parser.progress > 0
        reader.feed_data(value[200_000:] + b"\r\n+OK\r\n")
        reply = await asyncio.wait_for(parser.read_response(), 2)
        return reply == [value, b"OK"], await asyncio.wait_for(parser.can_read(), 1)

    assert asyncio.run(chunks_then_cancel()) == (True, False)


def test_the_cluster_client_reads_with_the_cap_on_every_node(
    redis_cluster_module: RedisCluster,
) -> None:
    client = connect_any(redis_cluster_module.url, socket_timeout=5)
    try:
        assert isinstance(client, redis.RedisCluster)
        client.set(f"{{{KEY}}}:huge", b"z" * (5 * MiB))
        assert isinstance(client.get(f"{{{KEY}}}:huge"), Oversized)
        assert client.set(f"{{{KEY}}}:small", b"s")
        assert client.get(f"{{{KEY}}}:small") == b"s"
        for node in cast(Any, client).get_nodes():
            pool = node.redis_connection.connection_pool
            assert pool.connection_kwargs["parser_class"] is CappedParser
    finally:
        client.close()


def test_tls_connections_read_with_the_cap(tls_redis: TlsRedis) -> None:  # noqa: F811
    url = tls_redis.url()
    client = connect(url, socket_timeout=5)

    async def read_async() -> list[object]:
        aclient = connect_async(url, socket_timeout=5)
        try:
            return [await aclient.get(name) for name in ("huge", "small")]
        finally:
            await aclient.aclose()

    try:
        client.set("huge", b"z" * (5 * MiB))
        client.set("small", b"s")
        assert [type(client.get("huge")), client.get("small")] == [Oversized, b"s"]
        huge, small = asyncio.run(read_async())
        assert isinstance(huge, Oversized)
        assert small == b"s"
    finally:
        client.close()


def test_the_sentinel_master_client_reads_with_the_cap(
    sentinel: SentinelSetup,  # noqa: F811
) -> None:
    client = connect_any(sentinel.url, socket_timeout=5)
    try:
        client.set("huge", b"z" * (5 * MiB))
        client.set("small", b"s")
        assert [type(client.get("huge")), client.get("small")] == [Oversized, b"s"]
    finally:
        client.close()


# ------------------------------------------------------------------------ real processes
WORKER = """
import asyncio, json, sys, time
from subscriber import AsyncSubscriber, Subscriber

url, key = sys.argv[1], sys.argv[2]
kind, _, own = sys.argv[5].partition("-")  # "asyncio-unshared": AsyncSubscriber(shared=False)
count, want, shared = int(sys.argv[3]), int(sys.argv[4]), not own


def peak():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def report(subs, ready):
    print(json.dumps({"ready": ready, "peak": peak(), "versions": [s.version for s in subs],
                      "errors": [s.error_count for s in subs]}), flush=True)


def follow(subs):
    deadline = time.monotonic() + 60
    while any(s.version < want for s in subs) and time.monotonic() < deadline:
        yield


if kind == "threaded":
    subs = [Subscriber(key, lambda _t: None, redis_url=url, worker_id=f"w:{n}", block_ms=300,
                       shared=shared) for n in range(count)]
    for s in subs:
        s.start()
    ready = peak()
    print("ready", flush=True)
    for _ in follow(subs):
        time.sleep(0.01)
    report(subs, ready)
    for s in subs:
        s.stop()
else:
    async def main():
        subs = [AsyncSubscriber(key, lambda _t: None, redis_url=url, worker_id=f"w:{n}",
                                block_ms=300, shared=shared) for n in range(count)]
        for s in subs:
            await s.start()
        ready = peak()
        print("ready", flush=True)
        for _ in follow(subs):
            await asyncio.sleep(0.01)
        report(subs, ready)
        for s in subs:
            await s.stop()
    asyncio.run(main())
"""
# Each a worker process of 4 subscribers: the process's hub, the loop's hub, and each
# subscriber on a connection (and a thread or task) of its own (``shared=False``).
KINDS = ["threaded", "asyncio", "threaded-unshared", "asyncio-unshared"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_entry_costs_a_worker_nothing_and_the_next_one_applies(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    result, rejected = worker_meets(kind, redis_server, client, processes, hostile_entry)
    print(f"{kind}: {HUGE} B entry: ready {result['ready']:.0f} MiB, peak {result['peak']:.0f} MiB")
    refused_by_all(result, rejected, f"bytes, over the {MAX_ENTRY_BYTES} limit")
    assert result["peak"] - result["ready"] < BOUND_MIB, result


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_entry_arriving_slower_than_the_socket_timeout_is_refused(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    """A 6 MiB entry at 1 MiB/s, slower than the subscribers' socket timeout (3.3 s): a reply
    that keeps arriving is no frozen Redis. ``AsyncSubscriber(shared=False)`` read it within
    redis-py's socket timeout for the whole reply: it timed out, reconnected and resynced to
    v3, never refusing v2 (as the asyncio hub did before its cycle watchdog minded progress);
    the threaded kinds time out a ``recv``, not a reply."""
    with slow_link(redis_server, rate=1 * MiB) as url:
        result, rejected = worker_meets(
            kind, redis_server, client, processes, lambda c, v: hostile_entry(c, v, 6 * MiB),
            url=url,
        )  # fmt: skip
    refused_by_all(result, rejected, f"bytes, over the {MAX_ENTRY_BYTES} limit")


@pytest.mark.parametrize("kind", KINDS)
def test_start_replays_past_a_huge_entry_arriving_slower_than_the_socket_timeout(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    """``start()`` reads the stream newest first: a 4 MiB entry at 1 MiB/s (the socket
    timeout: 3.3 s at most) is refused and the entry before it applies. An
    ``AsyncSubscriber``'s ``start()`` (either kind: its replay is its own) timed the whole
    reply out, tried again until ``start_timeout`` and raised ``RedisUnavailable``."""
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    hostile_entry(client, 2, 4 * MiB)
    with slow_link(redis_server, rate=1 * MiB) as url:
        worker = processes.python("-c", WORKER, url, KEY, "2", "1", kind, stdout=subprocess.PIPE)
        assert worker.stdout is not None
        with worker.stdout:
            assert worker.stdout.readline().strip() == b"ready"  # both start()s returned
            result = json.loads(worker.stdout.readline())
        worker.wait(20)
    assert (result["versions"], result["errors"]) == ([1, 1], [1, 1])
    assert settles(lambda: len(_rejected(client)), 2) == 2
    rejected = _rejected(client)
    assert all(f"bytes, over the {MAX_ENTRY_BYTES} limit" in error for error in rejected)


@pytest.mark.parametrize("kind", KINDS)
def test_an_entry_arriving_slower_than_the_socket_timeout_applies_without_a_reconnect(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    """A legitimate entry (1 MB, under every cap) at 200 KiB/s takes 5 s, over the socket
    timeout (3.3 s), but it keeps arriving: it applies on the connection that read it.
    Without progress stamped per piece read (``_aioreplycap``) the asyncio kinds timed the
    reply out, reconnected, and their resync read it the same way: never applied (the
    worker gives up after 60 s and reports version 1)."""
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    with slow_link(redis_server, rate=200 * 1024) as url:
        worker = processes.python("-c", WORKER, url, KEY, "4", "2", kind, stdout=subprocess.PIPE)
        assert worker.stdout is not None
        with worker.stdout:
            assert worker.stdout.readline().strip() == b"ready"
            wait_until(lambda: _readers(client, 4), "4 XREAD connections", timeout=20)
            append_event(redis_server.url, KEY, b"b: " + b"x" * 1_000_000 + b"\n", version=2)
            result = json.loads(worker.stdout.readline())
        worker.wait(20)
    assert (result["versions"], result["errors"]) == ([2, 2, 2, 2], [0, 0, 0, 0])


def worker_meets(
    kind: str,
    redis_server: RedisServer,
    client: redis.Redis,
    processes: Processes,
    hostile: Callable[[redis.Redis, int], object],
    *,
    url: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """A worker process of 4 subscribers (``kind``, connecting to ``url``, by default
    ``redis_server``'s) at v1 meets ``hostile``'s entry as v2, then a genuine v3: its report
    line (versions, errors, ready and peak RSS in MiB) and the rejections' errors in
    ``:acks``.

    v3 is appended once each subscriber has refused v2 on the connection it read it with
    (the same 4 ``XREAD`` connections before and after: a read timed out and reconnected
    would resync instead). Appended at once, v3 could come in the same read as v2 (a
    subscriber between two reads as v2 is added, say under load): a batch's entries older
    than the one applied are superseded, unreported (``_walk``; docs/design.md), so v2 would
    be neither acked nor counted -- a legitimate path, but not the one tested here."""
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    worker = processes.python(
        "-c", WORKER, url or redis_server.url, KEY, "4", "3", kind, stdout=subprocess.PIPE
    )  # fmt: skip
    assert worker.stdout is not None
    with worker.stdout:
        assert worker.stdout.readline().strip() == b"ready"
        before = wait_until(lambda: _readers(client, 4), "4 XREAD connections", timeout=20)
        hostile(client, 2)
        wait_until(lambda: len(_rejected(client)) >= 4, "4 rejections of v2", timeout=30)
        after = wait_until(lambda: _readers(client, 4), "4 XREAD connections", timeout=20)
        assert after == before  # read past on the same connections
        append_event(redis_server.url, KEY, b"a: 3\n", version=3)
        result = json.loads(worker.stdout.readline())
    worker.wait(20)
    return result, _rejected(client)


def refused_by_all(result: dict[str, Any], rejected: list[str], reason: str) -> None:
    """Each of the 4 subscribers refused v2 once (as malformed, ``reason`` in its ack) and
    applied v3."""
    assert result["versions"] == [3, 3, 3, 3]
    assert result["errors"] == [1, 1, 1, 1]
    assert len(rejected) == 4
    assert all(reason in error for error in rejected)


def _readers(client: redis.Redis, count: int) -> set[int] | None:
    """The ids of the connections whose last command was an ``XREAD``, once there are ``count``."""
    ids = {int(c["id"]) for c in cast(Any, client.client_list()) if c["cmd"] == "xread"}
    return ids if len(ids) == count else None


def _rejected(client: redis.Redis) -> list[str]:
    return [
        fields[b"error"].decode()
        for _, fields in cast(Any, client.xrange(KEYS.acks))
        if fields[b"status"] == b"rejected"
    ]


MEASURE = """
import sys
from publisher.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as fh:
    peak = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
sys.stderr.write(f"MAXRSS_KIB {peak}\\n")
sys.exit(code)
"""


def measured(url: str, *args: str) -> tuple[int, str, float]:
    """``hotreload ARGS`` in its own process: exit code, stdout, peak RSS in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args, "--redis", url],
        capture_output=True,
        check=False,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    peak = int(done.stderr.decode().rsplit("MAXRSS_KIB ", 1)[1].split()[0]) / 1024
    return done.returncode, done.stdout.decode(), peak


def test_history_shows_a_huge_entry_as_malformed_without_reading_it(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    _, _, baseline = measured(redis_server.url, "history", KEY)
    hostile_entry(client, 2)
    append_event(redis_server.url, KEY, b"a: 3\n", version=3)
    code, out, peak = measured(redis_server.url, "history", KEY)
    print(f"history with a {HUGE} B entry: peak {peak:.0f} MiB (without it {baseline:.0f} MiB)")
    assert code == 0, out
    assert f"over the {MAX_ENTRY_BYTES} limit" in out
    rows = [line.split()[:2] for line in out.splitlines()[1:] if line.split()[0].isdigit()]
    assert rows == [["3", "5108bb008527"], ["2", "malformed"], ["1", "37b128c59f1f"]], out
    assert peak - baseline < BOUND_MIB


def test_a_huge_worker_state_costs_status_and_the_daemon_nothing(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: b"a: 1\n"})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, metrics_port=free_port()
    )
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=20)
    heartbeat = int(time.time() * 1000)
    state = {"worker": "w:1", "status": "applied", "version": 1, "heartbeat": heartbeat,
             "heartbeat_interval": 5}  # fmt: skip
    client.hset(KEYS.workers, "w:1", json.dumps(state))
    _, _, baseline = measured(redis_server.url, "status")
    daemon_before = peak_mib(daemon.pid)

    client.hset(KEYS.workers, "huge:1", b"x" * (50 * MiB))  # as the subscriber user may
    code, out, peak = measured(redis_server.url, "status")
    print(f"50 MiB :workers value: status peak {peak:.0f} MiB (without it {baseline:.0f} MiB)")
    assert code == 0, out
    assert "unreadable state: over 16384 bytes" in out
    assert any(line.split()[:2] == ["w:1", "1"] and "live" in line for line in out.splitlines())
    assert peak - baseline < BOUND_MIB

    # the daemon reads the hash (with the value) for the floor of its next publish
    kubelet_mount.update(**{KEY: b"a: 2\n"})
    wait_until(lambda: [e.version for e in events(client, KEY)][-1:] == [2], timeout=20)
    daemon_after = peak_mib(daemon.pid)
    print(f"daemon peak RSS {daemon_before:.0f} -> {daemon_after:.0f} MiB")
    assert daemon_after - daemon_before < BOUND_MIB


def test_a_content_at_the_limit_still_reaches_every_reader(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    content = os.urandom(MAX_CONTENT_BYTES // 2).hex().encode()[:MAX_CONTENT_BYTES]
    assert Publisher(client).publish(KEY, content).written
    (event,) = events(client, KEY)
    assert event.content == content
    code, out, _ = measured(redis_server.url, "show", KEY)
    assert code == 0
    assert out.encode().rstrip(b"\n") == content.rstrip(b"\n")


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_null_reads_as_none_in_either_protocol(redis_server: RedisServer, protocol: int) -> None:
    """RESP2's null bulk string (``$-1``) reaches the RESP3 parser the cap is built on (redis-py
    8 uses it for ``?protocol=2`` too): it is a null, not a length to read (that read waited
    for a byte that never came, until the socket timeout)."""
    url = f"{redis_server.url}{'&' if '?' in redis_server.url else '?'}protocol={protocol}"
    client = connect(url, socket_timeout=2)
    try:
        client.set("present", "1")
        assert (client.get("missing"), client.hget("nohash", "f")) == (None, None)
        assert client.get("present") == b"1"  # the connection reads on in step
    finally:
        client.close()

    async def run() -> tuple[object, object, object]:
        aclient = connect_async(url, socket_timeout=2)
        try:
            return (await aclient.get("missing"), await aclient.hget("nohash", "f"),
                    await aclient.get("present"))  # fmt: skip
        finally:
            await aclient.aclose()

    assert asyncio.run(run()) == (None, None, b"1")
