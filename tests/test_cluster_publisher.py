"""The publisher side on a real Redis Cluster: ``connect_any``, the daemon, its ack follower and
the CLI, each given the URL of a node that does not own the config's slot.

A failover loses what the dead master had not replicated yet (replication is asynchronous).
``lose_replication`` makes that happen on purpose: the slot's replica is cut off (a wrong
``masterauth`` keeps it from reconnecting) before the last change, so its promotion drops that
change for certain, and the daemon must put it back by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from publisher._admin import cluster_nodes, connect_any, is_cluster
from publisher.ackwatch import AckFollower
from publisher.cli import main as cli
from publisher.metrics import DaemonMetrics
from publisher.publish import Publisher
from subscriber import Subscriber
from subscriber._redis import connect
from subscriber.errors import ConfigurationError
from subscriber.keys import stream_keys
from subscriber.protocol import (
    Ack,
    Event,
    WorkerState,
    decode_event,
    encode_ack,
    encode_worker_state,
    now_ms,
)
from subscriber.testing import ClusterNode, RedisCluster, RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import start_daemon, wait_until
from tests.test_endpoints import get, metrics_containing

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

KEY = "app.yaml"
EVENTS = stream_keys(KEY).events


def events_of(client: AnyRedis, key: str) -> list[Event]:
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys(key).events))
    return [decode_event(i, f) for i, f in raw]


def contents(client: AnyRedis, key: str) -> list[bytes]:
    return [e.content for e in events_of(client, key)]


def plain(node: ClusterNode) -> redis.Redis:
    """A connection to one node only (admin and reading a replica)."""
    client = connect(node.url, socket_timeout=2)
    cast(Any, client).execute_command("READONLY")  # a replica answers reads too
    return client


def newest_on(node: ClusterNode, key: str) -> bytes | None:
    """The newest content in ``key``'s stream on ``node`` itself (no redirect)."""
    with plain(node) as client:
        raw = cast(list[Any], client.xrevrange(stream_keys(key).events, count=1))
    return decode_event(*raw[0]).content if raw else None


def masters(cluster: RedisCluster) -> list[ClusterNode]:
    """The live nodes that are masters now (ROLE)."""
    found = []
    for node in cluster.nodes:
        if node.live:
            with plain(node) as client:
                if cast(list[Any], client.role())[0] in (b"master", "master"):
                    found.append(node)
    return found


def bystander(cluster: RedisCluster, owner: ClusterNode) -> ClusterNode:
    """A master that does not own ``owner``'s slot, and is no replica of it either."""
    shard = {owner.port} | {replica.port for replica in cluster.replicas_of(owner)}
    return next(node for node in masters(cluster) if node.port not in shard)


def keys_on_every_master(cluster: RedisCluster, prefix: str) -> list[str]:
    """One config key per master (different slots, different nodes)."""
    by_master: dict[int, str] = {}
    count = len(masters(cluster))
    for i in range(200):
        name = f"{prefix}-{i}.yaml"
        owner = cluster.master_for(stream_keys(name).events)
        by_master.setdefault(owner.port, name)
        if len(by_master) == count:
            return sorted(by_master.values())
    raise AssertionError("no key for some master")


def lose_replication(master: ClusterNode, replica: ClusterNode) -> None:
    """Cut ``replica`` off ``master``: writes from now on are not replicated (until reset)."""
    with plain(replica) as client:
        client.config_set("masterauth", "not-the-password")  # its reconnections fail
    with plain(master) as client:
        client.client_kill_filter(_type="slave")  # redis-py < 8.1 refuses the word "replica"

    def link_down() -> bool:
        with plain(replica) as client:
            info = cast(dict[str, Any], client.info("replication"))
        return info.get("master_link_status") == "down"

    wait_until(link_down, "the replica's link to its master is down")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- connect_any


