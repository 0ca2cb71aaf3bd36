"""Redis URL handling and connection settings shared by the publisher and subscribers.

redis-py 8's defaults break blocking reads: a 5 s socket timeout makes ``XREAD BLOCK`` time out
and 10 hidden retries reconnect silently for about a minute before raising, while no timeout at
all hangs forever on a frozen (SIGSTOPped) Redis. So every connection here gets a socket timeout
a few seconds above the longest block, and no library retry: the callers run their own loops
with capped, jittered backoff and resync after every reconnect.
"""

from __future__ import annotations

import os
import random
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from subscriber.errors import ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "ENV_URL",
    "Backoff",
    "client_name",
    "connect",
    "connect_async",
    "redacted",
    "resolve_url",
]

ENV_URL = "HOTRELOAD_REDIS_URL"
_SCHEMES = {"redis", "rediss", "unix"}


def resolve_url(url: str | None) -> str:
    """The Redis URL to use: ``url``, else ``$HOTRELOAD_REDIS_URL``; validated."""
    chosen = url if url is not None else os.environ.get(ENV_URL, "")
    if not chosen:
        raise ConfigurationError(
            f"no Redis URL: pass --redis / redis_url= or set {ENV_URL} "
            "(e.g. unix:///var/run/hotreload/redis.sock or redis://localhost:6379/0)"
        )
    try:
        parts = urlsplit(chosen)
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric port
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(chosen)!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"malformed Redis URL {redacted(chosen)!r}: the scheme must be one of "
            "redis://, rediss:// or unix://"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigurationError(f"malformed Redis URL {chosen!r}: unix:// needs a socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"malformed Redis URL {redacted(chosen)!r}: no host")
    return chosen


def client_name(role: str, identity: str) -> str:
    """``role:identity`` as a CLIENT SETNAME value, so ``CLIENT LIST`` tells who is who.

    CLIENT SETNAME refuses spaces and control characters, and a refused name would make every
    connection fail: anything else becomes ``_``.
    """
    return f"{role}:" + re.sub(r"[^!-~]", "_", identity)[:200]


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _options(
    socket_timeout: float, connect_timeout: float, client_name: str | None
) -> dict[str, object]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "client_name": client_name,
        "decode_responses": False,  # content is raw bytes
        "health_check_interval": 0,
    }


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float = 2.0,
    client_name: str | None = None,
    pool_class: type[redis.ConnectionPool] | None = None,
) -> redis.Redis:
    """A client with our timeouts and no hidden retries (no I/O until the first command).

    ``pool_class``: a ``redis.ConnectionPool`` subclass to build the client's pool with.
    """
    import redis as redis_mod
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = _options(socket_timeout, connect_timeout, client_name)
    try:
        if pool_class is None:
            return redis_mod.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        pool = pool_class.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None
    return redis_mod.Redis.from_pool(pool)


def connect_async(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float = 2.0,
    client_name: str | None = None,
) -> redis.asyncio.Redis:
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    try:
        return aredis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            **_options(socket_timeout, connect_timeout, client_name),  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None


class Backoff:
    """Capped exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, *, base: float = 0.1, cap: float = 3.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        # never below base/2: a zero delay would let a dead Redis make the loop spin
        return max(self.base / 2, random.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0
