"""The daemon's periodic checks (``publisher.upkeep``) against a real redis-server: what an
idle check costs does not grow with the number of keys, and what it must find it still finds.

Cost is counted by Redis itself, not timed: ``keyspace_hits + keyspace_misses`` (``INFO
stats``) counts every key a command looked up, ``INFO commandstats`` every command.
"""

from __future__ import annotations

import math
import time
from typing import Any, cast

import msgspec
import pytest
import redis

from publisher._floor import LUA_FLOOR, read_workers_seen
from publisher.upkeep import FORGET_KEYS, SWEEP_EVERY, SWEEP_KEYS, SWEEP_WORKERS, Upkeep
from subscriber.keys import stream_keys
from subscriber.protocol import now_ms
from subscriber.testing import RedisServer


def seed(client: redis.Redis, count: int, version: int = 3) -> list[str]:
    """``count`` keys, each with one entry numbered ``version`` (fields as published)."""
    names = [f"k{i:04d}.yaml" for i in range(count)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xadd(stream_keys(name).events, {"version": version, "content": "x: 1\n"})
    pipe.execute()
    return names


def idle_checks(client: redis.Redis, upkeep: Upkeep, names: list[str], checks: int) -> int:
    """Keys looked up by ``checks`` idle checks (every stream as published, nothing to do)."""
    client.config_resetstat()
    for _ in range(checks):
        assert upkeep.due(client, names, dict.fromkeys(names, 3)) == []
    stats = cast("dict[str, int]", client.info("stats"))
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


def test_an_idle_check_looks_up_as_many_keys_at_1000_keys_as_at_200(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    few, many = seed(client, 200), seed(client, 1000)[200:]  # 200: more than a sweep's slice
    per_check = {}
    for label, names in (("200", few), ("1000", [*few, *many])):
        upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
        upkeep.connected(client, names)
        per_check[label] = idle_checks(client, upkeep, names, 10) / 10
    # a slice of streams (each: EXISTS + XREVRANGE) and of worker hashes, whatever the count
    assert per_check["1000"] == per_check["200"] <= 2 * SWEEP_KEYS + SWEEP_WORKERS
    exists = cast("dict[str, dict[str, int]]", client.info("commandstats"))["cmdstat_exists"]
    assert exists["calls"] == 10 * SWEEP_KEYS  # the slice's, in the script: not every stream


def test_a_deleted_stream_among_1000_is_found_at_the_next_check(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    names = seed(client, 1000)
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    upkeep.connected(client, names)
    assert upkeep.due(client, names) == []
    client.delete(stream_keys("k0617.yaml").events)
    assert upkeep.due(client, names) == ["k0617.yaml"]
    client.flushall()
    assert upkeep.due(client, names) == names  # every stream gone: every key again


def test_a_stream_that_came_back_older_is_found_within_one_sweep(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """This daemon wrote v5 of one key among 1,000; the stream holds v3 (restored older):
    found within ceil(1000 / SWEEP_KEYS) checks, and only that key."""
    names = seed(client, 1000)
    published = dict.fromkeys(names, 3) | {"k0500.yaml": 5}
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    upkeep.connected(client, names)
    sweep = math.ceil(len(names) / SWEEP_KEYS)
    found = [upkeep.due(client, names, published) for _ in range(sweep)]
    assert [keys for keys in found if keys] == [["k0500.yaml"]]


def test_a_holding_worker_is_found_within_one_worker_sweep(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    names = seed(client, 100)
    client.hset(
        stream_keys("k0042.yaml").workers,
        "pod:7",
        msgspec.json.encode({
            "worker": "pod:7", "status": "holding", "version": 9, "seen": 9,
            "heartbeat": now_ms(), "error": "holding v9",
        }),
    )  # fmt: skip
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    upkeep.connected(client, names)
    checks = math.ceil(len(names) / SWEEP_WORKERS)
    found = [upkeep.due(client, names, dict.fromkeys(names, 3)) for _ in range(checks)]
    assert [keys for keys in found if keys] == [["k0042.yaml"]]


def test_old_workers_are_forgotten_a_few_keys_per_check(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    names = seed(client, 10)
    for name in names:
        client.hset(stream_keys(name).workers, "gone:1", msgspec.json.encode({
            "worker": "gone:1", "status": "applied", "version": 3, "heartbeat": 1,
        }))  # fmt: skip
    client.hset(stream_keys("k0003.yaml").workers, "live:2", msgspec.json.encode({
        "worker": "live:2", "status": "applied", "version": 3, "heartbeat": now_ms(),
    }))  # fmt: skip
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=60.0)
    upkeep.connected(client, names)

    def remaining() -> int:
        return sum(client.hlen(stream_keys(name).workers) for name in names)

    upkeep.due(client, names, dict.fromkeys(names, 3))
    assert remaining() == 11 - FORGET_KEYS  # the first slice only
    for _ in range(math.ceil(len(names) / FORGET_KEYS)):
        upkeep.due(client, names, dict.fromkeys(names, 3))
    assert remaining() == 1  # the live worker stays
    assert client.hkeys(stream_keys("k0003.yaml").workers) == [b"live:2"]


def test_a_redis_restarted_with_as_many_keys_is_found_at_the_next_check(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Redis restarted from a dump holding every key (the same count, nothing missing, no
    stream older than what was written): the check after it raises ``ConnectionError`` (the
    daemon's loop then reconnects and publishes every key), not only a sweep much later."""
    names = seed(client, 1000)
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    upkeep.connected(client, names)
    assert upkeep.due(client, names, dict.fromkeys(names, 3)) == []
    client.save()
    redis_server.kill()
    redis_server.start()
    with pytest.raises(redis.ConnectionError, match="restarted or is another one"):
        upkeep.due(client, names, dict.fromkeys(names, 3))
    upkeep.connected(client, names)  # as the loop does: the new server is the one from now on
    assert upkeep.due(client, names, dict.fromkeys(names, 3)) == []


def test_between_sweeps_a_check_is_one_round_trip_whatever_the_key_count(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Checks every 0.1 s for 2 s at 1,000 keys: each sends the two ``INFO`` (one round
    trip, no key looked up); one check in ``SWEEP_EVERY`` also reads its slices."""
    names = seed(client, 1000)
    upkeep = Upkeep(prefix="hotreload", check_interval=0.1, forget_workers_after=0)
    upkeep.connected(client, names)
    client.config_resetstat()
    checks = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if time.monotonic() >= upkeep.next_check:
            checks += 1
            assert upkeep.due(client, names, dict.fromkeys(names, 3)) == []
        time.sleep(0.01)
    stats = cast("dict[str, dict[str, int]]", client.info("commandstats"))
    assert stats["cmdstat_info"]["calls"] == 2 * checks
    sweeps, rest = divmod(stats["cmdstat_hscan"]["calls"], SWEEP_WORKERS)
    assert rest == 0
    assert checks >= 10
    assert 1 <= sweeps <= math.ceil(checks / (SWEEP_EVERY - 1))


def test_a_sweep_reads_the_workers_floor_in_redis_not_their_states(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """32 workers of ~1 KiB states: the sweep learns their floor and whether one holds in a
    reply of a few bytes (``LUA_FLOOR`` in Redis; Redis's ``total_net_output_bytes``), not by
    reading the ~32 KiB of states; and still finds a worker above the stream."""
    names = seed(client, 1)
    workers = stream_keys(names[0]).workers
    for i in range(32):
        client.hset(workers, f"pod:{i}", msgspec.json.encode({
            "worker": f"pod:{i}", "status": "applied", "version": 3, "heartbeat": now_ms(),
            "error": "x" * 1000,
        }))  # fmt: skip
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    upkeep.connected(client, names)

    def sent() -> int:
        return int(cast("dict[str, int]", client.info("stats"))["total_net_output_bytes"])

    before = sent()
    assert upkeep.due(client, names, dict.fromkeys(names, 3)) == []  # check_interval 0: sweeps
    assert sent() - before < 8 * 1024  # the check's INFO and this INFO included
    client.hset(workers, "pod:7", msgspec.json.encode({
        "worker": "pod:7", "status": "applied", "version": 4, "heartbeat": now_ms(),
    }))  # fmt: skip
    assert upkeep.due(client, names, dict.fromkeys(names, 3)) == names


_STATES = {
    "applied": {"status": "applied", "version": 5, "seen": 7},
    "rejected": {"status": "rejected", "version": 5, "rejected_version": 8},
    "holding": {"status": "holding", "version": 6, "error": "holding v6"},
    "unknown fields and status": {"status": "paused", "version": 2, "later": [1, {"a": 2}]},
    "negative": {"version": -1, "seen": 90},
    "past 2^53": {"version": 2**53, "seen": 91},
    "a string version": {"version": "92"},
    "a bool version": {"version": True, "seen": 93},
    "a null version": {"version": None, "seen": 94},
    "a status not text": {"status": 5, "version": 95},
    "an error not text": {"status": "holding", "error": None, "version": 96},
    "an array": [97, 98],
    "oversized": {"version": 99, "error": "x" * 17_000},
}


@pytest.mark.parametrize("case", [*_STATES, "not JSON", "all of them"])
def test_the_floor_read_in_redis_follows_the_floor_read_here(
    redis_server: RedisServer, client: redis.Redis, case: str
) -> None:
    """``LUA_FLOOR`` (the sweep's, in Redis) gives what ``read_workers_seen`` gives for each
    kind of state, valid or junk (junk is skipped: it never raises the floor)."""
    key = "hotreload:{k.yaml}:workers"
    values: dict[Any, bytes] = {name: msgspec.json.encode(s) for name, s in _STATES.items()}
    values["not JSON"] = b"{version: 100"
    client.hset(key, mapping=values if case == "all of them" else {case: values[case]})
    floor, holding, more, covered = cast(
        "list[int]", client.eval(LUA_FLOOR + "return {floor_of(KEYS[1])}", 1, key)
    )
    here = read_workers_seen(client, key)
    assert (floor, bool(holding), more, covered) == (here.floor, bool(here.holding), 0, 0)
    assert floor <= 8  # no junk counted
