"""The workers' floor asked for while kubelet writes (``publisher._earlyfloor``).

What the daemon relies on: a floor handed out is the one Redis had when asked, once and only
while fresh; anything unusual (no connection, a refusal, more workers than one page, a lost
Redis, a request nobody took) hands out nothing, so the publish reads the floor itself; and
where it cannot ask (a cluster client, more workers than ``MAX_ROWS``) the daemon's loop reads
the floor while kubelet writes, as before session 8. A real redis-server (or cluster) each;
the daemon's use with a single Redis is in tests/test_daemon.py too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from publisher import _earlyfloor
from publisher._earlyfloor import EarlyFloor
from publisher.daemon import Daemon
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, encode_worker_state
from subscriber.testing import RedisCluster, RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.conftest import KubeletMount
from tests.helpers import events, wait_until


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


def test_a_cluster_client_is_left_to_the_loop(early: EarlyFloor) -> None:
    """No one connection serves every key's slot: ``ready`` makes none, ``send`` declines."""
    cluster = redis.RedisCluster.__new__(redis.RedisCluster)  # never connected
    early.ready(cluster)
    assert not early.send(["a"])
    assert early.take("a") is None


def test_a_key_with_more_workers_than_a_request_may_decode_is_left_to_the_loop(
    client: redis.Redis, early: EarlyFloor
) -> None:
    """Redis decodes every state of a request (~0.7 ms at 128 workers, while a publish may
    arrive): over ``MAX_ROWS`` rows at the last read, ``send`` declines and the loop reads."""
    workers = stream_keys("a").workers
    state = encode_worker_state(WorkerState(worker="w", status="applied", version=5, seen=5))
    client.hset(workers, mapping={f"w:{i}": state for i in range(_earlyfloor.MAX_ROWS + 1)})
    early.ready(client)
    assert early.send(["a"])  # its rows not known yet
    assert early.take("a") == 5
    assert not early.send(["a"])  # the answer told the rows
    assert not early.send(["a", "b"])
    report(client, "a", "w:0", 9)
    early.read(client, ["a"])  # the loop's read, woken instead
    assert early.floor(client, "a") == 9
    client.hdel(workers, "w:1", "w:2")  # fewer workers: asked for early again
    assert early.floor(client, "a") == 9  # read at publish
    assert early.send(["a"])
    assert early.floor(client, "a") == 9


# -- the daemon's choice of path, seen from Redis's command counts --------------------------------


def calls(node: redis.Redis, command: str) -> int:
    stats: dict[str, dict[str, int]] = node.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def swap_read_by_the_loop(
    daemon: Daemon, mount: KubeletMount, node: redis.Redis, content: bytes
) -> None:
    """Kubelet swaps ``content`` in once the floor's ``HSCAN`` (the loop's read) reached
    ``node`` (the key's master); after the publish, that read was the only one: none at the
    publish (the publish's one ``EVALSHA``, no early request's)."""
    wait_until(lambda: daemon._idle is not None)  # the loop waits, all published
    hscans, evals = calls(node, "hscan"), calls(node, "evalsha")
    published = len(events(node, "app.yaml"))
    atomic_write(str(mount.directory), {"app.yaml": content},
                 pre_swap_hook=lambda: wait_until(lambda: calls(node, "hscan") > hscans,
                                                  "the floor read before the rename"))  # fmt: skip
    wait_until(lambda: len(events(node, "app.yaml")) == published + 1)
    assert events(node, "app.yaml")[-1].content == content
    assert (calls(node, "hscan"), calls(node, "evalsha")) == (hscans + 1, evals + 1)


def run(daemon: Daemon) -> threading.Thread:
    runner = threading.Thread(target=daemon.run)
    runner.start()
    return runner


def stop(daemon: Daemon, runner: threading.Thread) -> None:
    daemon.request_stop()
    runner.join(10)
    assert not runner.is_alive()


def test_a_cluster_daemon_reads_a_swaps_floor_before_the_rename(
    redis_cluster_module: RedisCluster, kubelet_mount: KubeletMount
) -> None:
    """A cluster client has no one connection for the early request: the loop is woken to
    read the floor while kubelet writes, as before session 8 -- not at the swap's publish (a
    round trip more between the rename and the entry)."""
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    workers = stream_keys("app.yaml").workers  # its slot: the events' too ({app.yaml})
    node = redis.Redis.from_url(redis_cluster_module.master_for(workers).url)
    daemon = Daemon(
        [kubelet_mount.directory], redis_url=redis_cluster_module.url, check_interval=3600
    )
    runner = run(daemon)
    try:
        wait_until(lambda: [e.version for e in events(node, "app.yaml")] == [1])
        report(node, "app.yaml", "w:1", 7)  # Redis lost entries the workers saw
        swap_read_by_the_loop(daemon, kubelet_mount, node, b"rev: 1\n")
        assert events(node, "app.yaml")[-1].version == 8  # above the floor read early
    finally:
        stop(daemon, runner)
        node.close()


def test_a_swap_of_a_key_with_many_workers_has_its_floor_read_by_the_loop(
    redis_server: RedisServer, client: redis.Redis, kubelet_mount: KubeletMount
) -> None:
    """Over ``MAX_ROWS`` workers the early request would keep Redis decoding states when the
    publish arrives: once the daemon knows the count, the loop reads the floor (an ``HSCAN``,
    decoded by the daemon) while kubelet writes, and the publish reads nothing more."""
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, check_interval=3600)
    runner = run(daemon)
    try:
        wait_until(lambda: [e.version for e in events(client, "app.yaml")] == [1])
        for i in range(_earlyfloor.MAX_ROWS + 1):
            report(client, "app.yaml", f"w:{i}", 7 if i == 3 else 1)
        wait_until(lambda: daemon._idle is not None)
        evals = calls(client, "evalsha")
        atomic_write(str(kubelet_mount.directory), {"app.yaml": b"rev: 1\n"})  # asked early
        wait_until(lambda: len(events(client, "app.yaml")) == 2)
        # the count not known before: asked early (one EVALSHA), then the publish's
        assert calls(client, "evalsha") == evals + 2
        swap_read_by_the_loop(daemon, kubelet_mount, client, b"rev: 2\n")
        assert [e.version for e in events(client, "app.yaml")] == [1, 8, 9]
    finally:
        stop(daemon, runner)
