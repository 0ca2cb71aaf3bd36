"""Which Redis node serves a config key: the URL's own, or in a Redis Cluster the slot's master.

All keys of one config key share a slot (the ``{KEY}`` hash tag, see ``keys``), so in a
cluster a subscriber talks to exactly one node, the master of that slot, and keeps its fast
path there (one connection it holds, one packed batch per round trip, see ``_wire``). A
:class:`Topology` finds that node:

- The first command on every new connection is ``CLUSTER SLOTS``, in the batch that would be
  sent anyway. A standalone Redis refuses it ("cluster support disabled", or NOPERM for a
  user without it): the URL is then remembered as standalone for the whole process and later
  connections send nothing more. That is the ``cluster_enabled`` check, at no extra round trip
  for a standalone Redis after the first connection (and none at all for a ``unix://`` URL: a
  pod's own Redis; a cluster is reached over TCP).
- In a cluster the reply names the slot's master (and every node); if it is not the node
  connected to, the subscriber connects there instead.
- A reply saying the slot moved (``MOVED``, ``ASK``), is not served right now
  (``CLUSTERDOWN``, ``TRYAGAIN``, ``MASTERDOWN``) or that the node became a replica
  (``READONLY``, or ``UNBLOCKED`` for a blocked read) raises :class:`TopologyChanged`, a
  ``ConnectionError``: the subscriber reconnects (with its backoff) and looks again.
- A node that cannot be reached (a dead master before its replica took over) makes the next
  connection try the other nodes the last reply named, the URL's own first.

Why not redis-py's ``RedisCluster`` here: creating one costs ~60 ms (it loads ``COMMAND`` and
connects to the startup nodes), per subscriber and per reconnect, measured on this project's
2-core machine, against one round trip for ``CLUSTER SLOTS`` on the connection the subscriber
makes anyway. The publisher and the CLI, a few processes per pod, do use ``RedisCluster``.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from subscriber._redis import moved_hint
from subscriber._target import Target
from subscriber.errors import HotReloadError

__all__ = ["MAX_HOPS", "Topology", "TopologyChanged", "check_topology", "slot_master"]

# Redirections a subscriber follows before giving up on this connection attempt (a slot that
# keeps moving is then retried with the backoff).
MAX_HOPS = 3

# URLs that answered as a standalone Redis: process-wide, so each is asked once per process.
_standalone: set[str] = set()
_standalone_lock = threading.Lock()
# (seed URL, slot) -> the master last found for it, process-wide: the next subscriber of that
# slot (another key, a restart) connects there first and only verifies it, rather than being
# redirected from the seed (a second connection each). Plain dict operations: atomic.
_masters: dict[tuple[str, int], Target] = {}


class TopologyChanged(redis.ConnectionError, HotReloadError):
    """The node connected to does not (or no longer) serve this config key's slot.

    A ``redis.ConnectionError`` first: the transports treat it as a lost connection
    (reconnect with backoff, look again), and so does any caller that catches redis-py's
    connection errors. Also a ``HotReloadError``, as every error hotreload raises.

    ``reply``: the error reply that said so, if one did."""

    def __init__(self, message: str, *, reply: Exception | None = None) -> None:
        super().__init__(message)
        self.reply = reply

    def explained(self, standalone: bool) -> str:
        """The message; for a MOVED on a connection taken as standalone, what to grant."""
        if standalone and isinstance(self.reply, MovedError):
            return moved_hint(self.reply)
        return str(self)


def is_wrong_node(result: object) -> bool:
    """Whether a command's reply says the slot is served elsewhere or not at all."""
    # redis-py parses MOVED/ASK/TRYAGAIN/CLUSTERDOWN/MASTERDOWN/READONLY into these classes
    # (MovedError is an AskError, MasterDownError a ClusterDownError); UNBLOCKED it does not.
    if isinstance(result, AskError | TryAgainError | ClusterDownError | ReadOnlyError):
        return True
    return isinstance(result, ResponseError) and str(result).startswith("UNBLOCKED")


def check_topology(results: list[Any]) -> None:
    """Raise :class:`TopologyChanged` if any reply of a batch says the slot is elsewhere."""
    for result in results:
        if is_wrong_node(result):
            raise TopologyChanged(f"{type(result).__name__}: {result}", reply=result)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def slot_master(
    reply: Any, slot: int, connected_host: str
) -> tuple[tuple[str, int] | None, list[tuple[str, int]]]:
    """From a ``CLUSTER SLOTS`` reply: the master of ``slot`` (or ``None`` if no node serves
    it) and every node named, masters first. An empty host means the node connected to."""
    owner: tuple[str, int] | None = None
    masters: list[tuple[str, int]] = []
    replicas: list[tuple[str, int]] = []
    for entry in reply or []:
        if not isinstance(entry, list | tuple) or len(entry) < 3:
            continue
        start, end, *nodes = entry
        for index, node in enumerate(nodes):
            if not isinstance(node, list | tuple) or len(node) < 2:
                continue
            host = _text(node[0]) or connected_host
            if host == "?":  # an unknown endpoint (cluster-preferred-endpoint-type unknown)
                continue
            address = (host, int(node[1]))
            group = masters if index == 0 else replicas
            if address not in group:
                group.append(address)
            if index == 0 and int(start) <= slot <= int(end):
                owner = address
    return owner, masters + [node for node in replicas if node not in masters]


