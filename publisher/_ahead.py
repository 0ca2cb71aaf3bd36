"""The daemon's next check, sent ahead of it and read in one pass: an idle check costs a
wake-up and a few microseconds, not two wake-ups and redis-py's layers.

An idle daemon's loop checks Redis every second (``publisher.upkeep``). It slept until the
check was due, sent it through redis-py and slept again until the reply came back: two
wake-ups a second, each running redis-py's pool, parser and reply wrappers on an idle
process whose caches other work has emptied. A thread waking once a second costs ~0.01 % of
a core here; one that also sent the check through ``Upkeep`` then ~0.045 %, and one that sent
it on a raw socket and read the reply with ``recv`` and two regular expressions ~0.016 %
(30 s each, side by side, load 3.7). So it is the Python run per check, more than the
wake-ups, that an idle check costs, and both are cut here:

- the check's commands go out right after the previous check, behind a blocking read that
  makes Redis run them only when the next check is nearly due: ``XREAD BLOCK`` (``interval``
  minus ``LEAD``, in steps of ``_STEP_MS``) on a stream nothing writes (``WAIT_KEY``), then
  the check's ``INFO`` (and, when that check is a sweep, the sweep's script call). Redis
  ends a block within its event loop's 100 ms tick (``hz 10``: 850 ms blocks ended after
  890-921 ms), so the replies are in the socket when the loop wakes for the check: no
  second wake-up, and what they say is at most ``LEAD`` plus a tick old;
- they are read on the connection's socket directly, all at once (one ``recv``), and parsed
  by index (``subscriber._fastreply``); the command is packed once while its block and key
  stay. The connection is taken from the client's pool (redis-py made it: TLS, AUTH,
  ``HELLO``) and kept; redis-py's parser never reads it again, so no reply is split between
  the two.

Replies that may be older are not trusted, and the check is asked again as before: an
``XREAD`` that returned an entry (someone wrote to ``WAIT_KEY``), or a check later than its
time by more than ``_LATE`` (the loop was busy publishing); nor are replies this reader
cannot parse or over ``_MAX_REPLIES`` (a big entry written there): the connection is dropped
and the check asked again, never a reconnect of the daemon. A lost or frozen
connection raises what redis-py raises for one (``ConnectionError``, ``TimeoutError`` after
the client's socket timeout): the loop reconnects, as after any failed check.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import redis
from redis._parsers import BaseParser
from redis.exceptions import NoPermissionError

from subscriber._fastreply import _Short, _value
from subscriber._replycap import COUNT_CAP, REPLY_CAP
from subscriber._wire import pack

__all__ = ["LEAD", "WAIT_KEY", "Ahead"]

logger = logging.getLogger(__name__)

LEAD = 0.1  # s: the commands run this much (+ up to _STEP_MS, + Redis's tick) before the check
_STEP_MS = 50  # the block is rounded down to this: the same command, packed once, every check
_LATE = 0.1  # s: a check later than its time asks again (its replies may be this much older)
_MIN_BLOCK_MS = 100  # shorter intervals (tests) are checked as before, nothing sent ahead
_PROBE = (("INFO", "server"), ("INFO", "keyspace"))
_MAX_REPLIES = 1 << 20  # bytes: a check's replies are a few KiB (a sweep's: a few bytes a key)
# The stream the read blocks on: the events stream of a name no config key can have ('~' is
# not allowed in one), which the publisher user may read (and only the publisher write):
# nothing ever ends the block but its timeout. A key's ``:control``, which operators write
# to, woke it with their requests -- a flood of big ones made every check read them.
WAIT_KEY = "{prefix}:{{~idle-check}}:events"


class Ahead:
    """The commands of the next check, sent after the previous one (standalone Redis)."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._connection: Any = None  # taken from ``_pool``, kept; read here only
        self._count = 0  # replies in flight after the XREAD's (0: nothing sent)
        self._due = 0.0  # when the check that reads them is due (``time.monotonic()``)
        self._packed: tuple[tuple[int, str], bytes] | None = None  # (block, key) -> probe
        self._refused = False  # the XREAD was refused (an ACL without it): send nothing

    def can_send(self, due: float) -> bool:
        """Whether a check due at ``due`` would be sent ahead now."""
        return not self._refused and _block_ms(due) >= _MIN_BLOCK_MS

    def send(
        self, client: redis.Redis, wait_key: str, due: float, extra: Sequence[Any] = ()
    ) -> bool:
        """Send the check (``INFO server``, ``INFO keyspace``) and ``extra`` commands to run
        about ``LEAD`` before ``due``, behind an ``XREAD BLOCK`` on ``wait_key``; False when
        nothing is sent (a short interval, or the read was refused)."""
        block = _block_ms(due)
        if self._refused or block < _MIN_BLOCK_MS:
            return False
        if self._count:
            self.drop()  # not read: it was not needed (the loop reconnected, or so)
        pool = client.connection_pool
        if self._connection is None or self._pool is not pool:
            self.drop()
            self._pool, self._connection = pool, pool.get_connection()
        if self._packed is None or self._packed[0] != (block, wait_key):
            xread = ("XREAD", "BLOCK", block, "STREAMS", wait_key, "$")
            self._packed = ((block, wait_key), b"".join(pack([xread, *_PROBE])))
        data = self._packed[1]
        if extra:
            data += b"".join(pack(list(extra)))
        try:
            sock = self._connection._sock
            if sock is None:
                self._connection.connect()
                sock = self._connection._sock
            sock.sendall(data)
        except BaseException as exc:  # noqa: BLE001 - raised again, as redis-py would
            self.drop()
            _raise_lost(exc)
        self._count, self._due = len(_PROBE) + len(extra), due
        return True

    def take(self) -> list[Any] | None:
        """The replies of what was sent ahead (an error reply as its exception), or None:
        nothing sent, or replies older than ``LEAD`` may be (ask again). Raises what a lost
        connection raises."""
        count, self._count = self._count, 0
        if not count:
            return None
        late = time.monotonic() > self._due + _LATE
        try:
            replies = _read(self._connection._sock, 1 + count)
        except _Unexpected as exc:  # junk on the read's stream (see the module docstring)
            logger.debug("the check sent ahead read junk: %s; asking again", exc)
            self.drop()
            return None
        except BaseException as exc:  # noqa: BLE001 - raised again, as redis-py would
            self.drop()
            _raise_lost(exc)
        woke = replies.pop(0)
        if isinstance(woke, NoPermissionError):  # an ACL without XREAD there: not again
            logger.info("checking Redis without a blocking read ahead: %s", woke)
            self._refused = True
        # an entry or an error (UNBLOCKED: the master became a replica) ended the block
        # early, or the check came late: the replies may be older than LEAD
        if woke or late:
            return None
        return replies

    def drop(self) -> None:
        """Forget what was sent (its replies unread) and give the connection back."""
        connection, pool = self._connection, self._pool
        self._connection, self._pool, self._count = None, None, 0
        if connection is not None:
            connection.disconnect()  # unread replies: never back to the pool with them
            pool.release(connection)


