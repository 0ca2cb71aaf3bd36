"""The nodes of a test ``RedisCluster``: one node process, what ``CLUSTER NODES`` /
``CLUSTER INFO`` say about the cluster (the free port pairs nodes listen on come from
``_testing_ports``).

Kept apart from ``_testing_cluster`` (the life cycle and the waits) so each reads on its
own: the parsing here is pure and tested through the cluster's waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from subscriber._testing_process import is_stopped

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["ClusterNode"]

SLOTS = 16384
UNHEALTHY = frozenset({"fail", "fail?", "handshake", "noaddr"})
POLL = 0.05


class ClusterNode:
    """One ``redis-server`` of a :class:`RedisCluster`.

    The same object across ``kill()`` / ``restart()`` (same port, same ``nodes.conf``, so the
    same ``node_id``); ``pid`` is the current process, or the last one once it is gone.
    """

    __slots__ = ("_cluster_dir", "_process", "host", "node_id", "port")

    def __init__(self, cluster_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self._cluster_dir = cluster_dir
        self.port = port
        # a loopback address; may change while the node is down (a pod's new IP)
        self.host = host
        self.node_id = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def directory(self) -> Path:
        return self._cluster_dir / f"node-{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / f"nodes-{self.port}.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"cluster node {self.port} was never started")
        return self._process.pid

    @property
    def running(self) -> bool:
        """The process exists (it may be frozen)."""
        return self._process is not None and self._process.poll() is None

    @property
    def frozen(self) -> bool:
        return self.running and is_stopped(self.pid)

    @property
    def live(self) -> bool:
        """Running and not frozen: it can answer commands."""
        return self.running and not is_stopped(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else "running" if self.running else "down"
        return f"<ClusterNode {self.address} {self.node_id[:8] or '?'} {state}>"


@dataclass(frozen=True, slots=True)
class NodeLine:
    """One line of ``CLUSTER NODES``: how one node sees another (or itself)."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    epoch: int
    connected: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def role(self) -> tuple[str, str | None]:
        return ("master", None) if self.is_master else ("replica", self.master_id)


def parse_cluster_nodes(text: str) -> list[NodeLine]:
    lines = []
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) < 8:
            continue
        node_id, address, flags, master, _ping, _pong, epoch, link = parts[:8]
        hostport = address.split("@", 1)[0]
        port_text = hostport.rsplit(":", 1)[-1]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        lines.append(
            NodeLine(
                node_id=node_id,
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                epoch=int(epoch),
                connected=link == "connected",
                slots=tuple(slots),
            )
        )
    return lines


def parse_cluster_info(text: str) -> dict[str, str]:
    info = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            info[name] = value
    return info


def slot_map(lines: list[NodeLine]) -> list[tuple[int, int, str]]:
    """A node's view of slot ownership: sorted (first, last, master id), ranges merged."""
    ranges = sorted(
        (first, last, line.node_id)
        for line in lines
        if line.is_master
        for first, last in line.slots
    )
    merged: list[tuple[int, int, str]] = []
    for first, last, owner in ranges:
        if merged and merged[-1][2] == owner and merged[-1][1] + 1 == first:
            merged[-1] = (merged[-1][0], last, owner)
        else:
            merged.append((first, last, owner))
    return merged


def owner_of(s: int, views: list[list[NodeLine]]) -> str | None:
    """Who owns slot ``s``, Redis's own rule: the claim with the highest config epoch wins."""
    best: tuple[int, str] | None = None
    for lines in views:
        for line in lines:
            claims = line.is_master and any(first <= s <= last for first, last in line.slots)
            if claims and (best is None or line.epoch > best[0]):
                best = (line.epoch, line.node_id)
    return None if best is None else best[1]


def agreement_problem(
    views: dict[str, list[NodeLine]], live_ids: set[str], describe: Callable[[str], str]
) -> tuple[str | None, dict[str, tuple[str, str | None]]]:
    """What the live nodes' ``CLUSTER NODES`` (``views``, by the viewer's address) disagree
    on, or None, with every live node's role as they agree on it. ``describe`` names a node
    id in a message."""
    roles: dict[str, tuple[str, str | None]] = {}
    maps = [slot_map(lines) for lines in views.values()]
    if any(other != maps[0] for other in maps[1:]):
        return "live nodes disagree on the slot map", roles
    covered = sum(last - first + 1 for first, last, _ in maps[0])
    if covered != SLOTS:
        return f"{covered} of {SLOTS} slots covered", roles
    for _, _, owner in maps[0]:
        if owner not in live_ids:
            return f"slots of {describe(owner)} which is not live", roles
    for address, lines in views.items():
        seen = set()
        for line in lines:
            if line.node_id not in live_ids:
                continue
            seen.add(line.node_id)
            if "myself" not in line.flags and (line.flags & UNHEALTHY or not line.connected):
                return f"{address} sees {line.port} as {','.join(sorted(line.flags))}", roles
            if roles.setdefault(line.node_id, line.role) != line.role:
                return f"live nodes disagree on the role of {describe(line.node_id)}", roles
        if seen != live_ids:
            return f"{address} does not know every live node", roles
    return None, roles


def default_node_command(executable: str, node: ClusterNode, node_timeout_ms: int) -> list[str]:
    """``redis-server`` as a ``RedisCluster`` node: fast failovers, no persistence, replicas
    always promotable and never migrating, so the layout only changes by failovers."""
    return [
        executable,
        "--port", str(node.port),
        "--bind", node.host,
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(node.config_path),
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-replica-validity-factor", "0",
        "--cluster-allow-replica-migration", "no",
        "--dir", str(node.directory),
        "--save", "",
        "--appendonly", "no",
        "--repl-diskless-sync", "yes",
        "--repl-diskless-sync-delay", "0",
        "--shutdown-on-sigterm", "nosave now",
        "--daemonize", "no",
        "--logfile", str(node.log_path),
    ]  # fmt: skip


def redis_errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """What a node that is down, frozen or busy raises (redis-py loads on first use)."""
    import redis

    return (redis.RedisError, OSError, *extra)


def stream_problem(client: Any, address: str, replicas: int) -> str | None:
    """Whether the master at ``address`` (``client``: an admin connection to it) streams its
    writes to its ``replicas``: after a diskless sync Redis 7.0 starts that stream at the
    replica's first ``REPLCONF ACK`` once it is online, up to a second after the link is
    up; a write meanwhile is only buffered, and a failover then loses it (a replica
    promoted at offset 0: tests/test_aio_cluster_block.py, 1 in 5 runs on a fresh
    cluster). ``WAIT`` is answered only once the stream flows."""
    acked = int(client.execute_command("WAIT", replicas, 100))
    if acked < replicas:
        return f"{address} streams its writes to {acked} of its {replicas} replicas so far"
    return None