def test_connect_any_keeps_a_standalone_redis_as_connect_makes_it(
    redis_tcp: RedisServer, redis_server: RedisServer
) -> None:
    client = connect_any(redis_tcp.url, socket_timeout=2)
    try:
        assert type(client) is redis.Redis
        assert client.ping()
    finally:
        client.close()
    assert not is_cluster(redis_tcp.url)  # answered once, remembered: no second probe
    assert cluster_nodes(redis_tcp.url) == ()
    redis_tcp.kill()
    assert not is_cluster(redis_tcp.url)  # still known without asking
    # a unix socket is never asked (a pod's own Redis)
    client = connect_any(redis_server.url, socket_timeout=2)
    try:
        assert type(client) is redis.Redis
        assert client.ping()
    finally:
        client.close()


def test_connect_any_refuses_an_unreachable_node_without_remembering_it() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(redis.ConnectionError):
        connect_any(url, socket_timeout=1, connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        is_cluster(url)


def test_tls_options_the_cluster_client_would_drop_reach_every_node_connection() -> None:
    """redis-py's cluster client passes neither ``ssl_min_version`` nor ``ssl_ciphers`` on to
    its nodes (a TLS 1.3 minimum was silently ignored against a TLS 1.2-only cluster): the
    pool class ``connect_any`` gives it puts them back. (The whole TLS path, client
    certificates and a password included, was checked by hand against a 6-node TLS
    cluster: no fixture makes one.)"""
    from redis.connection import SSLConnection

    from publisher._admin import _cluster_pool_class

    url = "rediss://h:1/0?ssl_ca_certs=/ca.crt&ssl_min_version=772&ssl_ciphers=ECDHE%2BAESGCM"
    pool_class = _cluster_pool_class(url)
    assert pool_class is not None
    pool = pool_class(connection_class=SSLConnection, host="h", port=1, ssl_ca_certs="/ca.crt")
    connection = cast(Any, pool.make_connection())
    assert (connection.ssl_min_version, connection.ssl_ciphers) == (772, "ECDHE+AESGCM")
    assert connection.ca_certs == "/ca.crt"
    pool.disconnect()
    plain = _cluster_pool_class("rediss://h:1/0?ssl_ca_certs=/ca.crt")(host="h", port=1)
    assert "ssl_min_version" not in plain.connection_kwargs  # none given, none added


@pytest.mark.slow
def test_any_node_gives_a_cluster_client_that_publishes_and_reloads_the_script(
    redis_cluster_module: RedisCluster,
) -> None:
    cluster = redis_cluster_module
    owner = cluster.master_for(EVENTS)
    replica = cluster.replicas_of(owner)[0]
    for node in (bystander(cluster, owner), replica):  # any node, even a replica
        client = connect_any(node.url, socket_timeout=5, client_name="hotreload-test")
        try:
            assert isinstance(client, ClusterClient)
            publisher = Publisher(client)  # type: ignore[arg-type]
            first = publisher.publish(KEY, f"from {node.port}\n".encode())
            assert first.written
            # the script cache is gone (a restarted or freshly promoted master): EVALSHA
            # answers NOSCRIPT, the script is loaded again, the publish goes through
            with plain(owner) as admin:
                admin.script_flush()
                second = publisher.publish(KEY, f"from {node.port}, again\n".encode())
                names = [c["name"] for c in cast(list[dict[str, Any]], admin.client_list())]
            assert (second.written, second.version) == (True, first.version + 1)
            assert "hotreload-test" in names  # our settings reach the slot's master
        finally:
            client.close()
    with pytest.raises(ConfigurationError, match="database 0 only"):
        connect_any(cluster.nodes[1].url.replace("/0", "/2"), socket_timeout=2)


@pytest.mark.slow
def test_credentials_reach_every_node(redis_cluster_module: RedisCluster) -> None:
    cluster = redis_cluster_module
    names = keys_on_every_master(cluster, "acl")
    for node in cluster.nodes:
        with plain(node) as admin:
            admin.acl_setuser(
                "hotpub", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"]
            )
    seed = cluster.nodes[0]
    url = f"redis://hotpub:s3cret@127.0.0.1:{seed.port}/0"
    try:
        client = connect_any(url, socket_timeout=5, client_name="hotreload-acl")
        try:
            publisher = Publisher(client)  # type: ignore[arg-type]
            for name in names:
                assert publisher.publish(name, b"x").written
            # each master sees us as hotpub, not as default: looked at while our connections
            # are open (redis-py >= 8.2 really closes the nodes' connections on close())
            for master in masters(cluster):
                with plain(master) as admin:
                    clients = cast(list[dict[str, Any]], admin.client_list())
                assert any(
                    c["name"] == "hotreload-acl" and c["user"] == "hotpub" for c in clients
                ), clients
        finally:
            client.close()
        wrong = url.replace("s3cret", "wrong")
        assert cli(["history", names[0], "--redis", wrong]) == 3
    finally:
        for node in cluster.nodes:
            with plain(node) as admin:
                admin.acl_deluser("hotpub")


# ---------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_every_query_command_through_a_node_that_does_not_own_the_key(
    redis_cluster_module: RedisCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = redis_cluster_module
    names = keys_on_every_master(cluster, "cli")
    key = names[0]
    url = bystander(cluster, cluster.master_for(stream_keys(key).events)).url
    client = connect_any(url, socket_timeout=5)
    try:
        publisher = Publisher(client)  # type: ignore[arg-type]
        for name in names:
            publisher.publish(name, b"limit: 1\n")
        publisher.publish(key, b"limit: 2\n")
        with Subscriber(key, lambda _text: None, redis_url=url, heartbeat_interval=1.0):
            code, out, err = run_cli(capsys, "wait", key, "--redis", url, "--timeout", "10")
            assert (code, err) == (0, ""), out
            assert "all 1 live workers run it" in out

            code, out, err = run_cli(capsys, "status", "--json", "--redis", url)
            assert (code, err) == (0, "")
            summaries = {s["key"]: s for s in json.loads(out)["summary"]}
            assert set(names) <= set(summaries)  # SCAN covered every master
            assert summaries[key]["state"] == "converged"
            assert summaries[key]["newest_version"] == 2

        code, out, err = run_cli(capsys, "history", key, "--json", "--redis", url)
        assert (code, err) == (0, "")
        assert [(r["version"], r["applied"]) for r in json.loads(out)] == [(2, 1), (1, 0)]
        assert run_cli(capsys, "show", key, "1", "--redis", url)[1] == "limit: 1\n"
        code, out, _ = run_cli(capsys, "diff", key, "1", "--redis", url)
        assert code == 0
        assert "-limit: 1" in out
        assert "+limit: 2" in out
        code, _, err = run_cli(capsys, "history", "nope.yaml", "--redis", url)
        assert code == 2
        assert "cli-" in err  # the hint lists published keys, found on every master
    finally:
        client.close()


def test_status_names_every_master_that_refuses_writes(
    redis_cluster_module: RedisCluster,
) -> None:
    """``hotreload status`` (its own process) asks every master for memory, not one Redis:
    a master at ``maxmemory`` (noeviction) that does not even own the key is named."""
    cluster = redis_cluster_module
    key = keys_on_every_master(cluster, "oom")[0]
    owner = cluster.master_for(stream_keys(key).events)
    full = bystander(cluster, owner)
    url = owner.url
    client = connect_any(url, socket_timeout=5)
    try:
        Publisher(client).publish(key, b"limit: 1\n")  # type: ignore[arg-type]
    finally:
        client.close()

    def status(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "publisher", "status", *args, "--redis", url],
            capture_output=True, check=False, timeout=60,
            env={**os.environ, "NO_COLOR": "1", "HOTRELOAD_REDIS_URL": ""},
        )  # fmt: skip
        return done.returncode, done.stdout.decode()

    assert "refuses" not in status()[1]
    with plain(full) as admin:
        admin.config_set("maxmemory", "1mb")  # far below what a node uses: nothing fits
        try:
            code, out = status()
            document = json.loads(status("--json")[1])
        finally:
            admin.config_set("maxmemory", "0")
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith(f"Redis refuses writes: OOM on 127.0.0.1:{full.port}: "), out
    assert f":{owner.port}" not in first  # the others accept writes: not named
    assert document["redis_refuses_writes"].startswith(f"OOM on 127.0.0.1:{full.port}")


