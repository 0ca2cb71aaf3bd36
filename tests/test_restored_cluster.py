"""A first publish waiting for its workers' rows (``publisher._restored``) in a Redis Cluster
whose key's slot fails over meanwhile: the start its rows are compared with stays the one
that made it wait (or a later one), never the new master's earlier start.

The promoted replica holds the master's data (it replicated it), rows included; its own
start can be much earlier (a replica that ran on while its master restarted from an older
RDB within the node timeout: the replica resynced the restored data). Compared with that
earlier start, restored rows looked written since, and the first publish went at once,
numbered from them: at or below what the workers had seen, the defect the wait is for.

A real 3-master + 3-replica cluster; the key's master is restarted (as a replica, then
failed back over to) so that it started seconds after its replica; the rows' heartbeats
are put between the two starts.
"""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
import pytest
import redis

from publisher._admin import connect_any
from publisher._restored import FirstPublish
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState
from subscriber.testing import RedisCluster
from tests.helpers import wait_until
from tests.test_cluster_hub import manual_failover

pytestmark = pytest.mark.slow

KEY = "app.yaml"
WORKERS = stream_keys(KEY).workers


def row(worker: str, heartbeat: int) -> bytes:
    state = WorkerState(worker=worker, status="applied", version=3, seen=3,
                        heartbeat=heartbeat, heartbeat_interval=5.0, pid=1)  # fmt: skip
    return msgspec.json.encode(state)


def started_ms(url: str) -> tuple[int, int]:
    """A node's start, by its clock, as (earliest, latest) unix ms (uptime is whole s)."""
    admin = connect(url, socket_timeout=5)
    try:
        info: Any = admin.info("server")
    finally:
        admin.close()
    now = int(info["server_time_usec"]) // 1000
    start = now - int(info["uptime_in_seconds"]) * 1000
    return start - 1000, start + 1000


def fail_over_to(cluster: RedisCluster, node: Any) -> None:
    manual_failover(node)
    wait_until(lambda: cluster.master_for(WORKERS) == node, f"{node} took the slot over", 30)
    cluster.wait_ok()


@pytest.mark.parametrize("then", ["rechecked", "reconnected"])
def test_a_failover_during_the_wait_keeps_the_start_that_made_it_wait(
    redis_cluster: RedisCluster, then: str
) -> None:
    """``rechecked``: the daemon's cluster client follows the slot (redis-py's MOVED); the
    recheck finds the rows on the promoted replica. ``reconnected``: the daemon lost its
    connection meanwhile (a killed master: ``FirstPublish.reset``), then looks again."""
    master = redis_cluster.master_for(WORKERS)
    (replica,) = redis_cluster.replicas_of(master)
    fail_over_to(redis_cluster, replica)
    time.sleep(4.0)  # the master restarts 4 s after its replica started, at least
    redis_cluster.restart(master)  # as a replica: it resyncs from the new master
    fail_over_to(redis_cluster, master)
    replica_start, master_start = started_ms(replica.url)[1], started_ms(master.url)[0]
    assert master_start - replica_start >= 2000
    client = cast("redis.RedisCluster", connect_any(redis_cluster.url, socket_timeout=5.0))
    try:
        heartbeat = (replica_start + master_start) // 2  # after the replica's start only
        client.hset(WORKERS, mapping={w: row(w, heartbeat) for w in ("w1", "w2")})
        first = FirstPublish("hotreload")
        assert first.holds(client, KEY)  # every row predates its master's start
        fail_over_to(redis_cluster, replica)  # the replica, started before the rows
        wait_until(lambda: client.hlen(WORKERS) == 2, "the rows read on the new master")
        if then == "reconnected":
            first.reset()
        assert first.holds(client, KEY)  # still: nothing was written since the restore
        client.hset(WORKERS, "back", row("back", int(time.time() * 1000)))
        assert not first.holds(client, KEY)  # a worker back
    finally:
        client.close()
