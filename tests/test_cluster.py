"""The whole system on a real 6-node Redis Cluster (3 masters, 3 replicas) on loopback.

The daemon and the workers are each given the URL of a *different* node -- masters that do
not own the config's slot, and replicas -- the way a Service in front of a cluster hands out
any node. Workers run in two "pods" (``$HOSTNAME``), threaded and asyncio. Then the master
owning the slot is SIGKILLed: once a replica has taken over, the next change reaches every
worker with no operator action, and ``hotreload status`` / ``wait`` see every worker of
both pods through any node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from publisher.cli import main as cli
from subscriber import AsyncSubscriber, Subscriber
from subscriber.errors import RedisUnavailable
from subscriber.keys import stream_keys
from subscriber.protocol import (
    Event,
    WorkerState,
    decode_event,
    decode_worker_state,
)
from subscriber.testing import ClusterNode, RedisCluster, append_event, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import start_daemon, wait_until
from tests.workers.harness import Worker, wait_converged

KEY = "app.yaml"
EVENTS = stream_keys(KEY).events
OPTIONS = ("--block-ms", "1000", "--heartbeat", "1.0")

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[ClusterClient]:
    """redis-py's cluster client, for reading what the system wrote."""
    first = redis_cluster.nodes[0]
    client = ClusterClient(host="127.0.0.1", port=first.port, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


def other_nodes(cluster: RedisCluster, owner: ClusterNode) -> list[ClusterNode]:
    """Every node but the slot's master and its replicas: they survive its death as they were."""
    mine = {owner.port} | {replica.port for replica in cluster.replicas_of(owner)}
    return [node for node in cluster.nodes if node.port not in mine]


def start_worker(
    processes: Processes, tmp_path: Path, url: str, pod: str, index: int, *, use_async: bool
) -> Worker:
    out = tmp_path / f"{pod}-{index}.jsonl"
    argv = ["-m", "tests.workers.subscriber_worker", "--url", url, "--key", KEY]
    argv += ["--out", str(out), *OPTIONS] + (["--async"] if use_async else [])
    with Path(f"{out}.log").open("wb") as log:
        process = processes.python(
            *argv, env={"HOSTNAME": pod}, stdout=log, stderr=subprocess.STDOUT
        )
    return Worker(process, out)


def events(client: ClusterClient, key: str) -> list[Event]:
    raw = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(stream_keys(key).events))
    return [decode_event(entry_id, fields) for entry_id, fields in raw]


def worker_states(client: ClusterClient) -> dict[str, WorkerState]:
    raw = cast("dict[bytes, bytes]", client.hgetall(stream_keys(KEY).workers))
    return {name.decode(): decode_worker_state(value) for name, value in raw.items()}


def run_cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli([argv[0], "--redis", url, *argv[1:]])
    return code, capsys.readouterr().out


def test_daemon_and_workers_on_different_nodes_survive_the_slot_master_dying(  # noqa: PLR0917
    redis_cluster: RedisCluster,
    cluster_client: ClusterClient,
    kubelet_mount: KubeletMount,
    processes: Processes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    owner = redis_cluster.master_for(EVENTS)
    survivors = other_nodes(redis_cluster, owner)  # two masters and their replicas
    replica = redis_cluster.replicas_of(owner)[0]
    kubelet_mount.write({KEY: b"rev: 1\n"})
    # metrics on (a free port), so the ack follower runs against the cluster too
    daemon = start_daemon(
        processes, tmp_path, survivors[0].url, kubelet_mount.directory, metrics_port=free_port()
    )
    wait_until(lambda: [e.version for e in events(cluster_client, KEY)] == [1], "v1 published")

    # pod-a's workers reach the cluster through the slot's master and its replica, pod-b's
    # through the other nodes: every route a cluster Service could give them
    routes = [owner, replica, *survivors]
    workers = [
        start_worker(processes, tmp_path, node.url, pod, index, use_async=index % 2 == 1)
        for index, (pod, node) in enumerate(
            [("pod-a", routes[0]), ("pod-a", routes[1]), ("pod-b", routes[2]),
             ("pod-b", routes[3]), ("pod-b", routes[4])]
        )
    ]  # fmt: skip
    for worker in workers:
        assert worker.wait_started()["event"] == "started", worker.log()

    kubelet_mount.set(KEY, b"rev: 2\n")
    wait_converged(lambda: worker_states(cluster_client), workers, b"rev: 2\n", 2, timeout=30)

    redis_cluster.kill(owner)
    promoted = redis_cluster.wait_failover(owner, EVENTS)
    assert promoted.port == replica.port

    kubelet_mount.set(KEY, b"rev: 3\n")

    # v2 may have been lost with the dead master (replication is asynchronous) and then
    # published again as v3, making rev: 3 v4; either way versions only go up
    def rev3_published() -> Event | None:
        entry = events(cluster_client, KEY)[-1]
        return entry if entry.content == b"rev: 3\n" else None

    newest = wait_until(rev3_published, "rev: 3 published after the failover", timeout=30)
    wait_converged(
        lambda: worker_states(cluster_client), workers, b"rev: 3\n", newest.version, timeout=30
    )
    published = events(cluster_client, KEY)
    assert [e.version for e in published] == sorted({e.version for e in published})
    assert published[-1] == newest
    for worker in workers:
        texts = worker.applied()
        assert texts[-1] == "rev: 3\n", worker.log()
        assert texts == sorted(texts), texts  # never an older config after a newer one
        assert worker.process.poll() is None, worker.log()

    # status and wait through a surviving node cover every worker of both pods (polled: on a
    # loaded machine one worker's heartbeat may be late at any single instant)
    def every_worker_live() -> dict[str, Any] | None:
        code, out = run_cli(capsys, survivors[1].url, "status", KEY, "--json")
        assert code == 0, out
        data: dict[str, Any] = json.loads(out)
        live = [row for row in data["workers"] if row["live"]]
        return data if len(live) == len(workers) else None

    data = wait_until(every_worker_live, "every worker live in status", timeout=20)
    hosts = {row["worker"].split(":")[0] for row in data["workers"] if row["live"]}
    assert hosts == {"pod-a", "pod-b"}
    [summary] = data["summary"]
    assert summary["converged"], summary
    assert summary["newest_version"] == newest.version, summary
    code, out = run_cli(capsys, survivors[-1].url, "wait", KEY, "--timeout", "20")
    assert code == 0, out
    assert "Traceback" not in daemon.output()
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)