class Topology:
    """Where one subscriber connects: the seed's node, or its slot's master in a cluster.

    ``node`` is where the next connection goes (``url``: its URL). Per new connection:
    :meth:`probe` queues what to ask (nothing for a known standalone Redis), :meth:`probed`
    decides from the reply whether to stay or to go to the URL it returns, and
    :meth:`unreachable` moves on to another node after a connection to ``node`` failed. A
    ``redis+sentinel://`` seed is never probed: the transport sets ``node`` to the master the
    sentinels name (``_sentinel``) before each connection.
    """

    def __init__(self, seed: Target, events_key: str) -> None:
        self.seed = seed
        self.slot = key_slot(events_key.encode())
        self.node = _masters.get((seed.url, self.slot), seed)
        self._known: list[Target] = []  # nodes from the last CLUSTER SLOTS reply
        self._next_candidate = 0
        self.cluster = False  # a CLUSTER SLOTS reply said so (``_clusterhub`` may share)

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def sentinel(self) -> bool:
        return self.seed.sentinel

    @property
    def standalone(self) -> bool:
        # A unix socket is a pod's own Redis: a cluster redirects to TCP addresses anyway.
        return self.seed.unix or self.seed.sentinel or self.seed.url in _standalone

    def probe(self, batch: Any) -> bool:
        """Queue ``CLUSTER SLOTS`` on ``batch`` unless the seed is a known standalone Redis."""
        if self.standalone:
            return False
        batch.command("CLUSTER", "SLOTS")
        return True

    def probed(self, reply: Any) -> str | None:
        """``None``: the connection to ``node`` serves the key. Else the URL to go to."""
        seed = self.seed
        if isinstance(reply, ResponseError):
            if is_wrong_node(reply):
                raise TopologyChanged(f"{type(reply).__name__}: {reply}", reply=reply)
            if self.node != seed:
                raise reply  # a node the cluster named refuses CLUSTER SLOTS: say why
            # "cluster support disabled", or a user not allowed CLUSTER: used as it is
            with _standalone_lock:
                _standalone.add(seed.url)
            return None
        owner, nodes = slot_master(reply, self.slot, self.node.host or "127.0.0.1")
        self._known = [seed.node(*node) for node in nodes]
        self.cluster = True
        if owner is None:
            raise TopologyChanged(
                f"no node serves slot {self.slot} (a failover in progress?); retrying"
            )
        target = seed.node(*owner)
        if target == self.node or (self.node == seed and seed.same_node(*owner)):
            _masters[seed.url, self.slot] = self.node
            return None
        self.node = _masters[seed.url, self.slot] = target
        return target.url

    def follow(self, reply: Any, asked: Target) -> Target:
        """From a ``CLUSTER SLOTS`` reply of any node (``asked``): the slot's master, now
        ``node`` (the seed itself when it is that node, so that keys of one master agree
        on its ``Target``); ``TopologyChanged`` if no node serves the slot."""
        owner, nodes = slot_master(reply, self.slot, asked.host or "127.0.0.1")
        self._known = [self.seed.node(*node) for node in nodes]
        if owner is None:
            raise TopologyChanged(f"no node serves slot {self.slot} (a failover?); retrying")
        target = self.seed if self.seed.same_node(*owner) else self.seed.node(*owner)
        self.node = _masters[self.seed.url, self.slot] = target
        return target

    def known(self) -> list[Target]:
        """The seed, then every node the last ``CLUSTER SLOTS`` reply named."""
        return [self.seed] + [node for node in self._known if node != self.seed]

    def unreachable(self) -> None:
        """A connection to ``node`` failed: next time try another node, the seed first."""
        key = (self.seed.url, self.slot)
        if _masters.get(key) == self.node:
            _masters.pop(key, None)
        candidates = [self.seed] + [node for node in self._known if node != self.seed]
        candidates = [node for node in candidates if node != self.node] or [self.seed]
        self.node = candidates[self._next_candidate % len(candidates)]
        self._next_candidate += 1

    def describe(self) -> str:
        """The node in use, for logs (no password)."""
        return self.node.redacted()
