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
from urllib.parse import urlsplit, urlunsplit

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

from subscriber._redis import moved_hint, redacted
from subscriber._sentinel import is_sentinel

__all__ = ["Topology", "TopologyChanged", "check_topology", "node_url", "slot_master"]

# Redirections a subscriber follows before giving up on this connection attempt (a slot that
# keeps moving is then retried with the backoff).
MAX_HOPS = 3

# URLs that answered as a standalone Redis: process-wide, so each is asked once per process.
_standalone: set[str] = set()
_standalone_lock = threading.Lock()
# (seed, slot) -> the URL of the master last found for it, process-wide: the next subscriber
# of that slot (another key, a restart) connects there first and only verifies it, rather than
# being redirected from the seed (a second connection each). Plain dict operations: atomic.
_masters: dict[tuple[str, int], str] = {}


class TopologyChanged(redis.ConnectionError):
    """The node connected to does not (or no longer) serve this config key's slot.

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


def node_url(seed: str, host: str, port: int) -> str:
    """The URL of cluster node ``host:port`` with ``seed``'s credentials and TLS options."""
    parts = urlsplit(seed)
    scheme = "rediss" if parts.scheme == "rediss" else "redis"
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if parts.scheme == "unix":  # unix://[user:password@]/path?db=0: no credentials in netloc
        userinfo = ""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{address}" if userinfo else address
    query = "&".join(
        option for option in parts.query.split("&") if option and not option.startswith("db=")
    )
    return urlunsplit((scheme, netloc, "", query, ""))


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
    """Where one subscriber connects: the URL's node, or its slot's master in a cluster.

    ``url`` is where the next connection goes. Per new connection: :meth:`probe` queues what
    to ask (nothing for a known standalone Redis), :meth:`probed` decides from the reply
    whether to stay or to go to the URL it returns, and :meth:`unreachable` moves on to
    another node after a connection to ``url`` failed.
    """

    def __init__(self, seed: str, events_key: str) -> None:
        self.seed = seed
        self.slot = key_slot(events_key.encode())
        self.url = _masters.get((seed, self.slot), seed)
        self._known: list[str] = []  # node URLs from the last CLUSTER SLOTS reply
        self._next_candidate = 0

    @property
    def sentinel(self) -> bool:
        """A ``redis+sentinel://`` seed: ``url`` is set from the sentinels before each
        connection (``_sentinel``), never probed."""
        return is_sentinel(self.seed)

    @property
    def standalone(self) -> bool:
        # A unix socket is a pod's own Redis: a cluster redirects to TCP addresses anyway.
        return self.seed.startswith("unix:") or self.sentinel or self.seed in _standalone

    def probe(self, batch: Any) -> bool:
        """Queue ``CLUSTER SLOTS`` on ``batch`` unless the seed is a known standalone Redis."""
        if self.standalone:
            return False
        batch.command("CLUSTER", "SLOTS")
        return True

    def probed(self, reply: Any) -> str | None:
        """``None``: the connection to ``url`` serves the key. Else the URL to go to."""
        if isinstance(reply, ResponseError):
            if is_wrong_node(reply):
                raise TopologyChanged(f"{type(reply).__name__}: {reply}", reply=reply)
            if self.url != self.seed:
                raise reply  # a node the cluster named refuses CLUSTER SLOTS: say why
            # "cluster support disabled", or a user not allowed CLUSTER: used as it is
            with _standalone_lock:
                _standalone.add(self.seed)
            return None
        host = urlsplit(self.url).hostname or "127.0.0.1"
        owner, nodes = slot_master(reply, self.slot, host)
        self._known = [node_url(self.seed, *node) for node in nodes]
        if owner is None:
            raise TopologyChanged(
                f"no node serves slot {self.slot} (a failover in progress?); retrying"
            )
        target = node_url(self.seed, *owner)
        if target == self.url or (self.url == self.seed and _same_node(self.seed, owner)):
            _masters[self.seed, self.slot] = self.url
            return None
        self.url = _masters[self.seed, self.slot] = target
        return target

    def unreachable(self) -> None:
        """A connection to ``url`` failed: next time try another node, the seed first."""
        if _masters.get((self.seed, self.slot)) == self.url:
            _masters.pop((self.seed, self.slot), None)
        candidates = [self.seed] + [url for url in self._known if url != self.seed]
        candidates = [url for url in candidates if url != self.url] or [self.seed]
        self.url = candidates[self._next_candidate % len(candidates)]
        self._next_candidate += 1

    def describe(self) -> str:
        """The node in use, for logs (no password)."""
        return redacted(self.url)


def _same_node(seed: str, node: tuple[str, int]) -> bool:
    parts = urlsplit(seed)
    return parts.scheme != "unix" and (parts.hostname, parts.port or 6379) == node
