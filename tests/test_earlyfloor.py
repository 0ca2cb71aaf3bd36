"""The workers' floor asked for while kubelet writes (``publisher._earlyfloor``).

What the daemon relies on: a floor handed out is the one Redis had when asked, once and only
while fresh; anything unusual (no connection, a refusal, more workers than one page, a lost
Redis, a request nobody took) hands out nothing, so the publish reads the floor itself. A
real redis-server each; the daemon's use is in tests/test_daemon.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from publisher import _earlyfloor
from publisher._earlyfloor import EarlyFloor
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, encode_worker_state
from subscriber.testing import RedisServer


@pytest.fixture
def early() -> Iterator[EarlyFloor]:
    floor = EarlyFloor("hotreload")
    try:
        yield floor
    finally:
        floor.close()


def report(client: redis.Redis, key: str, worker: str, seen: int) -> None:
    state = WorkerState(worker=worker, status="applied", version=seen, seen=seen)
    client.hset(stream_keys(key).workers, worker, encode_worker_state(state))


def test_a_floor_asked_for_is_handed_out_once(client: redis.Redis, early: EarlyFloor) -> None:
    report(client, "a", "w:1", 7)
    report(client, "a", "w:2", 9)
    report(client, "b", "w:1", 3)
    early.ready(client)
    early.send(["a", "b", "c"])
    report(client, "a", "w:3", 20)  # after the request: not in its answer
    assert early.take("a") == 9
    assert early.take("c") == 0  # no worker yet
    assert early.take("a") is None  # once: a later publish asks again (or reads)
    assert early.take("b") == 3
    early.send(["a"])
    assert early.take("a") == 20


def test_nothing_is_sent_without_a_connection_made_beforehand(
    client: redis.Redis, early: EarlyFloor
) -> None:
    """``send`` runs on watchdog's thread: it never connects (a connect may wait)."""
    report(client, "a", "w:1", 7)
    early.send(["a"])
    assert early.take("a") is None


def test_a_stale_floor_is_not_handed_out(
    client: redis.Redis, early: EarlyFloor, monkeypatch: pytest.MonkeyPatch
) -> None:
    report(client, "a", "w:1", 7)
    early.ready(client)
    monkeypatch.setattr(_earlyfloor, "FRESH", -1.0)
    early.send(["a"])
    assert early.take("a") is None


def test_more_workers_than_a_page_or_more_keys_than_asked_for_are_read_at_publish(
    client: redis.Redis, early: EarlyFloor
) -> None:
    workers = stream_keys("a").workers
    state = encode_worker_state(WorkerState(worker="w", status="applied", version=5, seen=5))
    client.hset(workers, mapping={f"w:{i}": state for i in range(1200)})
    early.ready(client)
    early.send(["a"])
    assert early.take("a") is None  # over one HSCAN page: the caller reads it whole
    early.send([f"k{i}" for i in range(_earlyfloor.MAX_KEYS + 1)])
    assert early.take("k0") is None


def test_a_refused_request_hands_out_nothing_and_the_next_one_works(
    client: redis.Redis, early: EarlyFloor
) -> None:
    client.set(stream_keys("a").workers, "not a hash")
    report(client, "b", "w:1", 4)
    early.ready(client)
    early.send(["a", "b"])
    assert early.take("a") is None
    assert early.take("b") is None  # one answer for both: refused
    early.send(["b"])
    assert early.take("b") == 4


def test_an_answer_nobody_took_is_replaced_by_the_next_request(
    client: redis.Redis, early: EarlyFloor
) -> None:
    """Kubelet wrote a version but no publish followed (same content): the next request
    reads that answer first and asks again."""
    report(client, "a", "w:1", 2)
    early.ready(client)
    early.send(["a"])
    client.ping()  # by then its answer is in
    report(client, "a", "w:1", 6)
    early.send(["a"])
    assert early.take("a") == 6


def test_a_lost_redis_hands_out_nothing_until_connected_again(
    redis_server: RedisServer, client: redis.Redis, early: EarlyFloor
) -> None:
    report(client, "a", "w:1", 7)
    early.ready(client)
    redis_server.restart()  # no persistence: comes back empty
    client.connection_pool.disconnect()
    early.send(["a"])
    assert early.take("a") is None
    report(client, "a", "w:1", 8)
    early.ready(client)
    early.send(["a"])
    assert early.take("a") == 8


def test_a_cluster_client_reads_at_publish(early: EarlyFloor) -> None:
    """No one connection serves every key's slot: ``ready`` makes none."""
    cluster = redis.RedisCluster.__new__(redis.RedisCluster)  # never connected
    early.ready(cluster)
    early.send(["a"])
    assert early.take("a") is None