# ---------------------------------------------------------------------------- ack follower


@pytest.mark.slow
def test_ack_follower_reads_every_key_of_every_slot_and_stops_promptly(
    redis_cluster_module: RedisCluster,
) -> None:
    cluster = redis_cluster_module
    names = keys_on_every_master(cluster, "acks")
    metrics = DaemonMetrics()
    follower = AckFollower(cluster.nodes[1].url, lambda: names, metrics, prefix="hotreload")
    follower.start()
    client = connect_any(cluster.nodes[2].url, socket_timeout=5)
    sent = 0

    def count(metric: str) -> list[float]:
        sample = metrics.registry.get_sample_value
        return [sample(metric, {"key": name}) or 0.0 for name in names]

    def ack_every_key(status: Literal["applied", "rejected"]) -> None:
        nonlocal sent
        sent += 1
        for name in names:
            ack = Ack(
                worker=f"w{sent}", version=1, sha256="", status=status, error="bad",
                at=now_ms(), published_at=now_ms() - 5,
            )  # fmt: skip
            client.xadd(stream_keys(name).acks, encode_ack(ack))  # type: ignore[arg-type]

    try:
        # it follows from "now" on, once it has looked up each stream's tail: until then
        # acks may go unseen, so send rejections until every key has one counted ...
        def counted_once() -> bool:
            ack_every_key("rejected")
            return min(count("hotreload_worker_rejections_total")) > 0

        wait_until(counted_once, interval=0.2)
        # ... then every ack is counted, on every key
        ack_every_key("applied")
        ack_every_key("applied")
        wait_until(lambda: count("hotreload_propagation_seconds_count") == [2.0] * len(names))
    finally:
        client.close()
        started = time.monotonic()
        follower.stop()
    assert time.monotonic() - started < 2.0


