"""The daemon's one connection to Redis and the ``Publisher`` on it.

Whether the URL names a Redis Cluster node is only known by asking it, so the client is made
on the first connection (``connect_any``), then kept for the daemon's life; so is the
Publisher, which remembers per key the versions and bases it wrote. After a lost connection
the loop only drops the pooled connections: the next command reconnects (a cluster client
reloads its slot map first).

The signing key reaches the Publisher from another thread (the key file's watcher); making
the Publisher and changing its key share one lock, so a key that changes while the Publisher
is being made reaches it all the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    TryAgainError,
)

from publisher._admin import connect_any
from publisher.publish import Publisher
from subscriber._redis import client_name
from subscriber._target import redacted
from subscriber.protocol import process_identity

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["CONNECTION_ERRORS", "Link"]

logger = logging.getLogger(__name__)


# What means "the connection is gone" (reconnect, re-seed every key) rather than "Redis
# refused this one command": READONLY, CLUSTERDOWN, ... are ResponseErrors too.
CONNECTION_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ReadOnlyError,
    ClusterDownError,
    ClusterError,
    TryAgainError,
    MovedError,
    RedisClusterException,
    OSError,
)


class Link:
    """The client and Publisher for ``url``, made by the first ``get``."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        history: int,
        signing_key: Callable[[], bytes | None],
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.history = history
        self._signing_key = signing_key
        self._client: AnyRedis | None = None
        self._publisher: Publisher | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[AnyRedis, Publisher]:
        """The client and the Publisher, made now if not yet (``connect_any`` asks the URL's
        node whether it is a cluster node: raises what a failed connection raises)."""
        client, publisher = self._client, self._publisher
        if client is not None and publisher is not None:
            return client, publisher
        client = connect_any(
            self.url,
            socket_timeout=5.0,
            connect_timeout=2.0,
            client_name=client_name("hotreload-pub", process_identity()),
        )
        with self._lock:
            publisher = Publisher(
                client,  # type: ignore[arg-type]  # RedisCluster too: same commands
                prefix=self.prefix,
                history=self.history,
                signing_key=self._signing_key(),
            )
            self._client, self._publisher = client, publisher
        if not isinstance(client, redis.Redis):
            logger.info("%s is a Redis Cluster node", redacted(self.url))
        return client, publisher

    def set_signing_key(self, key: bytes) -> None:
        with self._lock:
            if self._publisher is not None:
                self._publisher.set_signing_key(key)

    def disconnect(self) -> None:
        """Close every pooled connection; a cluster client reloads its slot map on the next
        error or redirect anyway (redis-py does, before raising or retrying)."""
        client = self._client
        if client is None:
            return
        if isinstance(client, redis.Redis):
            client.connection_pool.disconnect()
        else:
            client.disconnect_connection_pools()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
