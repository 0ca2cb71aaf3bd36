"""The asyncio transport's connection helpers: a pool holding one connection, one round
trip per batch, a quiet close; used by ``AsyncSubscriber`` (``aio``) and its shared follower
(``_aiohub``), as ``_pool`` is by the threaded side. A reply already buffered whole is
parsed here without an await per line (see "the fast path" below)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio

from subscriber._replybudget import _BUDGET
from subscriber._replycap import COUNT_CAP
from subscriber._wire import checked

if TYPE_CHECKING:
    from subscriber._wire import Batch

__all__ = ["HeldPool", "aclose", "execute"]


class HeldPool(redis.asyncio.ConnectionPool):
    """The task's pool: one connection, checked out once and kept (see ``_wire``)."""

    _held: Any = None

    async def held(self) -> Any:
        if self._held is None:
            self._held = await self.get_connection()  # type: ignore[no-untyped-call]
        return self._held


async def execute(
    client: redis.asyncio.Redis, batch: Batch, *, raise_on_error: bool = False
) -> list[Any]:
    """One round trip: ``batch`` sent on the client's held connection, one reply per command
    (a refused command is its ``ResponseError``, raised when ``raise_on_error``)."""
    if not batch:
        return []
    connection = await cast("HeldPool", client.connection_pool).held()
    await connection.send_packed_command(batch.pack())
    results: list[Any] = []
    for index in range(len(batch)):
        try:
            results.append(batch.reply(index, await _read_reply(connection)))
        except redis.ResponseError as exc:
            results.append(batch.refused(index, exc))
    return checked(results, raise_on_error=raise_on_error)


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
    """The reply is not for the fast path: redis-py's parser reads it."""


_SLOW = _Slow()


def _parse(data: bytes, at: int) -> tuple[Any, int]:
    """The reply starting at ``data[at]`` and where it ends; ``_Slow`` if not for us."""
    end = data.find(b"\r\n", at)
    if end < 0:
        raise _SLOW
    kind = data[at]
    if kind == 0x24:  # $: a bulk string
        size = int(data[at + 1 : end])
        stop = end + 2 + size
        if size < 0 or size > _FAST_BULK or len(data) < stop + 2:
            raise _SLOW
        return data[end + 2 : stop], stop + 2
    if kind in (0x2A, 0x25):  # * an array, % a map
        count = int(data[at + 1 : end])
        if count < 0 or count > COUNT_CAP:
            raise _SLOW
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
    raise _SLOW


async def _read_reply(connection: Any) -> Any:
    """The next reply on ``connection``: parsed here when it is already buffered whole."""
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
        return await connection.read_response()
    if not reader._buffer and not reader.at_eof() and reader.exception() is None:
        try:
            async with asyncio.timeout(connection.socket_timeout):
                await reader._wait_for_data("read")
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise redis.TimeoutError(f"Timeout reading from {connection._host_error()}") from None
    data = bytes(reader._buffer)
    if data:
        try:
            reply, end = _parse(data, 0)
        except (_Slow, ValueError, IndexError, TypeError, RecursionError):
            pass
        else:
            await reader.readexactly(end)  # buffered: returns without waiting
            return reply
    return await connection.read_response()
