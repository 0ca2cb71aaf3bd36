"""The shared variant's Redis Cluster for real: 6 nodes running deploy/redis-cluster/redis.conf
(only paths, port and bind moved) with the users ``gen-users-acl.sh --cluster`` writes,
created by the create Job's own script (``tests.deploy.servers.ShippedCluster``). The real
publisher daemon, subscribers and CLI work under their users with no ACL denial on any node,
each user is refused what it must not do, replicas follow their masters with the replication
user also after a failover, and the nodes find each other again after every one of them
restarted with a new IP (``refresh-nodes-conf.sh``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from publisher._admin import connect_any
from publisher.ackwatch import AckCache
from publisher.cli import main as hotreload
from publisher.daemon import Daemon
from subscriber import AsyncSubscriber, Subscriber
from subscriber.keys import stream_keys
from subscriber.testing import ClusterNode, free_port
from tests.conftest import KubeletMount
from tests.deploy.render import (
    CLUSTER_FILES,
    DEPLOY,
    PASSWORDS,
    SECRET_MOUNT,
    SHARED,
    Shared,
    env_values,
    render,
)
from tests.deploy.servers import (
    ShippedCluster,
    job_script,
    node_client,
    node_cluster_info,
    node_info,
    node_url,
)
from tests.helpers import wait_until


def test_the_create_job_makes_the_cluster_once_and_nodes_announce_hostnames(
    cluster: ShippedCluster,
) -> None:
    # created by the Job's script in the fixture; running it again changes nothing
    again = cluster.create()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert cluster.problem() is None
    # clients are sent to the announced hostnames, not to IPs
    with node_client(cluster.nodes[0], "subscriber") as client:
        slots = cast(list[Any], client.execute_command("CLUSTER", "SLOTS"))
    assert len(slots) == 3
    for _first, _last, *nodes in slots:
        for node in nodes:
            assert node[0] == "localhost", node
    # the default user is off, with or without a password
    anonymous = redis.Redis(
        host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    )
    with anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            anonymous.auth("anything-0123456789", username="default")


def shipped_url(node: ClusterNode, user: str, secrets: Path) -> str:
    """``user``'s URL as the shared Deployment sets it (deploy/k8s/shared/app: the client
    Service, the password a file of the Secret's volume), pointed at ``node`` and at the
    Secret's files written into ``secrets``."""
    app = Shared(render(SHARED))
    url = env_values(app.app_container("publisher"), {})["HOTRELOAD_REDIS_URL"]
    assert url.startswith("redis://publisher@hotreload-redis:6379/0?password_file=")
    secrets.mkdir(exist_ok=True)
    (secrets / f"{user}-password").write_text(PASSWORDS[user])
    url = url.replace("publisher", user).replace("hotreload-redis:6379", node.address)
    return url.replace(SECRET_MOUNT, str(secrets))


