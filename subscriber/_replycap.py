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
with the parsers here (the asyncio one in ``_aioreplycap``, which imports this module's
pieces): redis-py's own RESP3 parser, sync and asyncio, with one change: a bulk
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
RESP3 parser reads RESP2 replies as well -- all but the null bulk string ``$-1``, which it
took for a length to read (a ``GET`` of a missing key then waited for the socket timeout);
the reads here return it as ``None`` -- so a URL's ``?protocol=2`` works with it. (A
server without ``HELLO`` -- Redis before 6, which hotreload does not support -- makes
redis-py 8.2 fall back to its plain RESP2 parser: no cap there.)

``REPLY_CAP`` is ``protocol.MAX_ENTRY_BYTES`` (content limit + 16 KiB, 1,064,448 bytes): no
legitimate bulk string any reader gets is longer than a whole entry may be. A content (a
snapshot's too: its MessagePack document is the content) is at most ``MAX_CONTENT_BYTES``;
a worker state at most 16 KiB, an ack or a ``:control`` entry a few hundred bytes; the other
replies (``INFO keyspace``/``memory``, ``TIME``, the publish and inspect scripts' answers,
key names from ``SCAN``) are small. A cut never changes a verdict: a field over the cap makes
its entry over ``MAX_ENTRY_BYTES`` anyway.

Many small members are the other way to make a reply big: one entry of 500,000 one-byte
fields (a 7 MB ``XADD``) took a process with 4 ``Subscriber``s from 35 to 251 MiB peak RSS,
``history`` to 96 MiB and, as an ``:acks`` entry, ``status`` to 137 MiB (each a list of a
million bytes objects, then a dict of them). So an aggregate (array, set, map, push) that
announces more than ``COUNT_CAP`` members (a map's counted in pairs) is read off the socket
member by member (nested ones too, each bulk string as above), the buffer emptied as it goes
(asyncio: parsed a chunk at a time, never past the aggregate's end), and the reply holds
``[m, m]`` (a map: ``{m: m}``) in its place, ``m`` a :class:`TooMany` saying how many there
were. An entry whose fields were cut thus reads as one field, which
``_fields.field_map`` refuses ("entry has 500001 fields, over the reply cap"): the worker
acks it as malformed and applies the next entry, ``history`` shows it malformed, an ack of
that shape is junk to the ack readers. Measured the same way: all stay at 35 MiB, and
skipping is cheaper than parsing (600,000 members: 0.71 s sync, 0.43 s asyncio; read whole
1.33 / 2.48 s). Not free: 4 asyncio hubs of a loop took 4.4 s (session 9, a loaded VM), over
their 3.3 s timeout, and lost it (reconnected, resynced to v3: never acked); so the asyncio
parser stamps ``progress`` per chunk skipped (and per piece read: ``_aioreplycap``), and
asyncio reads (``_aiopool``, its hub's cycle too) time out only if none came that long. An
out-of-band push over the cap is dropped whole and the reply it came before read on.

``COUNT_CAP`` (65,536) is above every aggregate a reader is legitimately sent: an entry has
a dozen fields; reads are paged (``XRANGE``/``XREVRANGE``/``XREAD`` ``COUNT`` at most 2,000
acks, 1,000 events; ``HSCAN``/``SCAN`` pages of 500 / 1,000); a script answers for the
keys of one call (32) or ``COUNT`` entries; ``CLUSTER SLOTS`` has at most 16,384 ranges,
``COMMAND`` a few hundred commands. Two grow with the deployment: an ``XREAD`` over many
keys (the daemon's over every key's ``:acks``) has one member per key with news, so up to
65,536 keys -- six times the largest count measured (10,000); and the daemon's rollout check
reads ``--history`` + 100 entries' marks in one script call, so ``--history`` up to 65,436
(default 100: each kept version is a whole content in Redis). What is left
to a hostile writer is entries just under the cap: 8 of 32,700 fields each (a worker's
batch) took the 4-``Subscriber`` process to 71 MiB and ``history`` to 62 MiB -- bounded, and
of the order of what 8 legitimate 1 MiB entries cost.
A reply of many such entries is bounded only by its ``COUNT``, which is legitimate for
events; the ack readers, whose replies are small, add a per-reply byte budget
(:mod:`subscriber._replybudget`, checked by ``Budget`` in ``read``/``readline`` here).

The change sits in redis-py's private parser internals (the sync ``SocketBuffer.read``,
``readline`` and ``_read_from_socket``, the parsers' ``_read_response``, the asyncio
parser's ``_read`` and ``_readline``), the same in every redis-py this
package admits (8.0.1 .. 8.2, checked by ``make test-oldest``). A reply cut short can't be
parsed again: redis-py rewinds a sync reply that failed part way (a timeout) to re-read it,
and re-parses an asyncio one that was cancelled, from bytes it kept -- and the dropped bytes
are gone. Such a connection therefore reports itself broken (``ConnectionError``, or "has
data" to the pool) and is replaced; by default redis-py closes a connection on any error
anyway. Speed: a plain read first tries ``_fastreply.read_whole`` (see there).

hiredis: ``[hiredis]`` installs a C parser that redis-py would pick by default. It has no
size limit (it buffers each reply whole), so hotreload's connections use these parsers
whether hiredis is installed or not: with it, they are exactly what they are without it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from redis._parsers import _RESP3Parser
from redis._parsers.socket import SocketBuffer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.utils import SENTINEL

from subscriber._fastreply import read_whole
from subscriber._replybudget import Budget
from subscriber.protocol import MAX_ENTRY_BYTES

if TYPE_CHECKING:
    import socket

__all__ = [
    "CHUNK",
    "COUNT_CAP",
    "DROPPED",
    "REPLY_CAP",
    "CappedParser",
    "Dropped",
    "Oversized",
    "TooMany",
    "parser_class",
]

# No legitimate bulk string is longer than a whole entry may be (see the module docstring).
REPLY_CAP = MAX_ENTRY_BYTES
# What a dropped bulk string costs at most at a time: one chunk read off the socket.
CHUNK = 64 * 1024
# No legitimate aggregate has more members (a map's counted in pairs); see the docstring.
COUNT_CAP = 65_536
_AGGREGATES = (b"*", b"~", b"%", b">")

CUT_AND_RETRIED = (
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


class TooMany(bytes):
    """Stands for an aggregate Redis sent with more than ``COUNT_CAP`` members: read off the
    socket and dropped member by member, never held.

    The reply holds ``[marker, marker]`` (a map: ``{marker: marker}``) in its place, so an
    entry whose fields were cut reads as one field named by the marker -- which
    ``_fields.field_map`` refuses, saying how many fields the entry had -- and any other
    reader sees a value that is not what it expects. ``members`` is the announced count;
    the bytes are a short note saying so.
    """

    members: int

    def __new__(cls, members: int) -> TooMany:
        value = super().__new__(
            cls, f"<{members} members, over the {COUNT_CAP}-member reply cap: not read>".encode()
        )
        value.members = members
        return value

    def __repr__(self) -> str:
        return self.decode()

    __str__ = __repr__


class Dropped(Oversized):
    """A bulk string dropped because its reply was over its budget (:func:`reply_budget`):
    one shared instance, whose ``len()`` is over ``REPLY_CAP`` so every size check refuses it."""

    def __new__(cls) -> Dropped:
        value = bytes.__new__(cls, b"<not read: the reply was over its byte budget>")
        value.size = REPLY_CAP + 1
        return value


DROPPED = Dropped()


def _cuts(budget: Budget, line: bytes) -> bool:
    """Whether a reply over its budget skips this header's aggregate whole."""
    return budget.over and line[:1] in _AGGREGATES and _members(line) > 2


def _members(line: bytes) -> int:
    """The members a header line announces (a map's in pairs); 0 for a null aggregate."""
    try:
        return max(0, int(line[1:]))
    except ValueError:
        raise InvalidResponse(f"Protocol Error: {line!r}") from None


def _step(line: bytes) -> tuple[int, int]:
    """What follows a header line when skipping: (bytes to drop, members to skip)."""
    kind = line[:1]
    if kind in (b"$", b"=", b"!"):
        size = _members(line)
        return (size + 2 if line[1:2] != b"-" else 0), 0
    if kind in (b"*", b"~", b">"):
        return 0, _members(line)
    if kind == b"%":
        return 0, 2 * _members(line)
    if kind == b"|":  # attributes: a map, then the value they describe
        return 0, 2 * _members(line) + 1
    if kind in (b"+", b"-", b":", b",", b"#", b"_", b"("):
        return 0, 0
    raise InvalidResponse(f"Protocol Error: {line!r}")


def _over(line: bytes) -> int:
    """The members of an aggregate header over ``COUNT_CAP``, else 0."""
    members = _members(line) if line[:1] in _AGGREGATES else 0
    return members if members > COUNT_CAP else 0


def _substitute(kind: bytes, members: int) -> object:
    if not members:  # cut by the budget: an empty aggregate of its kind
        return {} if kind == b"%" else []
    marker = TooMany(members)
    return {marker: marker} if kind == b"%" else [marker, marker]


class _CappedBuffer(SocketBuffer):
    """redis-py's socket buffer, dropping a bulk string over ``cap`` as it arrives."""

    def __init__(self, sock: socket.socket, socket_read_size: int, socket_timeout: Any) -> None:
        super().__init__(sock, socket_read_size, socket_timeout)
        self.too_many: object = None  # what stands for the aggregate cut last
        self.cut = False  # this reply dropped bytes: it cannot be rewound and read again
        self.broken = False  # a reply that dropped bytes failed part way: the stream is lost
        self.budget = Budget()

    def read(self, length: int, timeout: Any = SENTINEL) -> bytes:
        if self.broken:
            raise RedisConnectionError(CUT_AND_RETRIED)
        if length < 0:  # RESP2's null bulk string ($-1; RESP3 has _): nothing follows
            return None  # type: ignore[return-value]
        if length <= REPLY_CAP and self.budget.keeps(length):
            return super().read(length, timeout=timeout)
        self.cut = True
        self._skip(length + 2, timeout)  # the value and its \r\n
        return Oversized(length) if length > REPLY_CAP else DROPPED

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
            raise RedisConnectionError(CUT_AND_RETRIED)
        line = super().readline(timeout=timeout)
        members = _over(line)
        if not members and not _cuts(self.budget, line):
            return line
        self.cut = True
        kind, count = line[:1], _members(line)
        self._skip_members(2 * count if kind == b"%" else count, timeout)
        if kind == b">":  # an out-of-band push: dropped whole, the reply goes on
            return self.readline(timeout=timeout)
        self.too_many = _substitute(kind, members)
        return b"_"  # a null: the parser's _read_response returns ``too_many`` instead

    def _skip_members(self, count: int, timeout: Any) -> None:
        """Read ``count`` members (nested ones too) off the socket, holding none of them."""
        while count:
            line = super().readline(timeout=timeout)
            drop, more = _step(line)
            count += more - 1
            if drop:
                self._skip(drop, timeout)
            self._forget()

    def _forget(self) -> None:
        """Drop what was read so far from the buffer: a cut reply is never read again."""
        buf: io.BytesIO | None = self._buffer
        if buf is None or buf.closed or buf.tell() < CHUNK:
            return
        rest = buf.read()
        buf.seek(0)
        buf.truncate()
        buf.write(rest)
        buf.seek(0)

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

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        buf = self._buffer
        if buf is not None:
            buf.budget.start()
            if _plain(self, buf, args, kwargs):  # a whole small reply: one pass (_fastreply)
                whole, reply = read_whole(buf, REPLY_CAP, COUNT_CAP)
                if whole:
                    return reply
        return super().read_response(*args, **kwargs)  # type: ignore[misc]

    def _read_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super()._read_response(*args, **kwargs)  # type: ignore[misc]
        buf = self._buffer
        if buf is not None and buf.too_many is not None:  # this level's aggregate was cut
            response, buf.too_many = buf.too_many, None
        return response


def _plain(parser: Any, buf: _CappedBuffer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a read may take ``_fastreply``'s path: a plain read (no timeout of its own, no
    push wanted, decoding off), no byte budget, nothing cut."""
    encoder = parser.encoder
    return (
        not args
        and kwargs.get("timeout", SENTINEL) is SENTINEL
        and not kwargs.get("push_request")
        and not kwargs.get("disable_decoding")
        and buf.budget.left is None
        and not buf.broken
        and encoder is not None
        and not encoder.decode_responses
    )


class CappedParser(_Capped, _RESP3Parser):
    """redis-py's RESP3 parser with the reply cap, for either protocol (see the module
    docstring: redis-py would swap a RESP2 parser for its own RESP3 one)."""


def parser_class() -> type[Any]:
    """The capped parser for a sync connection (asyncio: ``_aioreplycap.AsyncCappedParser``)."""
    return CappedParser
