"""How a subscriber finds the node serving its key (subscriber._cluster), without a cluster.

The behaviour against a real 6-node cluster (failover included) is in test_cluster.py; these
pin the parsing and the decisions, including replies a real cluster rarely sends.
"""

from __future__ import annotations

import pytest
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from subscriber import Subscriber
from subscriber._cluster import (
    Topology,
    TopologyChanged,
    check_topology,
    is_wrong_node,
    slot_master,
)
from subscriber._target import parse
from subscriber._wire import Batch
from subscriber.testing import RedisServer, append_event

KEY = "hotreload:{app.yaml}:events"


def _slots(*ranges: tuple[int, int, str, int, str, int]) -> list[list[object]]:
    """A CLUSTER SLOTS reply: (start, end, master host, port, replica host, port)."""
    return [
        [start, end, [m_host.encode(), m_port, b"id"], [r_host.encode(), r_port, b"id"]]
        for start, end, m_host, m_port, r_host, r_port in ranges
    ]


REPLY = _slots(
    (0, 5460, "10.0.0.1", 7000, "10.0.0.4", 7000),
    (5461, 10922, "10.0.0.2", 7000, "10.0.0.5", 7000),
    (10923, 16383, "10.0.0.3", 7000, "10.0.0.6", 7000),
)


def test_slot_master_finds_the_owner_and_lists_masters_first() -> None:
    owner, nodes = slot_master(REPLY, 6000, "seed")
    assert owner == ("10.0.0.2", 7000)
    assert nodes[:3] == [("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000)]
    assert len(nodes) == 6


def test_slot_master_empty_host_is_the_node_connected_to_and_gaps_have_no_owner() -> None:
    reply = [[0, 100, [b"", 7001, b"id"]], [200, 300, [b"?", 7002, b"id"]]]
    assert slot_master(reply, 50, "redis-0.redis")[0] == ("redis-0.redis", 7001)
    assert slot_master(reply, 150, "x")[0] is None  # uncovered: a failover in progress
    assert slot_master(reply, 250, "x")[0] is None  # unknown endpoint: unusable
    assert slot_master([b"junk", [1], None], 1, "x") == (None, [])


def node_url(seed: str, host: str, port: int) -> str:
    return parse(seed).node(host, port).url


def test_node_url_keeps_credentials_and_tls_options_but_not_the_database() -> None:
    seed = "rediss://app:s3cret@redis:6380/0?ssl_ca_certs=/ca.pem&db=0"
    node = parse(seed).node("10.0.0.2", 7000)
    assert node.url == "rediss://app:s3cret@10.0.0.2:7000?ssl_ca_certs=/ca.pem"
    assert (node.host, node.port, node.db, node.password) == ("10.0.0.2", 7000, 0, "s3cret")
    assert node_url("redis://redis:6379/0", "::1", 7000) == "redis://[::1]:7000"
    assert node_url("unix:///run/redis.sock?db=0", "10.0.0.1", 7000) == "redis://10.0.0.1:7000"


@pytest.mark.parametrize(
    "error",
    [
        MovedError("6000 10.0.0.2:7000"),
        AskError("6000 10.0.0.2:7000"),
        TryAgainError("try again"),
        ClusterDownError("The cluster is down"),
        MasterDownError("link with master is down"),
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("UNBLOCKED force unblock from blocking operation"),
    ],
)
def test_replies_saying_the_slot_is_elsewhere_raise_topology_changed(error: Exception) -> None:
    assert is_wrong_node(error)
    with pytest.raises(TopologyChanged):
        check_topology([b"OK", error])


def test_ordinary_refusals_are_left_to_the_caller() -> None:
    refused = ResponseError("OOM command not allowed when used memory > 'maxmemory'")
    assert not is_wrong_node(refused)
    check_topology([refused, b"OK"])  # no raise: the caller reports it as a refused command


def test_topology_follows_the_owner_and_moves_on_from_an_unreachable_node() -> None:
    topology = Topology(parse("redis://10.0.0.3:7000/0"), KEY)
    assert topology.slot == 399  # the hash tag's slot: {app.yaml}
    batch = Batch()
    assert topology.probe(batch)
    assert batch.commands == [("CLUSTER", "SLOTS")]
    assert topology.probed(REPLY) == "redis://10.0.0.1:7000"
    assert topology.probed(REPLY) is None  # connected to the owner now: stay
    topology.unreachable()  # the owner died: the seed next, then the other nodes
    assert topology.url == "redis://10.0.0.3:7000/0"
    topology.unreachable()  # the seed failed too: a node the reply named
    assert topology.url.startswith("redis://10.0.0.")
    assert topology.url != "redis://10.0.0.3:7000/0"
    uncovered = [[1000, 2000, [b"10.0.0.1", 7000, b"id"]]]
    with pytest.raises(TopologyChanged, match="no node serves slot 399"):
        topology.probed(uncovered)


def test_the_next_subscriber_of_a_slot_goes_straight_to_its_master() -> None:
    """The master found is remembered per (seed, slot) in the process: a second subscriber
    (another key, a restart) connects there first, rather than being redirected again."""
    first = Topology(parse("redis://10.0.0.2:7000/0"), KEY)
    assert first.probed(REPLY) == "redis://10.0.0.1:7000"
    second = Topology(parse("redis://10.0.0.2:7000/0"), KEY)
    assert second.url == "redis://10.0.0.1:7000"
    assert second.probed(REPLY) is None  # verified: stays
    second.unreachable()  # that master died: forgotten, the next one starts from the seed
    assert Topology(parse("redis://10.0.0.2:7000/0"), KEY).url == "redis://10.0.0.2:7000/0"


def test_a_seed_that_is_the_owner_is_used_as_it_is() -> None:
    topology = Topology(parse("redis://10.0.0.1:7000/0"), KEY)
    assert topology.probed(REPLY) is None
    assert topology.url == "redis://10.0.0.1:7000/0"


def test_standalone_redis_is_probed_once_per_process(redis_tcp: RedisServer) -> None:
    """A standalone Redis refuses CLUSTER SLOTS once; later connections send nothing extra."""
    append_event(redis_tcp.url, "probe.yaml", b"a: 1\n", version=1)
    first = Subscriber("probe.yaml", lambda _c: None, redis_url=redis_tcp.url)
    topology = first._topology
    assert not topology.standalone
    with first:
        assert first.version == 1
    assert topology.standalone
    assert not topology.probe(Batch())  # nothing queued: no extra round trip
    assert Subscriber("probe.yaml", lambda _c: None, redis_url=redis_tcp.url)._topology.standalone


def test_a_unix_socket_is_never_probed(redis_server: RedisServer) -> None:
    """A pod's own Redis on a unix socket: no CLUSTER SLOTS, so no ACL denial either."""
    assert Subscriber(
        "probe.yaml", lambda _c: None, redis_url=redis_server.url
    )._topology.standalone
