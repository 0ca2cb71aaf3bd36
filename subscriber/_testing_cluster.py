"""``RedisCluster``: a real Redis Cluster on loopback for tests (see ``subscriber.testing``,
which re-exports it with ``ClusterNode`` lazily, so that a test using only ``RedisServer``
never loads this module). The node processes and the parsing of ``CLUSTER NODES`` live in
``_testing_nodes``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

from subscriber._testing_nodes import (
    POLL,
    SLOTS,
    ClusterNode,
    NodeLine,
    agreement_problem,
    default_node_command,
    owner_of,
    parse_cluster_info,
    parse_cluster_nodes,
    redis_errors,
    stream_problem,
)
from subscriber._testing_ports import BUS_OFFSET, cluster_port
from subscriber._testing_process import is_stopped, stop_process

if TYPE_CHECKING:
    import redis

__all__ = ["ClusterNode", "RedisCluster"]


class RedisCluster:
    """A real Redis Cluster of private ``redis-server`` processes on loopback.

    ``masters`` masters (at least 3: ``redis-cli --cluster create`` refuses fewer) with
    ``replicas`` replicas each; every node on a free port P (10000-19999, the slice of a
    pytest-xdist worker: see ``_testing_ports``) whose bus port P + 10000 is free too.
    Each node lives in ``directory/node-P`` (``nodes-P.conf``, ``redis.log``); persistence
    is off. Replicas may always be promoted (``cluster-replica-validity-factor 0``) and
    never migrate to another master, so the layout only changes by failovers. ``stop()``
    stops every process by PID, also after a ``start()`` that failed half-way.

    Admin commands use plain ``redis.Redis`` connections to one node with 1 s timeouts and
    no retries, never the cluster client; as ``username``/``password`` when given (a cluster
    whose default user is off). ``hosts`` puts node *i* on loopback address ``hosts[i]``
    (e.g. ``127.0.0.11``) instead of ``127.0.0.1``; a node's ``host`` may be changed while it
    is down, as a pod gets a new IP.

    A cluster running other settings (a shipped ``redis.conf``, its own users, its own create
    script) subclasses and overrides :meth:`node_command` and :meth:`form_cluster`; every
    wait, fault and topology question then works on it unchanged.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        executable: str = "redis-server",
        cli: str = "redis-cli",
        hosts: Sequence[str] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.directory = Path(directory)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.executable = shutil.which(executable) or executable
        self.cli = shutil.which(cli) or cli
        count = masters * (1 + replicas)
        self.hosts = list(hosts) if hosts is not None else ["127.0.0.1"] * count
        if len(self.hosts) != count:
            raise ValueError(f"hosts: {count} addresses needed, one per node")
        self.username = username
        self.password = password
        self.nodes: list[ClusterNode] = []
        self._created = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the first node (a cluster client discovers the others from it)."""
        if not self.nodes:
            raise RuntimeError("the cluster is not started")
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start the nodes, create the cluster, wait until every node says ``cluster_state:ok``
        and all agree on the slot map, ``masters`` masters with ``replicas`` replicas each,
        every replication link up. On any failure every process started is stopped."""
        if self._created:
            return self
        deadline = time.monotonic() + timeout
        self.nodes = []  # after a stop(): a new cluster on new ports
        try:
            self._start_nodes(deadline)
            self.form_cluster(deadline)
            self._wait(deadline, layout=True, what="cluster creation")
        except BaseException:
            self.stop()
            raise
        self._created = True
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGCONT + SIGTERM every node at once, SIGKILL those still there after ``grace``."""
        processes = [node._process for node in self.nodes if node._process is not None]
        for process in processes:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                    process.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._created = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL the node (also when frozen) and wait until its process is gone."""
        process = node._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def freeze(self, node: ClusterNode) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it answers nothing."""
        os.kill(node.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5.0
        while not is_stopped(node.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node} did not stop")
            time.sleep(0.005)

    def thaw(self, node: ClusterNode) -> None:
        os.kill(node.pid, signal.SIGCONT)

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """Stop the node if it runs, start it on the same port with the same ``nodes.conf``
        and wait until it is back in the cluster (seen healthy by every live node, its
        replication link up if it came back as a replica)."""
        deadline = time.monotonic() + timeout
        if node._process is not None:
            stop_process(node._process, 5.0)
        self.revive(node, timeout=timeout)
        self._wait(deadline, layout=False, what=f"{node.address} to rejoin")
        return node

    def revive(self, *nodes: ClusterNode, timeout: float = 30.0) -> None:
        """Start ``nodes`` (stopped or killed) again on their ports with their ``nodes.conf``
        (a fresh node if that file was removed), and wait until each answers PING -- not
        until the cluster settles (several nodes may have to come back first): call
        :meth:`wait_ok` for that."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            if node.running:
                raise RuntimeError(f"{node} is running: kill() or stop() it first")
            self._spawn(node, fresh=False)
        for node in nodes:
            if not self._wait_ready(node, deadline):
                raise RuntimeError(f"cluster node {node.address} exited: {node.log_tail()}")

    # -- topology -------------------------------------------------------------------------

    def slot_of(self, key: str) -> int:
        """``CLUSTER KEYSLOT key``, asked of a live node."""
        for node in self._live():
            try:
                with self._admin(node) as client:
                    return int(client.execute_command("CLUSTER", "KEYSLOT", key))
            except redis_errors():
                continue
        raise RuntimeError("no live cluster node to ask CLUSTER KEYSLOT")

    def master_for(self, key: str) -> ClusterNode:
        """The node that currently owns the slot of ``key``.

        Asks every live node (``CLUSTER NODES``) and applies Redis's own rule: of all the
        claims on the slot, the one with the highest config epoch wins. Before a failover
        has happened that is still the old master, even if it is down.
        """
        slot = self.slot_of(key)
        owner = owner_of(slot, list(self._views().values()))
        if owner is None:
            raise RuntimeError(f"no node claims slot {slot}")
        return self._by_id(owner)

    def master_nodes(self) -> list[ClusterNode]:
        """The nodes that own slots, in slot order (Redis's highest-epoch rule per range)."""
        views = list(self._views().values())
        bounds = sorted(
            {first for lines in views for line in lines for first, _ in line.slots}
            | {last + 1 for lines in views for line in lines for _, last in line.slots}
        )
        owners: list[ClusterNode] = []
        for first in bounds:
            owner = owner_of(first, views) if first < SLOTS else None
            if owner is not None and self._by_id(owner) not in owners:
                owners.append(self._by_id(owner))
        return owners

    def replicas_of(self, node: ClusterNode) -> list[ClusterNode]:
        """The nodes replicating ``node``: a live node says so itself, a down one as the
        live nodes last saw it."""
        views = self._views()
        replicas = []
        for other in self.nodes:
            if other is node:
                continue
            if other in views:
                lines = [line for line in views[other] if "myself" in line.flags]
            else:
                lines = [
                    line
                    for view in views.values()
                    for line in view
                    if line.node_id == other.node_id
                ][:1]
            if lines and not lines[0].is_master and lines[0].master_id == node.node_id:
                replicas.append(other)
        return replicas

    # -- waiting --------------------------------------------------------------------------

    def wait_ok(self, timeout: float = 30.0, *, layout: bool = False) -> None:
        """Wait until every live node says ``cluster_state:ok``, all agree on the slot map
        and on every live node's role, every slot's master is live, every live node sees
        the others healthy, and every live replica's link to its master is up (and, with
        ``layout``, ``masters`` masters have ``replicas`` replicas each)."""
        self._wait(time.monotonic() + timeout, layout=layout, what="cluster_state:ok")

    def problem(self, *, layout: bool = True) -> str | None:
        """Why the cluster is not settled right now (see :meth:`wait_ok`), or None."""
        try:
            return self._problem(layout=layout)
        except redis_errors(RuntimeError) as exc:
            return str(exc)

    def wait_failover(
        self, old_master: ClusterNode, key: str, timeout: float = 30.0
    ) -> ClusterNode:
        """Wait until a live node other than ``old_master`` (so a former replica) owns the
        slot of ``key`` in the view of every live node and every live node says
        ``cluster_state:ok``; return that new master."""
        deadline = time.monotonic() + timeout
        slot = self.slot_of(key)
        reason = "no answer yet"
        while True:
            try:
                reason = self._failover_problem(old_master, slot) or ""
            except redis_errors(RuntimeError) as exc:
                reason = str(exc)
            if not reason:
                return self.master_for(key)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover of {old_master} for slot {slot}: {reason}")
            time.sleep(POLL)

    def _failover_problem(self, old_master: ClusterNode, slot: int) -> str | None:
        live = self._live()
        views = self._views(live)
        if len(views) < len(live):
            return "a live node did not answer"
        for node in live:
            with self._admin(node) as client:
                state = parse_cluster_info(client.execute_command("CLUSTER", "INFO"))
            if state.get("cluster_state") != "ok":
                return f"{node.address} cluster_state:{state.get('cluster_state')}"
        owners = {owner_of(slot, [lines]) for lines in views.values()}
        if len(owners) != 1:
            return f"live nodes disagree on the owner of slot {slot}"
        owner = owners.pop()
        if owner is None or owner == old_master.node_id:
            return f"slot {slot} still belongs to {old_master}"
        if not self._by_id(owner).live:
            return f"slot {slot} belongs to {self._by_id(owner)}"
        return None

    def _wait(self, deadline: float, *, layout: bool, what: str) -> None:
        reason = "no answer yet"
        while True:
            problem = self.problem(layout=layout)
            if problem is None:
                return
            reason = problem
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}: {reason}")
            time.sleep(POLL)

    def _problem(self, *, layout: bool) -> str | None:
        """Why the cluster is not settled yet, or None."""
        live = self._live()
        if not live:
            return "no live node"
        views: dict[ClusterNode, list[NodeLine]] = {}
        linked: dict[ClusterNode, int] = {}  # master -> its live replicas with the link up
        for node in live:
            with self._admin(node) as client:
                state = parse_cluster_info(client.execute_command("CLUSTER", "INFO"))
                views[node] = parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
                if state.get("cluster_state") != "ok":
                    return f"{node.address} cluster_state:{state.get('cluster_state')}"
                if int(state.get("cluster_known_nodes", "0")) != len(self.nodes):
                    return f"{node.address} knows {state.get('cluster_known_nodes')} nodes"
                me = next((line for line in views[node] if "myself" in line.flags), None)
                if me is None:
                    return f"{node.address} does not list itself"
                if not me.is_master:
                    replication = cast(dict[str, Any], client.info("replication"))
                    master = self._by_id(me.master_id or "")
                    if replication.get("master_link_status") != "up":
                        return f"{node.address}: replication link to its master is down"
                    if int(replication.get("master_port", 0)) != master.port:
                        return f"{node.address} replicates :{replication.get('master_port')}"
                    linked[master] = linked.get(master, 0) + 1
        for master, count in linked.items():
            if master.live:
                with self._admin(master) as client:
                    if problem := stream_problem(client, master.address, count):
                        return problem
        problem, roles = agreement_problem(
            {node.address: lines for node, lines in views.items()},
            {node.node_id for node in live},
            lambda node_id: repr(self._by_id(node_id)),
        )
        if problem is not None:
            return problem
        if layout:
            masters = [node_id for node_id, role in roles.items() if role[0] == "master"]
            if len(masters) != self.masters:
                return f"{len(masters)} masters, expected {self.masters}"
            for master_id in masters:
                count = sum(1 for role in roles.values() if role == ("replica", master_id))
                if count != self.replicas:
                    return f"{self._by_id(master_id)} has {count} replicas"
        return None

    # -- internals ------------------------------------------------------------------------

    def _live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.live]

    def _by_id(self, node_id: str) -> ClusterNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise RuntimeError(f"unknown cluster node id {node_id!r}")

    def _admin(self, node: ClusterNode) -> redis.Redis:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host=node.host,
            port=node.port,
            username=self.username,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def _views(self, nodes: list[ClusterNode] | None = None) -> dict[ClusterNode, list[NodeLine]]:
        """``CLUSTER NODES`` of every live node that answers."""
        views = {}
        for node in self._live() if nodes is None else nodes:
            try:
                with self._admin(node) as client:
                    text = client.execute_command("CLUSTER", "NODES")
            except redis_errors():
                continue
            views[node] = parse_cluster_nodes(text)
        if not views:
            raise RuntimeError("no live cluster node answers CLUSTER NODES")
        return views

    def node_command(self, node: ClusterNode) -> list[str]:
        """The argv that starts ``node`` (each start: a subclass may write its config here)."""
        return default_node_command(self.executable, node, self.node_timeout_ms)

    def _spawn(self, node: ClusterNode, *, fresh: bool) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        if fresh:
            node.config_path.unlink(missing_ok=True)
        node._process = subprocess.Popen(
            self.node_command(node),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_ready(self, node: ClusterNode, deadline: float) -> bool:
        """Wait for PING; False if the process exited (e.g. its port was taken meanwhile)."""
        while True:
            process = node._process
            if process is None or process.poll() is not None:
                return False
            try:
                with self._admin(node) as client:
                    if client.ping():
                        node.node_id = str(client.execute_command("CLUSTER", "MYID"))
                        return True
            except redis_errors() as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster node {node.address} not ready: {exc}") from exc
            time.sleep(0.02)

    def _start_nodes(self, deadline: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        for host in self.hosts:
            node = ClusterNode(self.directory, cluster_port(taken), host)
            taken |= {node.port, node.port + BUS_OFFSET}
            self.nodes.append(node)
            self._spawn(node, fresh=True)
        for node in self.nodes:
            for _attempt in range(5):
                if self._wait_ready(node, deadline):
                    break
                # lost a race for its port: another one (nothing refers to it yet)
                log = node.log_tail()
                if "Address already in use" not in log:
                    raise RuntimeError(f"cluster node {node.address} exited: {log}")
                node.port = cluster_port(taken)
                taken |= {node.port, node.port + BUS_OFFSET}
                self._spawn(node, fresh=True)
            else:
                raise RuntimeError(f"cluster node {node.address} could not bind a port")

    def form_cluster(self, deadline: float) -> None:
        """Make the started nodes one cluster (``redis-cli --cluster create``) by
        ``deadline`` (``time.monotonic()``); :meth:`start` then waits for it to settle."""
        auth = ["--user", self.username] if self.username else []
        argv = [
            self.cli,
            *auth,
            "--cluster", "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env={**os.environ, "REDISCLI_AUTH": self.password} if self.password else None,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"redis-cli --cluster create timed out: {exc.output!r}") from exc
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0 or "[OK] All 16384 slots covered" not in output:
            raise RuntimeError(f"redis-cli --cluster create failed ({result.returncode}): {output}")
