"""Replies read by ``subscriber._fastreply`` are what redis-py's capped parser reads.

Every hotreload connection's parser (``_replycap.CappedParser``) reads a whole small reply
with ``_fastreply.read_whole`` in one pass and leaves anything else to redis-py's parser
from the same position. Each test sends the same commands
to a real redis-server on two connections, one read by the fast reader, one by redis-py's
``read_response``, and compares what both return: value, type and shape, errors included,
over RESP3 and RESP2, for replies that arrive in one read and replies that take many, and
for a bulk string over the reply cap (which only the capped parser may read).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from subscriber import _replycap
from subscriber._pool import InterruptiblePool
from subscriber._redis import connect
from subscriber._replybudget import reply_budget
from subscriber._replycap import REPLY_CAP, Oversized
from subscriber._wire import pack
from subscriber.testing import RedisServer

# A Lua script answering with every shape a script can: nested arrays, integers, a null
# inside an array, a status, a bulk string (a Lua false is a null, a table with a nil stops)
SHAPES = "return {1, 'two', {3, {'four', false}}, {}, redis.status_reply('FIVE')}"


def _pair(url: str) -> tuple[redis.Redis, redis.Redis]:
    return (
        connect(url, socket_timeout=5, pool_class=InterruptiblePool),
        connect(url, socket_timeout=5, pool_class=InterruptiblePool),
    )


@pytest.fixture
def clients(redis_server: RedisServer) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    fast, slow = _pair(redis_server.url)
    yield fast, slow
    fast.close()
    slow.close()


def _declined(buf: Any, reply_cap: int, count_cap: int) -> tuple[bool, Any]:
    return False, None


def _round_trip(client: redis.Redis, commands: list[tuple[Any, ...]], *, fast: bool) -> list[Any]:
    """Send ``commands`` in one batch, read a reply each (``fast``: as every connection does;
    else by redis-py's capped parser alone)."""
    connection = cast("InterruptiblePool", client.connection_pool).held()
    connection.send_packed_command(pack(commands))
    replies: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(_replycap, "read_whole", _declined)
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                replies.append((type(exc), str(exc)))
    return replies


def _same(left: Any, right: Any) -> None:
    assert type(left) is type(right), (left, right)
    if isinstance(left, list):
        assert len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            _same(a, b)
    elif isinstance(left, dict):
        assert len(left) == len(right)
        for (key, value), (other_key, other_value) in zip(left.items(), right.items(), strict=True):
            _same(key, other_key)
            _same(value, other_value)
    elif isinstance(left, bytes):  # the keys' names differ by their prefix only
        assert left.replace(b"fast:", b"slow:") == right
    elif isinstance(left, tuple):  # a refused command: its class and message
        assert left[0] is right[0]
        assert left[1].replace("fast:", "slow:") == right[1]
    else:
        assert left == right


def _compare(fast: redis.Redis, slow: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``commands`` on both, each on its own keys (``K:`` becomes ``fast:`` or
    ``slow:``), and check the replies are the same."""

    def keyed(prefix: str) -> list[tuple[Any, ...]]:
        return [
            tuple(a.replace("K:", prefix) if isinstance(a, str) else a for a in command)
            for command in commands
        ]

    got = _round_trip(fast, keyed("fast:"), fast=True)
    want = _round_trip(slow, keyed("slow:"), fast=False)
    _same(got, want)
    return got


def test_every_reply_shape_reads_as_redis_py_reads_it(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    fast, slow = clients
    for client, prefix in ((fast, "fast:"), (slow, "slow:")):
        client.xadd(prefix + "s", {"a": "1", "content": b"\x00\xff" * 100}, id="1-1")
        client.hset(prefix + "h", mapping={"x": "1", "y": b"\r\n"})
    replies = _compare(fast, slow, [
        ("XREAD", "COUNT", 8, "STREAMS", "K:s", "0-0"),  # a map of arrays of bulk strings
        ("XREAD", "COUNT", 8, "BLOCK", 1, "STREAMS", "K:s", "$"),  # timed out: null
        ("XREVRANGE", "K:s", "+", "-", "COUNT", 1),
        ("HGETALL", "K:h"),  # a map
        ("HSET", "K:h", "z", "2"),  # an integer
        ("GET", "K:missing"),  # a null
        ("SET", "K:k", "v"),  # a status
        ("EVAL", SHAPES, 0),
        ("LPUSH", "K:h", "x"),  # refused: WRONGTYPE
        ("SMEMBERS", "K:nothing"),  # an empty set
        ("INCRBYFLOAT", "K:f", "1.5"),  # a bulk string
    ])  # fmt: skip
    assert replies[1] is None
    assert replies[5] is None
    assert replies[8][0] is redis.ResponseError


def test_resp2_replies_read_as_redis_py_reads_them(redis_server: RedisServer) -> None:
    fast, slow = _pair(redis_server.url + "?protocol=2")
    try:
        for client, prefix in ((fast, "fast:"), (slow, "slow:")):
            client.xadd(prefix + "s", {"a": "1"}, id="1-1")
        _compare(fast, slow, [
            ("XREAD", "COUNT", 8, "STREAMS", "K:s", "0-0"),
            ("XREAD", "COUNT", 8, "BLOCK", 1, "STREAMS", "K:s", "$"),  # RESP2's null array
            ("GET", "K:missing"),  # RESP2's null bulk string
            ("HGETALL", "K:s"),  # refused
            ("EVAL", SHAPES, 0),
        ])  # fmt: skip
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024 - 512])
def test_replies_over_many_reads_read_whole(
    clients: tuple[redis.Redis, redis.Redis], size: int
) -> None:
    fast, slow = clients
    value = bytes(range(256)) * (size // 256)
    for client, prefix in ((fast, "fast:"), (slow, "slow:")):
        client.xadd(prefix + "big", {"schema": "1", "content": value, "after": "x" * 100}, id="1-1")
    replies = _compare(fast, slow, [
        ("XREAD", "COUNT", 8, "STREAMS", "K:big", "0-0"),
        ("XREVRANGE", "K:big", "+", "-", "COUNT", 1),
        ("PING",),
    ])  # fmt: skip
    assert replies[1][0][1][3] == value


def test_a_bulk_string_over_the_cap_is_left_to_the_capped_parser(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    fast, _slow = clients
    fast.set("huge", b"x" * (REPLY_CAP + 1))
    replies = _round_trip(fast, [("GET", "huge"), ("PING",)], fast=True)
    assert isinstance(replies[0], Oversized)
    assert len(replies[0]) == REPLY_CAP + 1
    assert replies[1] == b"PONG"  # and the connection is still in step
    assert fast.ping()


def test_a_reply_under_a_byte_budget_is_read_with_the_budget(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    fast, slow = clients
    for client, prefix in ((fast, "fast:"), (slow, "slow:")):
        client.xadd(prefix + "acks", {"error": "e" * 4000}, id="1-1")
    with reply_budget(1000):
        _compare(fast, slow, [("XREVRANGE", "K:acks", "+", "-")])


def test_a_whole_reply_is_parsed_in_one_pass_and_an_error_by_redis_py(
    clients: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = clients
    fast.xadd("fast:s", {"content": b"x" * 1024})
    parser = cast("InterruptiblePool", fast.connection_pool).held()._parser
    parsed: list[bytes] = []
    original = parser._read_response

    def counted(*args: Any, **kwargs: Any) -> Any:
        parsed.append(b"")
        return original(*args, **kwargs)

    monkeypatch.setattr(parser, "_read_response", counted)
    replies = _round_trip(
        fast,
        [("XREAD", "COUNT", 8, "STREAMS", "fast:s", "0-0"), ("LPUSH", "fast:s", "x")],
        fast=True,
    )
    assert replies[0][b"fast:s"][0][1][1] == b"x" * 1024
    assert replies[1][0] is redis.ResponseError
    assert len(parsed) == 1  # the refusal alone: redis-py builds its exception


def test_a_declined_reply_keeps_nothing_of_its_callers_alive(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    """A reply the fast path leaves to redis-py (here an error) must not keep the stack that
    read it alive: a shared exception instance kept its last raise's traceback, and with it
    every caller's frame (a failed ``Subscriber.start()`` stayed in the registry)."""
    import gc
    import weakref

    class Caller:
        pass

    def read_with(caller: Caller) -> Any:
        (reply,) = _round_trip(clients[0], [("NO-SUCH-COMMAND",)], fast=True)
        assert "unknown command" in str(reply)  # an error: declined, redis-py read it
        return caller

    caller = Caller()
    gone = weakref.ref(read_with(caller))
    del caller
    gc.collect()
    assert gone() is None
