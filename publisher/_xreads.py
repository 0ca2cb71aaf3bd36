"""Blocking ``XREAD``s over many streams for the daemon's reader threads (the ack follower's
``:acks``, the ``:control`` reader's requests), and their cluster stand-in, a poll.

An idle daemon sends the same ``XREAD`` again and again (its cursors move only when an entry
arrives), so ``PackedXRead`` packs it once while its arguments stay: redis-py packed every
argument anew each call, 1.2 ms for the 2,000 of 1,000 keys' streams. Commands may ride
behind it (``behind``): Redis runs them when the read returns, and their replies come in the
same packet, so a thread that needs to ask something when its block runs out (the ack
follower's tick) wakes once, not twice (each wake-up of an idle daemon's thread is ~0.3 ms
of CPU here, ``tests.benchmarks.profile_idle``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.crc import key_slot

from publisher.inspect.events import MAX_ACKS
from subscriber._wire import pack

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = ["PackedXRead"]

_Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


class PackedXRead:
    """A blocking ``XREAD`` over many streams whose packed command is kept while its
    arguments stay, and the commands riding behind it (``behind``: their replies, or the
    ``ResponseError`` of one Redis refused). The connection comes from the client's pool as
    for any command, so ``stop()`` interrupts it as before."""

    def __init__(self) -> None:
        self._args: tuple[object, ...] = ()
        self._packed: list[bytes | memoryview] = []

    def __call__(
        self,
        client: redis.Redis,
        cursors: Mapping[str, bytes | str],
        count: int,
        block: int,
        behind: Sequence[tuple[str, ...]] = (),
    ) -> tuple[_Reply, list[Any]]:
        args = (
            ("XREAD", "COUNT", count, "BLOCK", block, "STREAMS", *cursors, *cursors.values()),
            *behind,
        )
        if args != self._args:
            self._args, self._packed = args, pack(list(args))
        pool = client.connection_pool
        connection: Any = pool.get_connection()
        try:
            connection.send_packed_command(self._packed)
            raw = connection.read_response()
            after = [_answer(connection) for _ in behind]
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        return _xread_reply(raw), after


def _answer(connection: Any) -> Any:
    try:
        return connection.read_response()
    except redis.ResponseError as exc:  # the connection stays in step: its reply is read
        return exc


def _xread_reply(raw: Any) -> _Reply:
    """``[(stream, [(id, fields)])]`` as redis-py's ``xread`` returns it, from the raw reply:
    ``None`` (the block ran out), RESP2's list of pairs or RESP3's map."""
    if not raw:
        return []
    streams = raw.items() if isinstance(raw, dict) else raw
    return [
        (
            stream,
            [
                (entry_id, dict(zip(fields[::2], fields[1::2], strict=False)) if fields else {})
                for entry_id, fields in entries or ()
            ],
        )
        for stream, entries in streams
    ]


def _poll(client: RedisCluster, cursors: dict[str, bytes | str]) -> _Reply:
    """What is new after each cursor, read without blocking: one ``XREAD`` per slot (a
    multi-slot ``XREAD`` is CROSSSLOT), all in one pipeline (a round trip per node)."""
    by_slot: dict[int, dict[Any, Any]] = {}
    for stream, cursor in cursors.items():
        by_slot.setdefault(key_slot(stream.encode()), {})[stream] = cursor
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for streams in by_slot.values():
        pipe.xread(streams, count=MAX_ACKS)
    reply: _Reply = []
    for part in pipe.execute():
        reply += part or []
    return reply
