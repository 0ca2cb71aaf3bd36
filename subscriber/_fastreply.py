"""A reply already whole in the connection's buffer, parsed in one pass over its bytes.

Every worker parses the ``XREAD`` reply that brings a new version, all N of them at once on
the same cores (issue 21): each microsecond of CPU there is paid N times before the last
worker applies. redis-py's pure-Python RESP3 parser (hiredis is not used: it has no size
cap, ``_replycap``) reads a reply line by line, each line through ``SocketBuffer.readline``
(a ``BytesIO.readline``, a closed-buffer check), each bulk string through ``read`` (two
copies), plus the cap's wrappers around both: an ``XREAD`` reply of one 1 KiB entry is 22
lines, 66 such calls, about 50 of the worker's 150 µs per cycle (``time.thread_time``,
``tests/benchmarks/profile_cycle.py``). Here the bytes that arrived are taken at once and
parsed by index (``bytes.index`` for each line's end, slices for the values).

Only what is plainly whole and plainly small is read here; anything else is *declined* and
read by redis-py's capped parser from the very same position, as before (nothing was
consumed): a reply not yet whole (a 64 KiB entry arriving in several reads), a bulk string
over ``REPLY_CAP`` or an aggregate over ``COUNT_CAP`` (the cap drops them as they arrive),
an error reply (redis-py builds its exception classes), a push, an attribute, a double, a
big number, a verbatim string, a connection whose buffer was cut (``broken``), one that
decodes responses, and every reply read under a byte budget (``_replybudget``: the ack
readers). The values are what redis-py returns for the same bytes (``bytes`` for bulk and
simple strings, ``int``, ``None`` for nulls, ``list`` for arrays and sets, ``dict`` for
maps, ``[]`` for RESP2's null array): ``tests/test_fastreply.py`` checks each shape against
redis-py's parser.

Waiting for a reply is one ``recv`` through redis-py's own ``SocketBuffer._read_from_socket``;
a failure there is handled as ``Connection.read_response`` handles it (the connection is
disconnected, a timeout is a ``TimeoutError``, an ``OSError`` a ``ConnectionError``, both
naming the server).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from subscriber._replybudget import _BUDGET
from subscriber._replycap import COUNT_CAP, REPLY_CAP, CappedParser

__all__ = ["reader"]


class _Declined(Exception):
    """The fast path leaves this reply to redis-py's parser."""


class _Short(Exception):
    """The reply is not whole yet: the buffer must hold at least ``need`` bytes."""

    def __init__(self, need: int) -> None:
        self.need = need


_DECLINED = _Declined()
# Reads a reply may take here before it is left to redis-py (a reply trickling in line by
# line would be parsed again from its start after each one)
_MAX_FILLS = 4
_FAILED_PARSE = (_Declined, ValueError, IndexError, TypeError, RecursionError)


def reader(connection: Any) -> Callable[[], Any]:
    """``connection.read_response``, reading whole small replies in one pass (see the
    module); the connection's own method when its parser is not the capped one. Made once
    per connection (kept on it)."""
    read: Callable[[], Any] | None = getattr(connection, "_hotreload_read", None)
    if read is None:
        read = connection._hotreload_read = _reader(connection)
    return read


def _reader(connection: Any) -> Callable[[], Any]:
    read_response: Callable[[], Any] = connection.read_response
    parser = getattr(connection, "_parser", None)
    encoder = getattr(connection, "encoder", None)
    if type(parser) is not CappedParser or getattr(encoder, "decode_responses", True):
        return read_response

    def read() -> Any:
        buf = parser._buffer
        if buf is None or buf.broken or _BUDGET.get() is not None:
            return read_response()
        bio: io.BytesIO | None = buf._buffer
        if bio is None or bio.closed:
            return read_response()
        pos = bio.tell()
        size = bio.seek(0, io.SEEK_END)
        bio.seek(pos)
        need = pos + 1  # at least one byte of the reply
        for _ in range(_MAX_FILLS):
            if size < need:
                _fill(connection, buf, need - size)
            try:
                data = bio.getvalue()
            except ValueError:  # closed by another thread (redis-py's own answer to that)
                raise RedisConnectionError("Connection closed by server.") from None
            size = len(data)
            try:
                value, end = _value(data, pos)
            except _Short as short:
                need = max(short.need, size + 1)
                continue
            except _FAILED_PARSE:
                break
            bio.seek(end)
            buf.purge()
            return value
        return read_response()  # from ``pos``: nothing was consumed

    return read


def _fill(connection: Any, buf: Any, length: int) -> None:
    """Read at least ``length`` bytes into ``buf`` (recv by recv), failures as
    ``Connection.read_response`` reports them."""
    try:
        buf._read_from_socket(length=length)
    except RedisTimeoutError:
        connection.disconnect()
        raise RedisTimeoutError(f"Timeout reading from {_host(connection)}") from None
    except OSError as exc:
        connection.disconnect()
        raise RedisConnectionError(
            f"Error while reading from {_host(connection)} : {exc.args}"
        ) from exc
    except BaseException:
        connection.disconnect()
        raise


def _host(connection: Any) -> str:
    describe = getattr(connection, "_host_error", None)
    return str(describe()) if callable(describe) else "Redis"


def _value(data: bytes, pos: int) -> tuple[Any, int]:
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
        if size > REPLY_CAP:
            raise _DECLINED
        start = end + 2
        stop = start + size
        if data[stop : stop + 2] != b"\r\n":
            if len(data) < stop + 2:
                raise _Short(stop + 2)
            raise _DECLINED  # malformed: redis-py says how
        return data[start:stop], stop + 2
    if kind in {42, 126}:  # * array, ~ set
        count = int(data[pos + 1 : end])
        if count > COUNT_CAP:
            raise _DECLINED
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
                if size > REPLY_CAP:
                    raise _DECLINED
                start = end + 2
                pos = start + size
                if data[pos : pos + 2] != b"\r\n":
                    if len(data) < pos + 2:
                        raise _Short(pos + 2)
                    raise _DECLINED
                append(data[start:pos])
                pos += 2
            else:
                item, pos = _value(data, pos)
                append(item)
        return items, pos
    if kind == 37:  # % map
        count = int(data[pos + 1 : end])
        if count > COUNT_CAP:
            raise _DECLINED
        pos = end + 2
        mapping: dict[Any, Any] = {}
        for _ in range(count):
            key, pos = _value(data, pos)
            mapping[key], pos = _value(data, pos)
        return mapping, pos
    if kind == 58:  # : integer
        return int(data[pos + 1 : end]), end + 2
    if kind == 95:  # _ null
        return None, end + 2
    if kind == 43:  # + simple string
        return data[pos + 1 : end], end + 2
    raise _DECLINED
