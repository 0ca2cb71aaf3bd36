"""The reply cap on members (issue 23): an aggregate announcing more than ``COUNT_CAP``
members is read off the socket and dropped member by member, a ``TooMany`` in its place.

Real redis-server processes, real worker and CLI processes (peak RSS from VmHWM); the
byte side of the cap is tests/test_reply_cap.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from hashlib import sha256
from typing import Any, cast

import pytest
import redis

from subscriber._redis import connect_async
from subscriber._replycap import COUNT_CAP, TooMany
from subscriber.protocol import Ack, encode_ack
from subscriber.testing import RedisServer, append_event
from tests.conftest import Processes
from tests.helpers import slow_link
from tests.test_reply_cap import (
    BOUND_MIB,
    KEY,
    KEYS,
    KINDS,
    measured,
    refused_by_all,
    worker_meets,
)

MiB = 1024 * 1024

FIELDS = 300_000  # tiny fields of one hostile entry: 600,000 members, 9x the cap


def hostile_entry(client: redis.Redis, version: int) -> None:
    """An events entry of ``FIELDS`` tiny fields, as the subscriber user may XADD."""
    fields: list[Any] = ["version", str(version)]
    for n in range(FIELDS):
        fields += [f"f{n}", "x"]
    cast(Any, client).execute_command("XADD", KEYS.events, "*", *fields)


def cut(value: Any) -> tuple[int, list[str]]:
    """How many members a reply has and the types of its first two (a failure's diff stays
    small: pytest would diff a 65,537-member list against two)."""
    return len(value), [type(member).__name__ for member in list(value)[:2]]


def queue(pipe: Any) -> None:
    """A round trip of replies, two of them cut, each followed by one that is not."""
    pipe.lrange("over", 0, -1)
    pipe.get("small")
    pipe.hgetall("map")
    pipe.xrange("s")
    pipe.get("small")


def test_an_aggregate_over_the_cap_is_dropped_and_the_connection_stays_usable(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    client.rpush("at", *[b"x"] * COUNT_CAP)
    client.rpush("over", *[b"x"] * (COUNT_CAP + 1))
    client.hset("map", mapping={f"f{n}": "x" for n in range(COUNT_CAP + 1)})
    assert len(client.lrange("at", 0, -1)) == COUNT_CAP  # at the cap: read whole
    over = cast(list[Any], client.lrange("over", 0, -1))
    assert cut(over) == (2, ["TooMany", "TooMany"])
    assert over[0].members == COUNT_CAP + 1
    assert client.ping() is True
    # nested: the cut aggregate is an entry's fields, inside the reply's entry list
    client.xadd("s", {"a": "1"})
    cast(Any, client).execute_command(
        "XADD", "s", "*", *[x for n in range(COUNT_CAP) for x in (f"f{n}", "x")]
    )
    client.xadd("s", {"b": "2"})
    entries = cast(list[Any], client.xrange("s"))
    assert [list(fields) for _, fields in entries][::2] == [[b"a"], [b"b"]]
    (marker,) = entries[1][1]
    assert isinstance(marker, TooMany)
    assert marker.members == 2 * COUNT_CAP
    assert client.get("nothing") is None
    assert client.hlen("map") == COUNT_CAP + 1

    # replies read in one round trip: a cut one never eats into the next
    client.set("small", "s")
    pipe = client.pipeline(transaction=False)
    queue(pipe)
    over, small, mapped, entries, again = pipe.execute()
    assert cut(over) == (2, ["TooMany", "TooMany"])
    assert cut(mapped) == (1, ["TooMany"])
    assert [small, again, len(entries)] == [b"s", b"s", 3]

    async def read() -> list[object]:
        aio = connect_async(redis_server.url, socket_timeout=10)
        try:
            pipe = aio.pipeline(transaction=False)
            queue(pipe)
            return [*await pipe.execute(), await aio.lrange("over", 0, -1), await aio.ping()]
        finally:
            await aio.aclose()

    replies: list[Any] = asyncio.run(read())
    assert cut(replies[0]) == (2, ["TooMany", "TooMany"])
    assert cut(replies[2]) == (1, ["TooMany"])
    assert isinstance(next(iter(replies[3][1][1])), TooMany)
    assert [replies[1], replies[4], replies[6]] == [b"s", b"s", True]
    assert cut(replies[5]) == (2, ["TooMany", "TooMany"])


@pytest.mark.parametrize("kind", KINDS)
def test_an_entry_of_very_many_fields_costs_a_worker_nothing_and_the_next_one_applies(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    result, rejected = worker_meets(kind, redis_server, client, processes, hostile_entry)
    print(f"{kind}, {FIELDS} fields: ready {result['ready']:.0f}, peak {result['peak']:.0f} MiB")
    refused_by_all(result, rejected, f"entry has {FIELDS + 1} fields, over the reply cap")
    assert result["peak"] - result["ready"] < BOUND_MIB, result


@pytest.mark.parametrize("kind", KINDS)
def test_an_entry_of_very_many_fields_arriving_slower_than_the_socket_timeout_is_refused(
    kind: str, redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    """The entry's 6 MB come at 1 MiB/s (the 4 subscribers' socket timeout: 3.3 s): a reply
    that keeps arriving is no frozen Redis, however long it takes. The asyncio hub timed out
    the whole cycle (its watchdog) and lost the entry to a reconnect and a resync, and so did
    ``AsyncSubscriber(shared=False)`` (redis-py's timeout for the whole reply, session 10);
    a sync socket's timeout is per ``recv``. (On this machine the 4 hubs of one loop took
    4.4 s to skip the 600,000 members even over the unix socket, and failed the test above;
    in session 10 4 unshared ones failed it too.)"""
    with slow_link(redis_server, rate=1 * MiB) as url:
        result, rejected = worker_meets(
            kind, redis_server, client, processes, hostile_entry, url=url
        )
    refused_by_all(result, rejected, f"entry has {FIELDS + 1} fields, over the reply cap")


def test_history_shows_an_entry_of_very_many_fields_as_malformed(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    _, _, baseline = measured(redis_server.url, "history", KEY)
    hostile_entry(client, 2)
    append_event(redis_server.url, KEY, b"a: 3\n", version=3)
    code, out, peak = measured(redis_server.url, "history", KEY)
    print(f"history with {FIELDS} fields: peak {peak:.0f} MiB (without it {baseline:.0f} MiB)")
    assert code == 0, out
    assert f"entry has {FIELDS + 1} fields, over the reply cap" in out
    rows = [line.split()[:2] for line in out.splitlines()[1:] if line.strip()[:1].isdigit()]
    assert rows == [["3", "5108bb008527"], ["1", "37b128c59f1f"]], out
    assert "?  malformed" in out  # its version is one of the fields not read
    assert peak - baseline < BOUND_MIB


def test_status_and_history_read_past_an_ack_of_very_many_fields(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    heartbeat = int(time.time() * 1000)
    state = {"worker": "w:1", "status": "applied", "version": 1, "heartbeat": heartbeat,
             "heartbeat_interval": 5}  # fmt: skip
    client.hset(KEYS.workers, "w:1", json.dumps(state))
    ack = Ack(worker="w:1", version=1, sha256=sha256(b"a: 1\n").hexdigest(), status="applied")
    client.xadd(KEYS.acks, cast(Any, encode_ack(ack)))
    _, _, baseline = measured(redis_server.url, "status")
    _, history, _ = measured(redis_server.url, "history", KEY)
    fields: list[Any] = []
    for n in range(FIELDS):
        fields += [f"f{n}", "x"]
    cast(Any, client).execute_command("XADD", KEYS.acks, "*", *fields)  # as the subscriber may
    code, out, peak = measured(redis_server.url, "status")
    print(f"status: peak {peak:.0f} MiB (without it {baseline:.0f} MiB)\n{out}")
    assert code == 0, out
    assert any(line.split()[:2] == ["w:1", "1"] and "live" in line for line in out.splitlines())
    assert peak - baseline < BOUND_MIB
    code, out, peak = measured(redis_server.url, "history", KEY)
    print(f"history: peak {peak:.0f} MiB\n{history}\n{out}")
    assert (code, out) == (0, history)
    assert history.splitlines()[1].split()[-3:] == ["1", "0", "testing:0"], history
    assert peak - baseline < BOUND_MIB

    # a :workers hash of as many fields is read in HSCAN pages, at most MAX_WORKERS fields
    cast(Any, client).execute_command("HSET", KEYS.workers, *fields)
    code, out, peak = measured(redis_server.url, "status")
    print(f"status, huge :workers: peak {peak:.0f} MiB\n{out[-2000:]}")
    assert code == 0, out
    assert peak - baseline < BOUND_MIB
