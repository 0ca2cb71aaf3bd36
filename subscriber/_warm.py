"""Run, once in the gunicorn master, the connection code every worker's subscriber runs first.

Under ``preload_app`` a worker shares the master's pages until it writes to them. CPython 3.11
writes into a function's code object on its first calls (a warm-up counter, then the
bytecode quickened and specialised in place, with its inline caches), and much code fills
a cache of its own on first use (a logger's level cache, ...). Code that already ran in the
master was quickened there, before the fork, so the worker's calls only touch reference
counts. ``pre_fork`` (``subscriber.gunicorn``) therefore calls :func:`warm`: the subscriber's
own connection (``_light``) makes its handshake and reads one cycle's replies -- an entry,
a blocked read that timed out, a refused command -- from a ``socket.socketpair()`` whose
other end holds canned replies. No network, no thread, no Redis; nothing is kept.

What it saves, and what it does not, is in docs/performance.md (memory per gunicorn worker).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterable

from subscriber._light import Connection
from subscriber._target import parse
from subscriber._wire import Batch

__all__ = ["warm"]

_ENTRY_ID = b"1700000000000-0"
_ENTRY = b"*2\r\n$15\r\n%s\r\n*4\r\n$1\r\nv\r\n$1\r\n1\r\n$1\r\nc\r\n$2\r\nab\r\n" % _ENTRY_ID
# the replies, in order, to the commands warm() sends (a Redis 7.0 refuses CLIENT SETINFO)
_REPLIES = b"".join(
    (
        b"%1\r\n+proto\r\n:3\r\n",  # HELLO 3
        b"+OK\r\n",  # CLIENT SETNAME
        b"-ERR unknown subcommand 'SETINFO'\r\n",  # CLIENT SETINFO LIB-NAME
        b"+OK\r\n",  # CLIENT SETINFO LIB-VER
        b":7\r\n",  # CLIENT ID
        b":1\r\n",  # HSET
        b"$15\r\n" + _ENTRY_ID + b"\r\n",  # XADD
        b"*1\r\n" + _ENTRY,  # XREVRANGE
        b"%1\r\n$1\r\nk\r\n*1\r\n" + _ENTRY,  # XREAD: one entry
        b"_\r\n",  # XREAD: nothing before the block ended
        b"-NOPERM no permissions\r\n",  # a refused command
    )
)


def warm(loggers: Iterable[logging.Logger] = ()) -> list[object]:
    """One handshake and one cycle of the subscriber's connection, in-process (see above),
    and ``loggers``' level caches filled (what a subscriber's first log line does). Returns
    the cycle's replies."""
    ours, theirs = socket.socketpair()
    connection = Connection(parse("unix:///hotreload-warm.sock"), 1.0, 1.0, "hotreload-warm")
    try:
        theirs.sendall(_REPLIES)
        connection._sock = ours
        connection._handshake()
        batch = Batch()
        batch.command("CLIENT", "ID")
        batch.hset("k:workers", "w", b"{}")
        batch.xadd("k:acks", {"v": 1, "c": b"ab"}, maxlen=1000)
        batch.xrevrange("k", count=1)
        batch.xread({"k": "0-0"}, count=1000, block=1)
        batch.xread({"k": "0-0"}, count=1000, block=1)
        batch.command("CLIENT", "UNBLOCK", 7)
        connection.send_packed_command(batch.pack())
        replies = batch.results(connection.read_response, raise_on_error=False)
    finally:
        connection.disconnect()
        with contextlib.suppress(OSError):
            theirs.close()
    for logger in loggers:
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logger.isEnabledFor(level)
    return replies
