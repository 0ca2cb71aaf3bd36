"""Replies read with a size cap: a bulk string over it is dropped as it arrives, never held.

Whoever may ``XADD`` to ``:events`` (or ``HSET`` ``:workers``: the ``subscriber`` password
is enough) decides how long a bulk string Redis sends us is. Our own checks
(``protocol.MAX_ENTRY_BYTES``, ``_floor.MAX_STATE_BYTES``) refuse an oversized entry or state,
but only after redis-py's pure-Python parser has read the whole reply: its socket buffer
(an ``io.BytesIO`` of the reply so far) plus the copies ``SocketBuffer.read`` makes. Measured
(redis-py 8.2, redis-server 7.0.15, unix socket, VmHWM): one 100 MB entry took a process
with 4 ``Subscriber``s from 35 to 607-705 MiB peak RSS (3 runs; 4 ``AsyncSubscriber``s: 608)
and ``hotreload history`` to 322 MiB; one 50 MiB ``:workers`` value took ``hotreload
status`` to 186 MiB and the daemon, reading it for a publish, from 39 to 189 MiB.

So every connection hotreload makes (``_redis.connect``, ``connect_async``, and through them
``publisher._admin``'s cluster and sentinel clients; TLS alike: only the parser changes) reads
with the parsers here: redis-py's own RESP3 parser, sync and asyncio, with one change: a bulk
string longer than ``REPLY_CAP`` is read off the socket in chunks of at most 64 KiB and
dropped, and the reply holds an :class:`Oversized` in its place -- a ``bytes`` whose
``len()`` is the size Redis announced and whose bytes are a short note saying so. Every size
check already in the readers (``len(value) > limit``: ``protocol.entry_size``,
``_floor.bounded``) therefore refuses it with its true size and the usual reason ("entry is
100000131 bytes, over the 1064448 limit"), while the reply's other elements, and the
connection, stay as they were: the worker acks the entry as malformed (``_junk``) and
applies the next one; ``status`` shows the state as unreadable and the other workers as
ever. Measured the same way: the worker stays at 35 MiB (threaded or asyncio), ``history``
and ``status`` at their 35 MiB, the daemon at 39 MiB.

Why RESP3 only: redis-py 8 speaks RESP3 unless told otherwise, and swaps any parser that is
a ``_RESP2Parser`` (subclasses too) for its plain ``_RESP3Parser`` when it connects; the
RESP3 parser reads RESP2 replies as well, so a URL's ``?protocol=2`` works with it. (A
server without ``HELLO`` -- Redis before 6, which hotreload does not support -- makes
redis-py 8.2 fall back to its plain RESP2 parser: no cap there.)

``REPLY_CAP`` is ``protocol.MAX_ENTRY_BYTES`` (content limit + 16 KiB, 1,064,448 bytes): no
legitimate bulk string any reader gets is longer than a whole entry may be. A content (a
snapshot's too: its MessagePack document is the content) is at most ``MAX_CONTENT_BYTES``;
a worker state at most 16 KiB, an ack or a ``:control`` entry a few hundred bytes; the other
replies (``INFO keyspace``/``memory``, ``TIME``, the publish and inspect scripts' answers,
key names from ``SCAN``) are small. A cut never changes a verdict: a field over the cap makes
its entry over ``MAX_ENTRY_BYTES`` anyway.

The change sits in redis-py's private parser internals (the sync ``SocketBuffer.read`` and
``_read_from_socket``, the asyncio parser's ``_read``), the same in every redis-py this
package admits (8.0.1 .. 8.2, checked by ``make test-oldest``). A reply cut short can't be
parsed again: redis-py rewinds a sync reply that failed part way (a timeout) to re-read it,
and re-parses an asyncio one that was cancelled, from bytes it kept -- and the dropped bytes
are gone. Such a connection therefore reports itself broken (``ConnectionError``, or "has
data" to the pool) and is replaced; by default redis-py closes a connection on any error
anyway.

hiredis: ``[hiredis]`` installs a C parser that redis-py would pick by default. It has no
size limit (it buffers each reply whole), so hotreload's connections use these parsers
whether hiredis is installed or not: with it, they are exactly what they are without it.
"""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any

from redis._parsers import _AsyncRESP3Parser, _RESP3Parser
from redis._parsers.socket import SocketBuffer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.utils import SENTINEL

from subscriber.protocol import MAX_ENTRY_BYTES

if TYPE_CHECKING:
    import socket

__all__ = ["CHUNK", "REPLY_CAP", "AsyncCappedParser", "CappedParser", "Oversized", "parser_class"]

# No legitimate bulk string is longer than a whole entry may be (see the module docstring).
REPLY_CAP = MAX_ENTRY_BYTES
# What a dropped bulk string costs at most at a time: one chunk read off the socket.
CHUNK = 64 * 1024

_CUT_AND_RETRIED = (
    "a reply with a bulk string over the size cap was cut short and cannot be read again; "
    "reconnecting"
)


