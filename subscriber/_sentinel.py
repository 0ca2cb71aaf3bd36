"""``redis+sentinel://`` URLs: a master found through Redis Sentinel, again after a failover.

::

    redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?sentinel_password=P]

``HOST:PORT`` are the sentinels (port default 26379), ``SERVICE`` the master's name in their
configuration (``sentinel monitor SERVICE ...``), ``USER:PASSWORD`` the credentials for the
Redis master itself and ``sentinel_password`` (with ``sentinel_username``) those of the
sentinels, if they require any. Every new connection asks the sentinels for the master
(redis-py's ``Sentinel.discover_master``, which also checks the master is not down or
demoted) and connects to it with a plain ``redis://`` URL, so the subscriber keeps its fast
path on that connection. A master that becomes a replica refuses the next write (``READONLY``)
or cuts a blocked read (``UNBLOCKED``): that is a lost connection (see ``_cluster``), and the
next one asks the sentinels again.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from subscriber.errors import ConfigurationError

__all__ = ["SCHEME", "SentinelTarget", "is_sentinel", "master_url", "master_url_async", "parse"]

SCHEME = "redis+sentinel"
DEFAULT_PORT = 26379
_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None

    def node_url(self, host: str, port: int) -> str:
        """A plain URL of the master at ``host:port``, with the master's credentials."""
        userinfo = ""
        if self.username or self.password:
            userinfo = quote(self.username or "", safe="") + ":"
            userinfo += quote(self.password or "", safe="") + "@"
        address = f"[{host}]" if ":" in host else host
        return f"redis://{userinfo}{address}:{port}/{self.db}"

    def sentinel_kwargs(self, timeout: float) -> dict[str, object]:
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse(url: str) -> SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL; ``ConfigurationError`` naming what is wrong."""

    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(f"malformed Sentinel URL {_redacted(url)!r}: {problem}")

    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise bad(f"the scheme must be {SCHEME}://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels: list[tuple[str, int]] = []
    for item in (part.strip() for part in hosts.split(",")):
        if item.startswith("["):  # [IPv6]:PORT
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
        else:
            host, _, port = item.partition(":")
        if not host:
            raise bad("no sentinel host (HOST:PORT[,HOST:PORT...])")
        try:
            number = int(port) if port else DEFAULT_PORT
        except ValueError:
            raise bad(f"the port of sentinel {item!r} is not a number") from None
        if not 0 < number < 65536:
            raise bad(f"the port of sentinel {item!r} is out of range")
        sentinels.append((host, number))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise bad("no service name: redis+sentinel://HOSTS/SERVICE[/DB]")
    if len(path) > 2:
        raise bad("the path is /SERVICE[/DB]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise bad(f"the database {path[1]!r} is not a number")
        db = int(path[1])
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise bad(f"unknown option {unknown[0]!r}; options: {', '.join(sorted(_OPTIONS))}")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=path[0],
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=options.get("sentinel_username", [None])[-1],
        sentinel_password=options.get("sentinel_password", [None])[-1],
    )


def master_url(url: str, *, timeout: float) -> str:
    """Ask the sentinels of ``url`` where its master is now; a plain ``redis://`` URL.

    Raises redis-py's ``MasterNotFoundError`` (a ``ConnectionError``) when none knows.
    """
    from redis.sentinel import Sentinel

    target = parse(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout)
    )
    try:
        host, port = sentinel.discover_master(target.service)  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        for client in sentinel.sentinels:
            client.close()
    return target.node_url(str(host), int(port))


async def master_url_async(url: str, *, timeout: float) -> str:
    """:func:`master_url` on ``redis.asyncio``."""
    from redis.asyncio.sentinel import Sentinel

    target = parse(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout)
    )
    try:
        host, port = await sentinel.discover_master(target.service)
    finally:
        for client in sentinel.sentinels:
            await client.aclose()
    return target.node_url(str(host), int(port))


def _redacted(url: str) -> str:
    """``url`` without its passwords (the master's and the sentinels')."""
    head, sep, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        head = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = "&".join(
        "sentinel_password=***" if option.startswith("sentinel_password=") else option
        for option in query.split("&")
    )
    return head + sep + query
