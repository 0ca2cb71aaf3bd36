"""The asyncio transport's connection helpers: a pool holding one connection, one round
trip per batch, a quiet close; used by ``AsyncSubscriber`` (``aio``) and its shared follower
(``_aiohub``), as ``_pool`` is by the threaded side. A reply already buffered whole is
parsed here without an await per line (see "the fast path" below).

A reply's read times out only when nothing of it arrived for the socket timeout, as a sync
socket's ``recv`` does: redis-py's asyncio ``read_response`` gives the whole reply that long,
and a hostile entry skipped by the reply cap (``_replycap``: 6 MB, or 600,000 one-byte
fields) can take longer while every chunk arrives -- several ``AsyncSubscriber(shared=False)``
of one loop on a slow machine, or one over a slow link, then timed out, reconnected and
resynced to the entry after it, never refusing it (tests/test_reply_cap.py, _count.py). So a
read the parser leaves unfinished goes on without redis-py's timeout, under a timer that
pushes its deadline back to a socket timeout after each piece of the reply the parser read
(its ``progress``: each line, 64 KiB, chunk skipped; ``_aioreplycap``) and else fails the
read as redis-py's timeout would
(:func:`stalled_until`, :func:`time_out`; the loop's hub, whose one timer watches a whole
cycle, uses the same two).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio

from subscriber._replybudget import _BUDGET
from subscriber._replycap import COUNT_CAP
from subscriber._wire import checked

if TYPE_CHECKING:
    from subscriber._wire import Batch

__all__ = [
    "HeldPool",
    "aclose",
    "execute",
    "read_push",
    "read_reply",
    "send",
    "stalled_until",
    "time_out",
]


class HeldPool(redis.asyncio.ConnectionPool):
    """The task's pool: one connection, checked out once and kept (see ``_wire``)."""

    _held: Any = None

    async def held(self) -> Any:
        if self._held is None:
            self._held = await self.get_connection()  # type: ignore[no-untyped-call]
        return self._held


async def execute(
    client: redis.asyncio.Redis,
    batch: Batch,
    *,
    raise_on_error: bool = False,
    timeout: float | None = None,
) -> list[Any]:
    """One round trip: ``batch`` sent on the client's held connection, one reply per command
    (a refused command is its ``ResponseError``, raised when ``raise_on_error``); each
    reply within ``timeout`` (see :func:`read_reply`)."""
    if not batch:
        return []
    connection = await cast("HeldPool", client.connection_pool).held()
    await send(connection, batch.pack())
    results: list[Any] = []
    for index in range(len(batch)):
        try:
            results.append(batch.reply(index, await read_reply(connection, timeout)))
        except redis.ResponseError as exc:
            results.append(batch.refused(index, exc))
    return checked(results, raise_on_error=raise_on_error)


async def send(connection: Any, pieces: list[bytes | memoryview]) -> None:
    """``connection.send_packed_command(pieces)`` without its task per write (redis-py wraps
    every write in ``asyncio.wait_for``: a task, for a write the socket takes at once): the
    pieces go to the transport, and only a write the socket did not take whole waits for
    the drain, within the socket timeout. A write failing in the transport closes the
    connection, which the read of its reply raises (redis-py's ``ConnectionError``)."""
    writer = connection._writer if connection.is_connected else None
    if writer is None or writer.transport.is_closing() or connection.health_check_interval:
        await connection.send_packed_command(pieces)
        return
    writer.writelines(pieces)
    if not writer.transport.get_write_buffer_size():
        return
    try:
        async with asyncio.timeout(connection.socket_timeout):
            await writer.drain()
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise redis.TimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise redis.ConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        await connection.disconnect(nowait=True)  # a write cut short: the stream is torn
        raise