def test_publisher_subscribers_and_cli_work_under_their_users_without_denials(
    cluster: ShippedCluster,
    kubelet_mount: KubeletMount,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The daemon, subscribers and CLI with the shared Deployment's URLs: each password read
    from its file, for every connection to every node of the cluster."""
    cluster.reset_acl_logs()
    secrets = tmp_path / "secrets"
    key = "rate_limits.yaml"
    keys = stream_keys(key)
    kubelet_mount.write({key: b"limit: 1\n", "flags.json": b'{"a": true}'})
    # every URL names some node, most often not the key's master: the clients find it
    master = cluster.master_for(keys.events)
    others = [node for node in cluster.nodes if node is not master]
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=shipped_url(others[0], "publisher", secrets),
        metrics_port=free_port(),  # also runs the ack follower
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0], "initial publish", timeout=20)
        applied: list[str] = []
        with Subscriber(
            key,
            applied.append,
            redis_url=shipped_url(others[1], "subscriber", secrets),
            heartbeat_interval=0.5,
            metrics=False,
        ) as sub:
            assert applied == ["limit: 1\n"]
            kubelet_mount.set(key, b"limit: 2\n")
            wait_until(lambda: sub.version == 2, "v2 applied")
            for user, argv in (
                ("operator", ["wait", key, "--version", "2", "--timeout", "10"]),
                ("publisher", ["wait", key, "--timeout", "10"]),
                ("publisher", ["status"]),  # every key: SCAN on every master
                ("operator", ["status", "--json"]),
                ("operator", ["history", key]),
                ("operator", ["show", key, "2"]),
                ("operator", ["diff", key, "1"]),
            ):
                assert hotreload([*argv, "--redis", shipped_url(others[2], user, secrets)]) == 0, (
                    user,
                    argv,
                )
            # the daemon's ack follower reads only what is new from its second status pass
            # on (MULTI, XLEN, XRANGE, EXEC): the same reads, twice, under the same user
            publisher = connect_any(shipped_url(others[3], "publisher", secrets), socket_timeout=5)
            try:
                cache = AckCache()
                first = cache.read(publisher, keys.acks)
                assert {ack.version for ack in first} == {1, 2}
                assert len(cache.read(publisher, keys.acks)) == len(first)
            finally:
                publisher.close()
        # the async transport issues the same commands; stop() recorded "stopped"
        assert asyncio.run(_async_version(shipped_url(others[4], "subscriber", secrets), key)) == 2
        with node_client(master) as admin:
            states = cast(dict[str, str], admin.hgetall(keys.workers))
            floor = cast(dict[str, float], dict(admin.zrange(keys.floor, 0, -1, withscores=True)))
        assert any('"stopped"' in state for state in states.values()), states
        assert set(floor) == set(states), floor  # ZADD GT with each state
        assert set(floor.values()) == {2.0}, floor
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert not thread.is_alive()
    assert cluster.acl_denials() == []


async def _async_version(url: str, key: str) -> int:
    applied: list[str] = []
    async with AsyncSubscriber(
        key, applied.append, redis_url=url, worker_id="async:1", metrics=False
    ) as sub:
        assert applied == ["limit: 2\n"]
        return sub.version


def test_each_user_is_refused_what_it_must_not_do(cluster: ShippedCluster) -> None:
    keys = stream_keys("forbidden.yaml")
    master = cluster.master_for(keys.events)
    with node_client(master) as admin:
        entry = cast(str, admin.xadd(keys.events, {"version": "1"}))
        admin.xadd(keys.acks, {"status": "applied"})
        admin.hset(keys.workers, "w", "{}")
        sha = cast(str, admin.script_load("return 1"))
        node_id = cast(str, admin.execute_command("CLUSTER", "MYID"))
        before = cast(int, admin.dbsize())
    other = "hotreload:{forbidden.yaml}:other"  # same slot: refused by the ACL, not redirected
    forbidden: dict[str, list[tuple[str, ...]]] = {
        "subscriber": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.events, "MAXLEN", "0", "*", "version", "99"),
            ("XTRIM", keys.events, "MAXLEN", "0"),
            ("XTRIM", keys.acks, "MAXLEN", "0"),
            ("XDEL", keys.events, entry),
            ("DEL", keys.events),
            ("DEL", keys.workers),
            ("HDEL", keys.workers, "w"),
            ("ZREM", keys.floor, "w"),
            ("ZRANGE", keys.floor, "0", "-1"),
            ("HSET", keys.events, "f", "v"),
            ("SET", other, "v"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", sha, "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "SETUSER", "subscriber", "+@all"),
            ("KEYS", "*"),
            ("SPUBLISH", "channel", "x"),
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
            ("CLUSTER", "FORGET", node_id),
            ("CLUSTER", "NODES"),
            ("MIGRATE", "127.0.0.1", "1", keys.events, "0", "100"),
            ("SHUTDOWN", "NOSAVE"),
        ],
        "operator": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("DEL", keys.events),
            ("EVALSHA", sha, "1", keys.events),
            ("FLUSHALL",),
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
        ],
        "publisher": [
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("ZADD", keys.floor, "GT", "99", "w"),
            # XTRIM is allowed: at maxmemory the history gives way (publisher.publish)
            ("XDEL", keys.events, entry),
            ("DEL", keys.events),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
        ],
        "replication": [
            ("XRANGE", keys.events, "-", "+"),
            ("XADD", keys.events, "*", "version", "99"),
            ("HGETALL", keys.workers),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("CLUSTER", "SLOTS"),
            ("CLUSTER", "FAILOVER"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "masterauth"),
        ],
        "admin": [
            ("XRANGE", keys.events, "-", "+"),
            ("XREVRANGE", keys.events, "+", "-"),
            ("XADD", keys.events, "*", "version", "99"),
            ("HGETALL", keys.workers),
            ("DEL", keys.events),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "masterauth"),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "LIST"),
            ("CLUSTER", "RESET"),
            ("CLUSTER", "DELSLOTS", "0"),
            ("CLUSTER", "SETSLOT", "0", "STABLE"),
            ("CLUSTER", "FLUSHSLOTS"),
            ("MIGRATE", "127.0.0.1", "1", keys.events, "0", "100"),
            ("SHUTDOWN", "NOSAVE"),
        ],
    }
    allowed = []
    for user, commands in forbidden.items():
        with node_client(master, user) as client:
            for command in commands:
                execute: Callable[..., Any] = client.execute_command
                try:
                    execute(*command)
                except redis.exceptions.NoPermissionError:
                    continue
                allowed.append((user, command))
    assert allowed == []
    with node_client(master) as admin:
        assert admin.xlen(keys.events) == 1
        assert admin.xlen(keys.acks) == 1
        assert admin.hgetall(keys.workers) == {"w": "{}"}
        assert admin.dbsize() == before
    assert cluster.problem() is None
    # what the admin user is for: the layout, and the readiness probe's question
    with node_client(master, "admin") as admin_user:
        assert "cluster_state:ok" in cast(str, admin_user.execute_command("CLUSTER", "INFO"))
        assert cast(str, admin_user.execute_command("CLUSTER", "NODES")).count("\n") == 6


def test_a_manual_failover_by_the_admin_user_swaps_roles_with_replication_intact(
    cluster: ShippedCluster,
) -> None:
    """The replication user carries the sync both ways: the promoted replica's old master
    becomes its replica and logs in to it with masteruser/masterauth."""
    key = stream_keys("failover.yaml").events
    old_master = cluster.master_for(key)
    with node_client(old_master) as admin:
        admin.xadd(key, {"version": "1"})
        (replica_address,) = [
            f"{r['ip']}:{r['port']}"
            for name, r in cast(dict[str, Any], admin.info("replication")).items()
            if name.startswith("slave") and isinstance(r, dict)
        ]
    (replica,) = [node for node in cluster.nodes if node.address == replica_address]
    cluster.reset_acl_logs()
    with node_client(replica, "admin") as admin_user:
        admin_user.execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: cluster.master_for(key) is replica, "the replica took over", timeout=20)
    cluster.wait_ok(layout=True)
    assert node_info(old_master, "replication")["master_port"] == replica.port
    with node_client(replica) as admin:
        assert admin.xlen(key) == 1
    assert cluster.acl_denials() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_users_need_nothing_more_through_an_automatic_failover(
    cluster: ShippedCluster, kubelet_mount: KubeletMount, capsys: pytest.CaptureFixture[str]
) -> None:
    """A master killed: redis-py reloads the slot map, the daemon reconnects and re-seeds,
    workers reconnect to the promoted replica, the old master comes back as its replica (with
    the replication user). None of it needs a command the users do not have."""
    key = "failover-acl.yaml"
    kubelet_mount.write({key: b"v: 1\n"})
    master = cluster.master_for(stream_keys(key).events)
    others = [node for node in cluster.nodes if node is not master]
    daemon = Daemon(
        [kubelet_mount.directory], redis_url=node_url(others[0], "publisher"), check_interval=0.2
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0], "initial publish", timeout=20)
        with Subscriber(
            key, lambda _content: None, redis_url=node_url(others[1], "subscriber"), metrics=False
        ) as sub:
            assert sub.version == 1
            cluster.reset_acl_logs()
            cluster.kill(master)
            kubelet_mount.set(key, b"v: 2\n")  # published once the slot is served again
            wait_until(lambda: sub.version == 2, "v2 after the failover", timeout=45)
        cluster.revive(master)
        cluster.wait_ok(timeout=45, layout=True)
        assert node_info(master, "replication")["role"] == "slave"
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert cluster.acl_denials() == []


def test_a_node_that_lost_its_pvc_is_added_back_by_the_admin_user(cluster: ShippedCluster) -> None:
    """deploy/README.md's procedure for a pod that came back without its PVC (a new, empty
    node): the create Job refuses the half-formed cluster; the admin user forgets the old node
    id on the others and adds the new node as a replica, and the layout is whole again."""
    lost = next(n for n in cluster.nodes if node_info(n, "replication")["role"] == "slave")
    with node_client(lost) as admin:
        old_id = cast(str, admin.execute_command("CLUSTER", "MYID"))
    cluster.kill(lost)
    lost.config_path.unlink()
    shutil.rmtree(lost.directory / "appendonlydir", ignore_errors=True)
    cluster.revive(lost)
    refused = cluster.create()
    assert refused.returncode == 1
    assert "add the 1 new node(s) by hand" in refused.stderr
    assert node_cluster_info(lost)["cluster_known_nodes"] == "1"  # left alone
    cluster.reset_acl_logs()
    for node in cluster.nodes:
        if node is not lost:
            with node_client(node, "admin") as admin_user:
                admin_user.execute_command("CLUSTER", "FORGET", old_id)
    existing = next(node for node in cluster.nodes if node is not lost)
    # as the README runs it: the admin password piped from its file into --askpass
    (admin_line,) = re.findall(r"^admin='(.*)'$", (DEPLOY / "README.md").read_text(), re.M)
    password_file = cluster.directory / "admin-password"
    password_file.write_text(PASSWORDS["admin"])
    added = subprocess.run(
        ["sh", "-c", f"{admin_line} --cluster add-node {lost.address} {existing.address} "
         "--cluster-slave"],
        env={"PATH": os.environ["PATH"], "HOTRELOAD_ADMIN_PASSWORD_FILE": str(password_file)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    cluster.wait_ok(layout=True)
    with node_client(existing) as admin:
        assert old_id not in cast(str, admin.execute_command("CLUSTER", "NODES"))
    assert cluster.acl_denials() == []


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.21", 0))
            server.listen()
            with socket.create_connection(server.getsockname(), timeout=1):
                return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_nodes_find_each_other_after_every_pod_got_a_new_ip(tmp_path: Path) -> None:
    """All six pods restarted at once (e.g. the StatefulSet scaled to 0 and back): each comes
    back with a new IP, and every IP recorded in every nodes.conf is stale. Without
    refresh-nodes-conf.sh the cluster never forms again (the bus knows no names); with it,
    each node's address is looked up by its announced hostname before Redis starts."""
    if not _loopback_aliases_work():
        pytest.skip("binding 127.0.0.x other than 127.0.0.1 is not possible here")
    first = [f"127.0.0.{11 + i}" for i in range(6)]
    shipped = ShippedCluster(tmp_path / "cluster", job_script(), ips=first).start(timeout=90)
    try:
        shipped.stop()
        # "DNS" for refresh-nodes-conf.sh: the pods' new IPs by their announced names
        hosts = tmp_path / "hosts"
        fake = tmp_path / "bin" / "getent"
        fake.parent.mkdir()
        fake.write_text(
            '#!/bin/sh\n[ "$1" = hosts ] || exit 2\n'
            f'awk -v n="$2" \'$2 == n {{ print $1 "  " $2; f = 1 }} END {{ exit !f }}\' {hosts}\n'
        )
        fake.chmod(0o755)
        for index, node in enumerate(shipped.nodes):
            node.host = f"127.0.0.{21 + index}"
        hosts.write_text(
            "".join(
                f"{n.host} {name}\n"
                for n, name in zip(shipped.nodes, shipped.hostnames, strict=True)
            )
        )
        for node in shipped.nodes:
            refresh = [
                str(CLUSTER_FILES / "refresh-nodes-conf.sh"),
                str(node.config_path),
            ]
            refreshed = subprocess.run(
                ["sh", *refresh, "5"],
                env={"PATH": f"{fake.parent}:{os.environ['PATH']}"},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert refreshed.returncode == 0, refreshed.stderr
            recorded = (node.config_path).read_text()
            assert not [old for old in first if f"{old}:" in recorded]  # no stale IP left
            for other in shipped.nodes:
                assert f"{other.host}:{other.port}@{other.port + 10000}," in recorded
        shipped.revive(*shipped.nodes)
        shipped.wait_ok(timeout=45, layout=True)
    finally:
        shipped.stop()