# ---------------------------------------------------------------------------- the daemon


@pytest.mark.slow
def test_daemon_on_another_node_survives_the_failover_of_the_slots_master(
    redis_cluster: RedisCluster,
    kubelet_mount: KubeletMount,
    processes: Processes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = redis_cluster
    owner = cluster.master_for(EVENTS)
    [replica] = cluster.replicas_of(owner)
    seed = bystander(cluster, owner)
    other = next(  # a second key, on the daemon's own node
        name
        for name in (f"flags-{i}.json" for i in range(200))
        if cluster.master_for(stream_keys(name).events) == seed
    )
    kubelet_mount.write({KEY: b"rev: 0\n", other: b"{}"})
    port = free_port()
    daemon = start_daemon(processes, tmp_path, seed.url, kubelet_mount.directory, metrics_port=port)
    reader = connect_any(seed.url, socket_timeout=5)
    assert isinstance(reader, ClusterClient)
    applied: list[str] = []

    def apply(text: str) -> None:
        if text.startswith("bad"):
            raise ValueError("bad config")
        applied.append(text)

    try:
        written = [b"rev: 0\n"]
        wait_until(lambda: contents(reader, KEY) == written and contents(reader, other))
        for i in (1, 2):
            written.append(f"rev: {i}\n".encode())
            kubelet_mount.set(KEY, written[-1])
            wait_until(lambda: contents(reader, KEY) == written)

        # a worker on yet another node (the seed's replica); its rejection reaches /metrics
        [worker_node] = cluster.replicas_of(seed)
        subscriber = Subscriber(KEY, apply, redis_url=worker_node.url, heartbeat_interval=1.0)
        with subscriber:
            written.append(b"bad: 1\n")
            kubelet_mount.set(KEY, written[-1])
            wait_until(
                metrics_containing(port, f'hotreload_worker_rejections_total{{key="{KEY}"}} 1.0')
            )
            written.append(b"rev: 3\n")
            kubelet_mount.set(KEY, written[-1])
            wait_until(lambda: applied[-1:] == ["rev: 3\n"])

            # the last change before the master dies never reaches its replica ...
            lose_replication(owner, replica)
            written.append(b"rev: 4, lost in the failover\n")
            kubelet_mount.set(KEY, written[-1])
            wait_until(lambda: newest_on(owner, KEY) == written[-1])
            assert newest_on(replica, KEY) == b"rev: 3\n"
            cluster.kill(owner)
            assert cluster.wait_failover(owner, EVENTS) == replica
            # ... and the daemon puts it back (re-seeding), with no operator action
            wait_until(lambda: contents(reader, KEY) == written, "re-published", timeout=20)
            written.append(b"rev: 5\n")
            kubelet_mount.set(KEY, written[-1])
            wait_until(lambda: contents(reader, KEY) == written, timeout=20)
            wait_until(lambda: applied[-1:] == ["rev: 5\n"], "the worker follows", timeout=20)

            published = events_of(reader, KEY)
            versions = [e.version for e in published]
            assert versions == sorted(set(versions))  # never backwards, one entry per change
            assert contents(reader, other) == [b"{}"]  # the other key: not published again

            # the CLI through a node that owns neither key, after the failover
            code, out, err = run_cli(capsys, "wait", KEY, "--redis", seed.url, "--timeout", "10")
            assert (code, err) == (0, ""), out
            code, out, err = run_cli(capsys, "status", "--json", "--redis", seed.url)
            assert (code, err) == (0, "")
            summary = {s["key"]: s for s in json.loads(out)["summary"]}
            assert summary[KEY]["state"] == "converged"
            assert summary[KEY]["newest_version"] == versions[-1]
            code, out, err = run_cli(capsys, "history", KEY, "--json", "--redis", seed.url)
            assert (code, err) == (0, "")
            assert [r["version"] for r in json.loads(out)] == versions[::-1]

        body = get(port, "/metrics")[1]
        assert "hotreload_redis_connected 1.0" in body
        assert "hotreload_redis_reconnects_total 0.0" not in body  # it saw the master go
        assert get(port, "/readyz") == (200, "ok\n")
    finally:
        reader.close()
    assert daemon.stop() == 0
    output = daemon.output()
    assert "is a Redis Cluster node" in output
    assert "lost in the failover" not in output  # content is never logged


def test_an_idle_daemon_on_a_cluster_keeps_its_connection(
    redis_cluster_module: RedisCluster,
    kubelet_mount: KubeletMount,
    processes: Processes,
    tmp_path: Path,
) -> None:
    """Upkeep's checks (the slice, old workers' forgetting with Redis's clock) work on a
    cluster: an idle daemon never drops its connection (a pipelined TIME, which a cluster
    pipeline refuses, made it reconnect every check)."""
    key = "idle-cluster.json"
    kubelet_mount.write({key: b"{}"})
    reader = connect_any(redis_cluster_module.url, socket_timeout=5)
    state = WorkerState(worker="worker-1", status="starting", heartbeat=now_ms())
    reader.hset(stream_keys(key).workers, "worker-1", encode_worker_state(state))  # to look at
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_cluster_module.url, kubelet_mount.directory, metrics_port=port
    )
    try:
        wait_until(lambda: contents(reader, key) == [b"{}"])
        time.sleep(3.5)  # several upkeep checks (one a second)
        assert "lost Redis" not in daemon.output(), daemon.output()
        body = get(port, "/metrics")[1]
        assert "hotreload_redis_reconnects_total 0.0" in body
    finally:
        reader.close()
    assert daemon.stop() == 0
