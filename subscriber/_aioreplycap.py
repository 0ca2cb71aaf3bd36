"""The reply cap's asyncio parser: redis-py's asyncio RESP3 parser, dropping a bulk string over
``REPLY_CAP`` and an aggregate over ``COUNT_CAP`` as they arrive (``_replycap``'s docstring
says why and how; the sync parser and the markers are there), and saying when a piece of the
reply last came.

``progress`` (``time.monotonic``) is stamped for every line the parser reads, every 64 KiB
of a bulk string read (a longer one is read a chunk at a time) and every chunk the cap reads
past. An asyncio read times out on it rather than on redis-py's
``asyncio.timeout`` for the whole reply (``_aiopool.stalled_until``, used by every
``AsyncSubscriber`` read and the loop's hub's cycle): only when nothing of the reply came for
the socket timeout, as a sync socket's ``recv`` (``_light``, redis-py's ``SocketBuffer``).
What takes long is legitimate: reading past an entry of 600,000 one-byte fields took 4 hubs
of one loop 4.4 s (session 9), 6 MB over a slow link takes what the link gives; and parsing
8 entries of 32,700 fields each (just under the member cap: kept, then refused as malformed)
took 4 ``AsyncSubscriber``s of one loop, on a loaded 2-core VM, past their 3.3 s socket
timeout: each read timed out, reconnected and resynced into the same entries (session 10).
A stamp costs a ``time.monotonic()`` (~0.1 us) per line on this path, which the usual small
reply does not take (``_aiopool``'s fast path parses it in one go): by arithmetic ~2 % of parsing an
entry of 32,700 fields here (~6 us per field under load).

Its own module because ``_replycap`` is at the 500-line limit; the pieces both parsers share
(the markers, how a header line is skipped) stay there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis._parsers import _AsyncRESP3Parser
from redis.exceptions import ConnectionError as RedisConnectionError

from subscriber._replybudget import Budget
from subscriber._replycap import (
    CHUNK,
    CUT_AND_RETRIED,
    DROPPED,
    REPLY_CAP,
    Oversized,
    _cuts,
    _members,
    _over,
    _step,
    _substitute,
)

__all__ = ["AsyncCappedParser"]


class _AsyncCapped:
    """The asyncio parsers' mixin: ``_read`` drops a bulk string over the cap."""

    _stream: Any
    _pos: int
    _buffer: bytes
    _chunks: list[bytes]

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[misc]
        self._cut = False
        self.progress = 0.0  # when a piece of a reply was last read (time.monotonic)
        self._too_many: object = None
        self._budget = Budget()

    async def _read_response(self, *args: Any, **kwargs: Any) -> Any:
        response = await super()._read_response(*args, **kwargs)  # type: ignore[misc]
        if self._too_many is not None:  # this level's aggregate was cut
            response, self._too_many = self._too_many, None
        return response

    async def _readline(self) -> bytes:
        line: bytes = await super()._readline()  # type: ignore[misc]
        self.progress = time.monotonic()
        members = _over(line)
        if not members and not _cuts(self._budget, line):
            return line
        self._cut = True
        kind, count = line[:1], _members(line)
        await self._skip_members(2 * count if kind == b"%" else count)
        if kind == b">":  # an out-of-band push: dropped whole, the reply goes on
            return await self._readline()
        self._too_many = _substitute(kind, members)
        return b"_"  # a null: _read_response returns ``_too_many`` instead

    async def _skip_members(self, count: int) -> None:
        """Read ``count`` members (nested ones too) past, holding none of them.

        Parsed a chunk at a time (an ``await`` per member took 1.4 s for 600,000 members,
        long enough for a read timeout): never reading past the aggregate's end, which
        belongs to the rest of the reply or the next one -- every member left is at least
        3 bytes (``+\\r\\n``), so that many are surely the aggregate's; else one line.
        """
        data, at = self._buffer, self._pos  # first what is kept of the reply
        kept = True
        if at >= len(data):  # past it (the usual case): else we would read too far
            data, at, kept = b"", 0, False
        while count:
            end = data.find(b"\r\n", at)
            if end < 0:
                ahead = 3 * count - (len(data) - at)
                try:
                    more = await (
                        self._stream.readexactly(min(ahead, CHUNK))
                        if ahead > 0
                        else self._stream.readline()
                    )
                except asyncio.IncompleteReadError as exc:
                    raise RedisConnectionError("Connection closed by server.") from exc
                if not more:
                    raise RedisConnectionError("Connection closed by server.")
                self.progress = time.monotonic()
                data, at, kept = data[at:] + more, 0, False
                continue
            drop, more_members = _step(data[at:end])
            count += more_members - 1
            at = end + 2
            if drop > len(data) - at:  # a bulk string past what is held: from the socket
                await self._drop_from_socket(drop - (len(data) - at))
                data, at, kept = b"", 0, False
            else:
                at += drop
        self._pos = at if kept else max(self._pos, len(self._buffer))

    async def _read_in_chunks(self, want: int) -> bytes:
        """A bulk string and its CRLF (``want`` bytes), what redis-py's parser has not kept of
        it read off the socket a chunk at a time, each kept as redis-py keeps what it read
        (``_chunks``: a cancelled read is parsed again from them): ``progress`` per chunk,
        so a big value arriving slowly is no stalled read."""
        pieces = [self._buffer[self._pos :]]
        left = want - len(pieces[0])
        try:
            while left > 0:
                data = await self._stream.readexactly(min(left, CHUNK))
                self._chunks.append(data)
                pieces.append(data)
                left -= len(data)
                self.progress = time.monotonic()
        except asyncio.IncompleteReadError as exc:
            raise RedisConnectionError("Connection closed by server.") from exc
        self._pos += want
        return b"".join(pieces)[:-2]

    async def _drop_from_socket(self, left: int) -> None:
        try:
            while left > 0:
                left -= len(await self._stream.readexactly(min(left, CHUNK)))
                self.progress = time.monotonic()
        except asyncio.IncompleteReadError as exc:
            raise RedisConnectionError("Connection closed by server.") from exc

    async def _drop(self, want: int) -> None:
        """``want`` bytes read past, from what is kept of the reply or else the socket."""
        await self._drop_from_socket(want - max(0, len(self._buffer) - self._pos))
        self._pos += want

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        # A read cancelled after dropping bytes would be parsed again from what redis-py
        # kept of it, which lacks them: never; the connection is closed and replaced.
        if getattr(self, "_cut", False):
            raise RedisConnectionError(CUT_AND_RETRIED)
        self._budget.start()
        response = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        self._cut = False
        return response

    async def _read(self, length: int) -> bytes:
        if length < 0:  # RESP2's null bulk string ($-1; RESP3 has _): nothing follows
            return None  # type: ignore[return-value]
        if length <= REPLY_CAP and self._budget.keeps(length):
            if length + 2 > CHUNK + len(self._buffer) - self._pos:
                return await self._read_in_chunks(length + 2)
            # at most a chunk: its header line stamped progress (a stamp costs ~0.1 us)
            return await super()._read(length)  # type: ignore[misc, no-any-return]
        self._cut = True
        # the value and its \r\n; part of it may be in the buffer kept from a cancelled read
        await self._drop(length + 2)
        return Oversized(length) if length > REPLY_CAP else DROPPED


class AsyncCappedParser(_AsyncCapped, _AsyncRESP3Parser):
    """redis-py's asyncio RESP3 parser with the reply cap, for either protocol."""