class Oversized(bytes):
    """A bulk string Redis sent that was over the cap: read off the socket and dropped.

    Its ``len()`` is the size Redis announced (also ``size``), so every ``len(value) > limit``
    check refuses it, saying how big it was; its bytes are a short note saying so, which is
    what shows wherever such a value is merely displayed (a 20 MiB ``error`` in an ack reads
    ``<20971520 bytes, over the 1064448-byte reply cap: not read>``).
    """

    size: int

    def __new__(cls, size: int) -> Oversized:
        value = super().__new__(
            cls, f"<{size} bytes, over the {REPLY_CAP}-byte reply cap: not read>".encode()
        )
        value.size = size
        return value

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return self.decode()

    __str__ = __repr__


class _CappedBuffer(SocketBuffer):
    """redis-py's socket buffer, dropping a bulk string over ``cap`` as it arrives."""

    def __init__(self, sock: socket.socket, socket_read_size: int, socket_timeout: Any) -> None:
        super().__init__(sock, socket_read_size, socket_timeout)
        self.cut = False  # this reply dropped bytes: it cannot be rewound and read again
        self.broken = False  # a reply that dropped bytes failed part way: the stream is lost

    def read(self, length: int, timeout: Any = SENTINEL) -> bytes:
        if self.broken:
            raise RedisConnectionError(_CUT_AND_RETRIED)
        if length <= REPLY_CAP:
            return super().read(length, timeout=timeout)
        self.cut = True
        self._skip(length + 2, timeout)  # the value and its \r\n
        return Oversized(length)

    def _skip(self, count: int, timeout: Any) -> None:
        buf: io.BytesIO | None = self._buffer
        if buf is None or buf.closed:
            raise RedisConnectionError("Connection closed by server.")
        try:
            pos = buf.tell()
            while True:
                end = buf.seek(0, io.SEEK_END)
                if end - pos >= count:
                    buf.seek(pos + count)
                    return
                count -= end - pos
                buf.seek(pos)
                buf.truncate(pos)  # drop what arrived: the buffer keeps one chunk at most
                self._read_from_socket(timeout=timeout)  # one recv, appended at ``pos``
        except ValueError:  # closed by another thread (redis-py's own answer to that)
            raise RedisConnectionError("Connection closed by server.") from None

    def readline(self, timeout: Any = SENTINEL) -> bytes:
        if self.broken:
            raise RedisConnectionError(_CUT_AND_RETRIED)
        return super().readline(timeout=timeout)

    def can_read(self, timeout: float = 0) -> bool:
        # a lost stream "has data": the pool replaces the connection before lending it
        return self.broken or super().can_read(timeout)

    def rewind(self, pos: int) -> None:
        if self.cut:  # what was dropped cannot be read again
            self.broken = True
            return
        super().rewind(pos)

    def purge(self) -> None:
        self.cut = False  # the reply was read whole (but for what was dropped)
        super().purge()


class _Capped:
    """The sync parsers' mixin: the socket buffer becomes a :class:`_CappedBuffer`."""

    _buffer: Any
    _sock: Any
    socket_read_size: int

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[misc]
        self._buffer = _CappedBuffer(self._sock, self.socket_read_size, connection.socket_timeout)


class _AsyncCapped:
    """The asyncio parsers' mixin: ``_read`` drops a bulk string over the cap."""

    _stream: Any
    _pos: int
    _buffer: bytes

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[misc]
        self._cut = False

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        # A read cancelled after dropping bytes would be parsed again from what redis-py
        # kept of it, which lacks them: never; the connection is closed and replaced.
        if getattr(self, "_cut", False):
            raise RedisConnectionError(_CUT_AND_RETRIED)
        response = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        self._cut = False
        return response

    async def _read(self, length: int) -> bytes:
        if length <= REPLY_CAP:
            return await super()._read(length)  # type: ignore[misc, no-any-return]
        self._cut = True
        want = length + 2  # the value and its \r\n
        # part of it may already be in the buffer kept from a cancelled read
        left = want - max(0, len(self._buffer) - self._pos)
        try:
            while left > 0:
                left -= len(await self._stream.readexactly(min(left, CHUNK)))
        except asyncio.IncompleteReadError as exc:
            raise RedisConnectionError("Connection closed by server.") from exc
        self._pos += want
        return Oversized(length)


class CappedParser(_Capped, _RESP3Parser):
    """redis-py's RESP3 parser with the reply cap, for either protocol (see the module
    docstring: redis-py would swap a RESP2 parser for its own RESP3 one)."""


class AsyncCappedParser(_AsyncCapped, _AsyncRESP3Parser):
    """redis-py's asyncio RESP3 parser with the reply cap, for either protocol."""


def parser_class(*, aio: bool = False) -> type[Any]:
    """The capped parser for a sync (or, ``aio``, an asyncio) connection."""
    return AsyncCappedParser if aio else CappedParser