async def aclose(client: redis.asyncio.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.aclose()


# -- the fast path: a reply already buffered whole, parsed in one go ------------------------
#
# redis-py's asyncio parser awaits once per line of a reply (a 1 KiB XREAD entry: ~23
# awaits, each a chain of coroutines): for 250 AsyncSubscribers in a loop that was a third
# of each one's CPU per update (issue 21, bench_scale). A reply whose bytes are all in the
# connection's StreamReader (the usual case: Redis writes a small reply at once) is parsed
# here without an await, into exactly what redis-py's RESP3 parser returns for it (bytes,
# ints, None, lists, dicts; decoding is off on every hotreload connection). Anything else
# goes to redis-py's parser (the reply cap's, ``_replycap``) untouched: an error reply, a
# type other than those, a bulk string over ``_FAST_BULK`` or an aggregate over
# ``COUNT_CAP`` members (the cap's cases), a context with a reply budget, a parser holding
# part of a reply (a cancelled read), or a reply not yet whole in the buffer.

_FAST_BULK = 65_536


class _Slow(Exception):
    """The reply is not for the fast path: redis-py's parser reads it. A new instance each
    time (a shared one keeps its last raise's frames alive: ``_fastreply._Declined``)."""


def _parse(data: bytes, at: int) -> tuple[Any, int]:
    """The reply starting at ``data[at]`` and where it ends; ``_Slow`` if not for us."""
    end = data.find(b"\r\n", at)
    if end < 0:
        raise _Slow
    kind = data[at]
    if kind == 0x24:  # $: a bulk string
        size = int(data[at + 1 : end])
        stop = end + 2 + size
        if size < 0 or size > _FAST_BULK or len(data) < stop + 2:
            raise _Slow
        return data[end + 2 : stop], stop + 2
    if kind in (0x2A, 0x25):  # * an array, % a map
        count = int(data[at + 1 : end])
        if count < 0 or count > COUNT_CAP:
            raise _Slow
        at = end + 2
        items: list[Any] = []
        for _ in range(2 * count if kind == 0x25 else count):
            item, at = _parse(data, at)
            items.append(item)
        if kind == 0x25:
            return dict(zip(items[::2], items[1::2], strict=True)), at
        return items, at
    if kind == 0x3A:  # : an integer
        return int(data[at + 1 : end]), end + 2
    if kind == 0x2B:  # + a simple string
        return data[at + 1 : end], end + 2
    if kind == 0x5F:  # _ a null
        return None, end + 2
    raise _Slow


def _reader(connection: Any) -> Any:
    """The connection's ``StreamReader`` when the fast path may read it, else None."""
    parser = connection._parser
    reader = getattr(parser, "_stream", None)
    if (
        reader is None
        or parser._buffer
        or parser._chunks
        or getattr(parser, "_cut", False)
        or _BUDGET.get() is not None
        or connection.encoder.decode_responses
    ):
        return None
    return reader


async def read_reply(connection: Any, timeout: float | None = None) -> Any:
    """The next reply on ``connection``: parsed here when it is already buffered whole.
    ``timeout``: how long its first bytes may take, else the connection's socket timeout,
    which then also ends a reply of which nothing arrived that long (see the module);
    ``math.inf``: the caller times the read out itself."""
    reader = _reader(connection)
    if reader is None:
        return await _read_response(connection, timeout)
    if not reader._buffer and not reader.at_eof() and reader.exception() is None:
        if timeout == math.inf:
            await reader._wait_for_data("read")
        else:
            await _wait(connection, reader, timeout)
    data = bytes(reader._buffer)
    if data:
        try:
            reply, end = _parse(data, 0)
        except (_Slow, ValueError, IndexError, TypeError, RecursionError):
            pass
        else:
            await reader.readexactly(end)  # buffered: returns without waiting
            return reply
    return await _read_response(connection, timeout)


async def _read_response(connection: Any, timeout: float | None) -> Any:
    """redis-py's ``read_response``; with ``timeout`` None timed out by :func:`stalled_until`
    rather than redis-py's timeout for the whole reply."""
    limit = connection.socket_timeout
    if timeout is not None or limit is None:
        return await connection.read_response(timeout=timeout)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + limit
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal deadline, timer
        deadline = stalled_until(connection, deadline, limit)
        left = deadline - time.monotonic()
        if left > 0:
            timer = loop.call_later(left, check)
        else:
            timer = None
            time_out(connection)

    timer = loop.call_later(limit, check)
    try:
        return await connection.read_response(timeout=math.inf)
    finally:
        if timer is not None:
            timer.cancel()


def stalled_until(connection: Any, deadline: float, timeout: float) -> float:
    """When a read on ``connection`` due by ``deadline`` (``time.monotonic``) times out: a
    ``timeout`` after the last piece of a reply its parser read (the capped parser's
    ``progress``), if later -- a reply still arriving is no frozen Redis."""
    progress = getattr(getattr(connection, "_parser", None), "progress", 0.0)
    return max(deadline, progress + timeout)


def time_out(connection: Any) -> None:
    """Fail the read waiting on ``connection``'s stream with redis-py's ``TimeoutError`` (as
    its ``asyncio.timeout`` would); its reader then drops the connection. (No stream: it is
    disconnected, and the read has failed already.)"""
    reader = getattr(connection, "_reader", None)
    if reader is not None:
        where = connection._host_error()
        reader.set_exception(redis.TimeoutError(f"Timeout reading from {where}"))


async def _wait(connection: Any, reader: Any, timeout: float | None) -> None:
    """The first bytes of a reply, within ``timeout`` (None: the socket timeout)."""
    try:
        async with asyncio.timeout(connection.socket_timeout if timeout is None else timeout):
            await reader._wait_for_data("read")
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise redis.TimeoutError(f"Timeout reading from {connection._host_error()}") from None


# Pushes a shard pub/sub connection gets, returned as redis-py returns them with
# ``push_request`` (its push handler passes these kinds on as they are).
_PUSHES = frozenset((b"smessage", b"ssubscribe", b"sunsubscribe"))


async def read_push(connection: Any) -> Any:
    """The next push on a pub/sub ``connection``, however long it takes (as redis-py's
    ``read_response(timeout=math.inf, push_request=True)``): a RESP3 push of ``_PUSHES``
    already buffered whole is parsed here; anything else by redis-py's parser. Measured:
    the push of every entry, one per key and process, cost 5 awaits of the parser per line
    (``profile_async --cluster``)."""
    reader = _reader(connection)
    if reader is not None:
        if not reader._buffer and not reader.at_eof() and reader.exception() is None:
            await reader._wait_for_data("read")
        data = bytes(reader._buffer)
        if data[:1] == b">":
            try:
                reply, end = _parse(b"*" + data[1:], 0)
            except (_Slow, ValueError, IndexError, TypeError, RecursionError):
                pass
            else:
                if reply and isinstance(reply[0], bytes) and reply[0].lower() in _PUSHES:
                    await reader.readexactly(end)
                    return reply
    return await connection.read_response(timeout=math.inf, push_request=True)
