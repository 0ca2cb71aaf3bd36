"""The asyncio transport's fast path (``_aiopool``): a reply already buffered whole is parsed
in one go, into exactly what redis-py's parser (the reply cap's) returns for it; every other
reply goes to that parser. Real redis-server, both protocols."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from subscriber import _aiopool
from subscriber._aiopool import HeldPool, aclose, execute
from subscriber._redis import connect_async
from subscriber._replycap import Oversized
from subscriber._wire import Batch
from subscriber.testing import RedisServer
from tests.helpers import slow_link

MiB = 1024 * 1024


def _batch(protocol: int) -> Batch:
    """Every reply shape hotreload reads, and the ones the fast path leaves to redis-py
    (RESP2's null bulk string, ``$-1``, among them: the reply cap's parser reads it)."""
    batch = Batch()
    for args in (
        ("SET", "s", b"v\r\n\x00"),  # +OK
        ("GET", "s"),  # a bulk string holding CRLF
        ("GET", "missing"),  # null: _ in RESP3, $-1 in RESP2
        ("INCR", "n"),  # an integer
        ("HSET", "h", "a", "1", "b", "2"),
        ("HGETALL", "h"),  # a map in RESP3
        ("XADD", "x", "1-1", "f", "v", "g", b"\xff" * 3000),
        ("XADD", "x", "2-1", "f", "w"),
        ("XRANGE", "x", "-", "+"),  # nested arrays
        ("XREAD", "COUNT", 10, "STREAMS", "x", "y", "0", "0"),  # a map of streams
        ("INCR", "s"),  # refused: an error reply
        ("SET", "big", b"b" * 100_000),
        ("GET", "big"),  # over the fast path's bulk size: redis-py reads it
        ("SMEMBERS", "nothing"),  # a set (~ in RESP3): redis-py reads it
        ("PING",),
    ):
        batch.command(*args)
    return batch


def _replies(url: str, protocol: int, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    parsed: list[int] = []
    parse = _aiopool._parse

    def counting(data: bytes, at: int) -> tuple[Any, int]:
        reply, end = parse(data, at)
        parsed.append(end)
        return reply, end

    async def read_response(connection: Any, timeout: float | None = None) -> Any:
        return await connection.read_response()  # the code before: redis-py's parser only

    with monkeypatch.context() as patch:
        if fast:
            patch.setattr(_aiopool, "_parse", counting)
        else:
            patch.setattr(_aiopool, "read_reply", read_response)

        async def run() -> list[Any]:
            client = connect_async(url, socket_timeout=5, pool_class=HeldPool)
            try:
                await execute(client, _flush())
                replies = await execute(client, _batch(protocol))
                replies += await execute(client, _batch(protocol))  # keys present from the start
                return replies
            finally:
                await aclose(client)

        replies = asyncio.run(run())
    if fast:  # the fast path did read replies (most of them)
        assert len(parsed) >= 20
    return [repr(r) if isinstance(r, Exception) else r for r in replies]


def _flush() -> Batch:
    batch = Batch()
    batch.command("FLUSHALL")
    return batch


@pytest.mark.parametrize("protocol", [3, 2])
def test_the_fast_path_reads_every_reply_as_redis_py_does(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    url = f"{redis_server.url}{'&' if '?' in redis_server.url else '?'}protocol={protocol}"
    fast = _replies(url, protocol, True, monkeypatch)
    slow = _replies(url, protocol, False, monkeypatch)
    assert fast == slow
    assert slow[2] is None  # GET of a missing key
    assert isinstance(slow[10], str)
    assert "ResponseError" in slow[10]
    assert slow[12] == b"b" * 100_000


def test_a_read_timeout_on_the_fast_path_is_redis_pys(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = connect_async(redis_server.url, socket_timeout=0.2, pool_class=HeldPool)
        try:
            batch = Batch()
            batch.command("BLPOP", "nothing", 0)  # blocks past the socket timeout
            with pytest.raises(redis.TimeoutError):
                await execute(client, batch)
        finally:
            await aclose(client)

    asyncio.run(run())


def test_a_reply_times_out_only_when_nothing_of_it_came_for_the_socket_timeout(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A 4 MiB value over a 1 MiB/s link, the socket timeout 1.5 s: read past (the reply cap)
    while it keeps arriving, however long that takes -- redis-py gave the whole reply the
    socket timeout, and raised ``TimeoutError`` -- and the connection reads on; stalled part
    way, the read still times out (else it would wait for ever: the link never resumes)."""
    client.set("huge", b"z" * (4 * MiB))
    client.set("small", b"s")
    flowing = threading.Event()
    flowing.set()

    def gets(*names: str) -> Batch:
        batch = Batch()
        for name in names:
            batch.command("GET", name)
        return batch

    async def run(url: str) -> tuple[list[Any], float]:
        aio = connect_async(url, socket_timeout=1.5, pool_class=HeldPool)
        try:
            async with asyncio.timeout(60):
                began = time.monotonic()
                replies = await execute(aio, gets("huge", "small"))
                took = time.monotonic() - began
                asyncio.get_running_loop().call_later(1.0, flowing.clear)
                with pytest.raises(redis.TimeoutError):
                    await execute(aio, gets("huge"))
            return replies, took
        finally:
            await aclose(aio)

    with slow_link(redis_server, rate=1 * MiB, flowing=flowing) as url:
        (huge, small), took = asyncio.run(run(url))
    assert isinstance(huge, Oversized)
    assert len(huge) == 4 * MiB
    assert small == b"s"
    assert took > 1.5  # it did arrive slower than the socket timeout


