"""The ``RedisCluster`` test helper itself, with real ``redis-server`` processes.

A 3-master + 3-replica cluster takes about 3 s to start here (``redis-cli --cluster create``
alone sleeps 2 s) and a failover with the default 2 s node timeout about 4-5 s, so the
fault tests are marked slow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from subscriber.keys import stream_keys
from subscriber.testing import ClusterNode, RedisCluster

KEY = stream_keys("app.yaml").events  # hotreload:{app.yaml}:events


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[ClusterClient]:
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        yield client
    finally:
        client.close()


def test_cluster_comes_up_with_three_masters_and_three_replicas(
    redis_cluster_module: RedisCluster,
) -> None:
    cluster = redis_cluster_module
    assert len(cluster.nodes) == 6
    assert all(node.running and node.node_id for node in cluster.nodes)
    ports = [node.port for node in cluster.nodes]
    assert len(set(ports)) == 6
    assert all(port < 55000 and port != 6379 for port in ports)
    assert cluster.url == cluster.nodes[0].url == f"redis://127.0.0.1:{ports[0]}/0"
    assert cluster.urls == [f"redis://127.0.0.1:{port}/0" for port in ports]

    masters = cluster.master_nodes()
    assert len(masters) == 3
    replicas = [cluster.replicas_of(master) for master in masters]
    assert all(len(r) == 1 for r in replicas)
    assert {node.port for node in masters} | {r[0].port for r in replicas} == set(ports)

    for node in cluster.nodes:  # every node: state ok, all 16384 slots covered by 3 masters
        with redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True) as client:
            info = client.execute_command("CLUSTER", "INFO")
            assert "cluster_state:ok" in info
            assert "cluster_slots_ok:16384" in info
            slots = client.execute_command("CLUSTER", "SLOTS")
            assert sum(int(r[1]) - int(r[0]) + 1 for r in slots) == 16384
            assert {int(r[2][1]) for r in slots} == {m.port for m in masters}


def test_master_for_agrees_with_the_cluster_client(redis_cluster_module: RedisCluster) -> None:
    cluster = redis_cluster_module
    client = ClusterClient(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        for key in (KEY, "a", "b", "{user1000}.following"):
            assert cluster.slot_of(key) == client.keyslot(key)  # type: ignore[no-untyped-call]
            owner = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
            assert cluster.master_for(key).port == owner.port
        assert client.xadd(KEY, {"k": "v"})
        with redis.Redis(host="127.0.0.1", port=cluster.master_for(KEY).port) as direct:
            assert direct.xlen(KEY) >= 1  # the key really lives on that node
    finally:
        client.close()


@pytest.mark.slow
def test_kill_master_fails_over_to_its_replica_and_restart_rejoins(
    redis_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    cluster = redis_cluster
    old = cluster.master_for(KEY)
    replicas = cluster.replicas_of(old)
    cluster_client.xadd(KEY, {"n": "1"})

    cluster.kill(old)
    assert not old.running
    assert _gone(old.pid)
    new = cluster.wait_failover(old, KEY)
    assert new in replicas
    assert new.running
    assert cluster.master_for(KEY) is new
    # a client made before the failover follows it (connection error -> new slot map)
    assert cluster_client.xadd(KEY, {"n": "2"})
    assert cluster_client.xlen(KEY) >= 1

    cluster.restart(old)  # same port, same nodes.conf: comes back as the new master's replica
    assert old.running
    assert cluster.master_for(KEY) is new
    assert cluster.replicas_of(new) == [old]
    cluster.wait_ok(timeout=5)


@pytest.mark.slow
def test_frozen_master_fails_over_and_rejoins_as_a_replica_when_thawed(
    redis_cluster: RedisCluster,
) -> None:
    cluster = redis_cluster
    old = cluster.master_for(KEY)
    replicas = cluster.replicas_of(old)
    cluster.freeze(old)
    assert old.frozen
    assert old.running
    new = cluster.wait_failover(old, KEY)
    assert new in replicas
    cluster.thaw(old)
    cluster.wait_ok()
    assert cluster.master_for(KEY) is new
    assert cluster.replicas_of(new) == [old]


@pytest.mark.slow
def test_stop_leaves_no_process_even_frozen_or_killed(redis_cluster: RedisCluster) -> None:
    cluster = redis_cluster
    pids = [node.pid for node in cluster.nodes]
    cluster.freeze(cluster.nodes[1])
    cluster.kill(cluster.nodes[2])
    cluster.stop()
    assert all(_gone(pid) for pid in pids)
    assert not any(node.running for node in cluster.nodes)
    cluster.stop()  # idempotent


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path, cli="false")  # `redis-cli --cluster create` fails
    with pytest.raises(RuntimeError, match="cluster create failed"):
        cluster.start()
    assert len(cluster.nodes) == 6
    assert all(_gone(node.pid) for node in cluster.nodes)


def test_rejects_fewer_than_three_masters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3 masters"):
        RedisCluster(tmp_path, masters=2)


def test_node_repr_and_paths(tmp_path: Path) -> None:
    node = ClusterNode(tmp_path, 12345)
    assert node.url == "redis://127.0.0.1:12345/0"
    assert node.config_path == tmp_path / "node-12345" / "nodes-12345.conf"
    assert not node.running
    assert "12345" in repr(node)
    with pytest.raises(RuntimeError):
        _ = node.pid


def test_importing_subscriber_testing_does_not_load_the_cluster_helper() -> None:
    """``RedisServer`` users pay for ``RedisServer``: the cluster helper loads on first use."""
    import subprocess
    import sys

    code = (
        "import sys, subscriber.testing as t\n"
        "assert 'subscriber._testing_cluster' not in sys.modules\n"
        "assert 'subscriber._testing_nodes' not in sys.modules\n"
        "assert {'RedisCluster', 'ClusterNode'} <= set(t.__all__) <= set(dir(t))\n"
        "from subscriber.testing import ClusterNode, RedisCluster\n"
        "assert RedisCluster.__module__ == 'subscriber._testing_cluster'\n"
        "assert t.ClusterNode is ClusterNode\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    from subscriber import testing

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = testing.Nope
