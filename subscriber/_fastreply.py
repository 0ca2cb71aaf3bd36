"""A reply already whole in the connection's buffer, parsed in one pass over its bytes.

Every worker parses the ``XREAD`` reply that brings a new version, all N of them at once on
the same cores (issue 21): each microsecond of CPU there is paid N times before the last
worker applies. redis-py's pure-Python RESP3 parser (hiredis is not used: it has no size
cap, ``_replycap``) reads a reply line by line, each line through ``SocketBuffer.readline``
(a ``BytesIO.readline``, a closed-buffer check), each bulk string through ``read`` (two
copies), plus the cap's wrappers around both: an ``XREAD`` reply of one 1 KiB entry is 22
lines, 66 such calls, about 50 of the worker's 150 µs of CPU per cycle (``time.thread_time``
around the hub's cycle, 5 x 2,000 cycles). Here the bytes that arrived are taken at once and
parsed by index (``bytes.find`` for each line's end, slices for the values); the asyncio
transport does the same for its stream reader (``_aiopool``).

The capped parser (``_replycap.CappedParser.read_response``) tries this first for every
plain read on every hotreload connection (the workers', the daemon's, the CLI's). Only what
is plainly whole and plainly small is read here; anything else is *declined* and read by
redis-py's capped parser from the very same position, as before (nothing was consumed): a
reply still incomplete after ``_MAX_FILLS`` reads, a bulk string over ``reply_cap`` or an
aggregate over ``count_cap`` (the cap drops them as they arrive), an error reply (redis-py
builds its exception classes), a push, an attribute, a double, a big number, a verbatim
string, a read with a timeout of its own, a connection whose buffer was cut (``broken``),
one that decodes responses, and every reply read under a byte budget (``_replybudget``: the
ack readers). The values are what redis-py returns for the same bytes (``bytes`` for bulk
and simple strings, ``int``, ``None`` for nulls, ``list`` for arrays and sets, ``dict`` for
maps, ``[]`` for RESP2's null array): ``tests/test_fastreply.py`` checks each shape against
redis-py's parser. Waiting for a reply is redis-py's own ``SocketBuffer._read_from_socket``,
inside the parser: a timeout, a closed or interrupted socket raise there what they raise in
redis-py's read, and ``Connection.read_response`` handles them as ever.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["read_whole"]


class _Declined(Exception):
    """The fast path leaves this reply to redis-py's parser. Raised as a new instance each
    time: one shared instance kept the traceback of its last raise, and with it every frame
    of that stack (a ``Subscriber`` whose ``start()`` had failed, the reply's buffer) until
    the next decline (found by test_subscriber's registry test in session 7)."""


class _Short(Exception):
    """The reply is not whole yet: the buffer must hold at least ``need`` bytes."""

    def __init__(self, need: int) -> None:
        self.need = need


# Reads a reply may take here before it is left to redis-py (a reply trickling in line by
# line would be parsed again from its start after each one)
_MAX_FILLS = 4
_FAILED_PARSE = (_Declined, ValueError, IndexError, TypeError, RecursionError)
_NOT_READ = (False, None)


def read_whole(buf: Any, reply_cap: int, count_cap: int) -> tuple[bool, Any]:
    """``(True, reply)``: the next reply, read (waiting for it: a ``recv`` at a time, at
    most ``_MAX_FILLS``) and parsed here; ``(False, None)``: left to the caller's parser,
    which reads on from the same position (nothing was consumed, bytes may have arrived).
    ``buf``: redis-py's ``SocketBuffer`` (``_replycap._CappedBuffer``); a bulk string over
    ``reply_cap`` or an aggregate over ``count_cap`` members is declined (the cap's cases).
    A failed ``recv`` raises what redis-py's own read raises there."""
    bio: io.BytesIO | None = buf._buffer
    if bio is None or bio.closed:
        return _NOT_READ
    try:
        pos = bio.tell()
        size = bio.seek(0, io.SEEK_END)
        bio.seek(pos)
    except ValueError:  # closed meanwhile: redis-py's read says so
        return _NOT_READ
    need = pos + 1  # at least one byte of the reply
    for _ in range(_MAX_FILLS):
        if size < need:
            buf._read_from_socket(length=need - size)
        try:
            data = bio.getvalue()
        except ValueError:
            return _NOT_READ
        size = len(data)
        try:
            reply, end = _value(data, pos, reply_cap, count_cap)
        except _Short as short:
            need = max(short.need, size + 1)
            continue
        except _FAILED_PARSE:
            return _NOT_READ
        bio.seek(end)
        buf.purge()  # as redis-py after a reply: the buffer is emptied once all is read
        return True, reply
    return _NOT_READ


def _value(data: bytes, pos: int, reply_cap: int, count_cap: int) -> tuple[Any, int]:
    """The RESP value at ``pos``: (value, the position after it). ``_Short``: not whole
    yet; ``_Declined`` (or ``ValueError``, ...: malformed): not for this path."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Short(len(data) + 1)
    kind = data[pos]
    if kind == 36:  # $ bulk string
        size = int(data[pos + 1 : end])
        if size < 0:
            return None, end + 2  # RESP2's null bulk string
        if size > reply_cap:
            raise _Declined
        start = end + 2
        stop = start + size
        if data[stop : stop + 2] != b"\r\n":
            if len(data) < stop + 2:
                raise _Short(stop + 2)
            raise _Declined  # malformed: redis-py says how
        return data[start:stop], stop + 2
    if kind in {42, 126}:  # * array, ~ set
        count = int(data[pos + 1 : end])
        if count > count_cap:
            raise _Declined
        pos = end + 2
        items: list[Any] = []
        append = items.append
        for _ in range(count):  # a negative count (RESP2's null array): [] as redis-py
            if data[pos : pos + 1] == b"$":  # a bulk string, inline: most members are
                end = data.find(b"\r\n", pos)
                if end < 0:
                    raise _Short(len(data) + 1)
                size = int(data[pos + 1 : end])
                if size < 0:
                    append(None)
                    pos = end + 2
                    continue
                if size > reply_cap:
                    raise _Declined
                start = end + 2
                pos = start + size
                if data[pos : pos + 2] != b"\r\n":
                    if len(data) < pos + 2:
                        raise _Short(pos + 2)
                    raise _Declined
                append(data[start:pos])
                pos += 2
            else:
                item, pos = _value(data, pos, reply_cap, count_cap)
                append(item)
        return items, pos
    if kind == 37:  # % map
        count = int(data[pos + 1 : end])
        if count > count_cap:
            raise _Declined
        pos = end + 2
        mapping: dict[Any, Any] = {}
        for _ in range(count):
            key, pos = _value(data, pos, reply_cap, count_cap)
            mapping[key], pos = _value(data, pos, reply_cap, count_cap)
        return mapping, pos
    if kind == 58:  # : integer
        return int(data[pos + 1 : end]), end + 2
    if kind == 95:  # _ null
        return None, end + 2
    if kind == 43:  # + simple string
        return data[pos + 1 : end], end + 2
    raise _Declined