def _pushes(url: str, fast: bool) -> list[Any]:
    """What a pub/sub connection reads: its SSUBSCRIBE confirmations, then messages."""

    async def run() -> list[Any]:
        client = connect_async(url, socket_timeout=5, pool_class=HeldPool)
        publisher = connect_async(url, socket_timeout=5, pool_class=HeldPool)
        try:
            connection = await client.connection_pool.held()  # type: ignore[attr-defined]
            subscribe = Batch()
            subscribe.command("SSUBSCRIBE", "a:{k}:notify")
            subscribe.command("SSUBSCRIBE", "b:{k}:notify")
            await _aiopool.send(connection, subscribe.pack())
            read: list[Any] = []
            for _ in range(2):
                read.append(await _read_push(connection, fast))
            for message in (b"7", b"\r\n" * 3, b"x" * 70_000):  # CRLF; over the bulk size
                publish = Batch()
                publish.command("SPUBLISH", "a:{k}:notify", message)
                await execute(publisher, publish, raise_on_error=True)
                read.append(await _read_push(connection, fast))
            return read
        finally:
            await aclose(client)
            await aclose(publisher)

    return asyncio.run(run())


async def _read_push(connection: Any, fast: bool) -> Any:
    if fast:
        return await _aiopool.read_push(connection)
    return await connection.read_response(timeout=float("inf"), push_request=True)


@pytest.mark.parametrize("protocol", [3, 2])
def test_a_push_is_read_as_redis_py_reads_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    url = f"{redis_server.url}{'&' if '?' in redis_server.url else '?'}protocol={protocol}"
    parse, parsed = _aiopool._parse, []

    def counting(data: bytes, at: int) -> tuple[Any, int]:
        if at == 0 and (b"subscribe" in data[:20] or b"smessage" in data[:20]):
            parsed.append(at)  # a push, read by the fast path
        return parse(data, at)

    with monkeypatch.context() as patch:
        patch.setattr(_aiopool, "_parse", counting)
        fast = _pushes(url, True)
    slow = _pushes(url, False)
    assert fast == slow
    # RESP3: all 5 (the last one tried, then left to redis-py: over the bulk size);
    # RESP2 sends no pushes but arrays, which redis-py reads
    assert len(parsed) == (5 if protocol == 3 else 0)
    assert [reply[0].lower() for reply in slow] == [b"ssubscribe"] * 2 + [b"smessage"] * 3
    assert slow[3][2] == b"\r\n" * 3


def test_a_write_the_socket_does_not_take_at_once_is_drained(redis_server: RedisServer) -> None:
    async def run() -> list[Any]:
        client = connect_async(redis_server.url, socket_timeout=5, pool_class=HeldPool)
        try:
            batch = Batch()
            batch.command("SET", "large", b"z" * 16_000_000)  # beyond the socket's buffers
            batch.command("STRLEN", "large")
            return await execute(client, batch, raise_on_error=True)
        finally:
            await aclose(client)

    assert asyncio.run(run()) == [b"OK", 16_000_000]