class _Unexpected(Exception):
    """A reply the check cannot have asked for (an entry on the read's stream too big to
    parse here, or more than the bound): the connection is dropped, the check asked again."""


def _block_ms(due: float) -> int:
    """How long the ``XREAD`` blocks for commands that should run ``LEAD`` before ``due``."""
    return int((due - time.monotonic() - LEAD) * 1000) // _STEP_MS * _STEP_MS


def _read(sock: socket.socket | None, count: int) -> list[Any]:
    """``count`` replies from ``sock``: received whole (a ``recv`` at a time while one is
    short: all at once when they are already there) and parsed by index."""
    if sock is None:
        raise redis.ConnectionError("the connection of the check sent ahead was closed")
    data = b""
    replies: list[Any] = []
    pos = 0
    while len(replies) < count:
        try:
            reply, pos = _one(data, pos)
        except _Short:
            if len(data) > _MAX_REPLIES:
                raise _Unexpected(f"replies over {_MAX_REPLIES} bytes") from None
            chunk = sock.recv(65536)
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection") from None
            data += chunk
            continue
        replies.append(reply)
    if pos != len(data):
        raise _Unexpected("more replies than commands sent")
    return replies


def _one(data: bytes, pos: int) -> tuple[Any, int]:
    """The reply at ``pos`` (an error reply as its exception) and the position after it."""
    if pos >= len(data):
        raise _Short(pos + 1)
    kind = data[pos]
    try:
        if kind == 45:  # - error
            end = data.find(b"\r\n", pos)
            if end < 0:
                raise _Short(len(data) + 1)
            return _error(data[pos + 1 : end].decode(errors="replace")), end + 2
        if kind == 61:  # = RESP3's verbatim string (INFO's reply): b"txt:" + the text
            text, end = _bulk(data, pos)
            return text[4:], end
        return _value(data, pos, REPLY_CAP, COUNT_CAP)
    except _Short:
        raise
    except Exception as exc:  # declined (a shape the check never gets) or malformed
        raise _Unexpected(f"unexpected reply: {exc!r}") from exc


def _bulk(data: bytes, pos: int) -> tuple[bytes, int]:
    """The bulk or verbatim string at ``pos`` (``$`` or ``=``): its bytes, and the end."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Short(len(data) + 1)
    stop = end + 2 + int(data[pos + 1 : end])
    if len(data) < stop + 2:
        raise _Short(stop + 2)
    return data[end + 2 : stop], stop + 2


def _error(message: str) -> redis.RedisError:
    """The exception redis-py's parser makes of an error reply (NOPERM, NOSCRIPT, LOADING, ...)."""
    return cast(redis.RedisError, BaseParser.parse_error(message))  # type: ignore[no-untyped-call]


def _raise_lost(exc: BaseException) -> NoReturn:
    """Raise what redis-py raises for a failed read or write: a timeout, a lost connection."""
    if isinstance(exc, socket.timeout):
        raise redis.TimeoutError("Timeout reading the check sent ahead") from exc
    if isinstance(exc, OSError):
        raise redis.ConnectionError(f"Error reading the check sent ahead: {exc}") from exc
    raise exc