def test_threaded_and_asyncio_subscribers_follow_a_failover_in_process(
    redis_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    """No publisher daemon: entries written through redis-py's cluster client."""
    import asyncio

    owner = redis_cluster.master_for(EVENTS)
    append_event(owner.url, KEY, b"n: 1\n", version=1)
    seen: list[str] = []
    threaded = Subscriber(KEY, seen.append, redis_url=redis_cluster.replicas_of(owner)[0].url,
                          block_ms=500)  # fmt: skip
    threaded.start()

    async def scenario() -> int:
        other = other_nodes(redis_cluster, owner)[0]
        async with AsyncSubscriber(KEY, lambda _c: None, redis_url=other.url, block_ms=500) as sub:
            redis_cluster.kill(owner)
            promoted = await asyncio.to_thread(redis_cluster.wait_failover, owner, EVENTS)
            # the write the subscribers must see comes after the failover
            await asyncio.to_thread(append_event, promoted.url, KEY, b"n: 2\n", version=2)
            await asyncio.to_thread(wait_until, lambda: sub.version == 2, "async on v2", 20)
            return sub.version

    try:
        assert asyncio.run(scenario()) == 2
        wait_until(lambda: threaded.version == 2, "threaded subscriber on v2", 20)
        assert seen == ["n: 1\n", "n: 2\n"]
    finally:
        threaded.stop()


def test_a_user_not_allowed_cluster_slots_is_told_what_to_grant(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Without CLUSTER SLOTS a cluster node looks standalone; its MOVED replies then name the
    permission to grant instead of a bare "399 127.0.0.1:PORT"."""
    owner = redis_cluster.master_for(EVENTS)
    append_event(owner.url, KEY, b"n: 1\n", version=1)
    for node in redis_cluster.nodes:  # ACLs are per node: set the user on every one
        admin = redis.Redis(port=node.port, socket_timeout=5)
        admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "limited", "on", ">limited-password", "~*", "+@all",
            "-cluster|slots",
        )  # fmt: skip
        admin.close()
    elsewhere = next(n for n in redis_cluster.master_nodes() if n.port != owner.port)
    url = f"redis://limited:limited-password@127.0.0.1:{elsewhere.port}/0"

    capsys.readouterr()
    assert cli(["history", KEY, "--redis", url]) == 3
    assert "grant it +cluster|slots" in capsys.readouterr().err
    with pytest.raises(RedisUnavailable, match=r"grant it \+cluster\|slots"):
        Subscriber(KEY, lambda _c: None, redis_url=url, start_timeout=1).start()


def test_subscribers_follow_a_manual_failover_whose_old_master_stays_up(
    redis_cluster: RedisCluster,
) -> None:
    """CLUSTER FAILOVER (planned maintenance): the old master lives on as a replica, so the
    subscribers' connections are not cut; their blocked XREAD is answered UNBLOCKED or their
    next command MOVED, and they go to the new master."""
    import asyncio

    owner = redis_cluster.master_for(EVENTS)
    replica = redis_cluster.replicas_of(owner)[0]
    append_event(owner.url, KEY, b"n: 1\n", version=1)
    threaded = Subscriber(KEY, lambda _c: None, redis_url=owner.url, block_ms=30_000)
    threaded.start()

    async def scenario() -> int:
        async with AsyncSubscriber(KEY, lambda _c: None, redis_url=owner.url,
                                   block_ms=30_000) as sub:  # fmt: skip
            await asyncio.sleep(0.3)  # both blocked in XREAD on the old master by now
            admin = redis.Redis(port=replica.port, socket_timeout=5)
            admin.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
            admin.close()
            await asyncio.to_thread(
                wait_until, lambda: redis_cluster.master_for(EVENTS).port == replica.port,
                "the replica took over", 20,
            )  # fmt: skip
            await asyncio.to_thread(append_event, replica.url, KEY, b"n: 2\n", version=2)
            # well within the 30 s block: the reads were cut short, not timed out
            await asyncio.to_thread(wait_until, lambda: sub.version == 2, "async on v2", 10)
            return sub.version

    try:
        assert asyncio.run(scenario()) == 2
        wait_until(lambda: threaded.version == 2, "threaded subscriber on v2", 10)
    finally:
        threaded.stop()
