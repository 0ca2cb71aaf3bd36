"""Redis URL handling and connection settings shared by the publisher and subscribers.

redis-py 8's defaults break blocking reads: a 5 s socket timeout makes ``XREAD BLOCK`` time out
and 10 hidden retries reconnect silently for about a minute before raising, while no timeout at
all hangs forever on a frozen (SIGSTOPped) Redis. So every connection here gets a socket timeout
a few seconds above the longest block, and no library retry: the callers run their own loops
with capped, jittered backoff and resync after every reconnect.

TLS is a ``rediss://`` URL; its options are redis-py's own, as URL query parameters, so they
work everywhere a URL goes (``--redis``, ``$HOTRELOAD_REDIS_URL``, ``redis_url=``)::

    rediss://redis:6380/0?ssl_ca_certs=/etc/tls/ca.crt&ssl_certfile=/etc/tls/tls.crt&ssl_keyfile=/etc/tls/tls.key

``ssl_ca_certs`` (PEM file of the CA that signed the server's certificate; default: the
system's CAs), ``ssl_ca_path`` (a directory of them), ``ssl_certfile`` + ``ssl_keyfile`` (the
client certificate, for a server with ``tls-auth-clients yes``), ``ssl_cert_reqs``
(``required``, the default: the server's certificate must verify; ``optional``; ``none``
turns verification off), ``ssl_check_hostname`` (default true: the certificate must name the
URL's host), ``ssl_min_version``, ``ssl_ciphers``, ``ssl_password`` (of an encrypted key;
never shown in logs). :func:`resolve_url` refuses unknown options, TLS options on a
``redis://`` or ``unix://`` URL, and the options hotreload sets itself (timeouts, retries),
so a typo never silently turns verification off; :func:`describe_failure` explains a failed
TLS handshake in one line.

Redis Cluster (:func:`connect_any`, used by the publisher daemon, its ack follower and the
CLI; subscribers find their slot's master themselves, see ``_cluster``): a ``redis://`` or
``rediss://`` URL naming any node of a cluster just works. The URL's node is asked
``CLUSTER SLOTS`` once per URL per process, on a short-lived plain connection (without the
URL's database: a cluster node refuses ``SELECT``); a refusal ("cluster support disabled",
NOPERM, an unknown command) means a standalone Redis, and :func:`connect_any` then returns
exactly what :func:`connect` does. A ``unix://`` URL is never asked (a pod's own Redis; a
cluster redirects to TCP addresses anyway). A cluster node gets redis-py's ``RedisCluster``
(~60 ms to make: fine for these few long-lived clients), seeded with every node the probe
named (so it starts even if the URL's node has died since), with the URL's credentials and
TLS options (redis-py's cluster client drops ``ssl_min_version`` and ``ssl_ciphers``: a pool
class puts them back), our socket timeouts and client name, raw bytes, no health checks, and:

- one retry (``CLUSTER_RETRIES``) of a command that met a dead, frozen or demoted node,
  CLUSTERDOWN or an uncovered slot, after redis-py reloaded the slot map: a map gone stale in
  a failover costs one more round trip, while a dead node still fails within milliseconds
  (refused) and a frozen one after the socket timeout (twice at worst); the caller's own loop
  retries with its backoff. ``MOVED`` and ``ASK`` are followed by redis-py itself (up to 16
  hops), every ``MOVED`` reloading the whole map (``reinitialize_steps=1``: a failover moves
  many slots at once, and a pipeline reloads it before retrying what failed);
- ``require_full_coverage=False``: a cluster that still serves some slots (server-side
  ``cluster-require-full-coverage no``) serves ours; an uncovered slot fails its keys alone.

All keys of one config key share a slot (``keys``), so single-key commands, the publish script
and one key's ``MULTI`` go to one node; anything spanning keys must group them per slot.
"""

from __future__ import annotations

import os
import random
import re
import ssl
import threading
from typing import TYPE_CHECKING, Any, TypeAlias, cast
from urllib.parse import parse_qs, urlsplit

from subscriber.errors import ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.cluster

    # What :func:`connect_any` returns: a standalone client, or one for a Redis Cluster.
    AnyRedis: TypeAlias = redis.Redis | redis.cluster.RedisCluster

__all__ = [
    "CLUSTER_RETRIES",
    "ENV_URL",
    "Backoff",
    "client_name",
    "cluster_nodes",
    "connect",
    "connect_any",
    "connect_async",
    "describe_failure",
    "is_cluster",
    "moved_hint",
    "redacted",
    "resolve_url",
]

ENV_URL = "HOTRELOAD_REDIS_URL"
_SCHEMES = {"redis", "rediss", "unix"}
# redis-py's URL query options that hotreload passes on (TLS ones only with rediss://) ...
_TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
_PASSED_OPTIONS = _TLS_OPTIONS | {"db", "protocol", "socket_keepalive"}
# ... and the ones it sets itself: a URL value would override them (see the module docstring)
_MANAGED_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "timeout",
        "retry_on_timeout",
        "retry_on_error",
        "health_check_interval",
        "client_name",
        "decode_responses",
        "max_connections",
    }
)
_CERT_REQS = {"none", "optional", "required"}
_SECRET_OPTIONS = ("ssl_password", "sentinel_password")


def resolve_url(url: str | None) -> str:
    """The Redis URL to use: ``url``, else ``$HOTRELOAD_REDIS_URL``; validated."""
    chosen = url if url is not None else os.environ.get(ENV_URL, "")
    if not chosen:
        raise ConfigurationError(
            f"no Redis URL: pass --redis / redis_url= or set {ENV_URL} "
            "(e.g. unix:///var/run/hotreload/redis.sock or redis://localhost:6379/0)"
        )
    if chosen.startswith("redis+sentinel://"):
        from subscriber import _sentinel

        _sentinel.parse(chosen)  # ConfigurationError naming what is wrong
        return chosen
    try:
        parts = urlsplit(chosen)
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric port
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(chosen)!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"malformed Redis URL {redacted(chosen)!r}: the scheme must be one of "
            "redis://, rediss://, unix:// or redis+sentinel://"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigurationError(f"malformed Redis URL {chosen!r}: unix:// needs a socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"malformed Redis URL {redacted(chosen)!r}: no host")
    _check_options(chosen, parts.scheme, parts.query)
    return chosen


def _check_options(url: str, scheme: str, query: str) -> None:
    """Refuse URL query options that would be ignored, misapplied or override our settings."""
    for name, values in parse_qs(query, keep_blank_values=True).items():
        problem = ""
        if name in _MANAGED_OPTIONS:
            problem = (
                f"{name} is set by hotreload itself (blocking reads need their own timeouts "
                "and no hidden retries); remove it"
            )
        elif name not in _PASSED_OPTIONS:
            problem = f"unknown option {name!r}; TLS options (with rediss://): " + ", ".join(
                sorted(_TLS_OPTIONS)
            )
        elif name in _TLS_OPTIONS and scheme != "rediss":
            problem = f"{name} is a TLS option: use a rediss:// URL (this one is {scheme}://)"
        elif name == "ssl_cert_reqs" and values[-1] not in _CERT_REQS:
            problem = f"ssl_cert_reqs must be one of {', '.join(sorted(_CERT_REQS))}"
        if problem:
            raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {problem}")


def describe_failure(exc: BaseException | str, url: str) -> str:
    """One line saying why a connection to ``url`` failed, with what to check for TLS.

    redis-py reports a failed handshake as a ``ConnectionError`` whose cause is an
    ``ssl.SSLError`` (also when the server refused our missing client certificate, which
    only shows on the first read) or an ``OSError`` for an unreadable certificate file.
    """
    if isinstance(exc, str):
        return exc
    from redis.exceptions import MovedError

    # a MOVED reply, as such or as the reply behind the subscriber's TopologyChanged
    moved = exc if isinstance(exc, MovedError) else getattr(exc, "reply", None)
    if isinstance(moved, MovedError):
        return moved_hint(moved)
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    ):
        verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        reason = getattr(verify, "verify_message", "") or text
        return (
            f"TLS verification of the server's certificate failed ({reason}); check that "
            "ssl_ca_certs= in the Redis URL names the CA that signed the server's certificate "
            "and that the certificate names the URL's host"
        )
    options = parse_qs(urlsplit(url).query)
    if "CERTIFICATE_REQUIRED" in text or "alert certificate required" in text.lower():
        return (
            f"the server requires a TLS client certificate ({text}); set ssl_certfile= and "
            "ssl_keyfile= in the Redis URL"
        )
    tls = urlsplit(url).scheme == "rediss"
    dropped = any(isinstance(e, ssl.SSLError | ConnectionResetError) for e in chain) or (
        "closed by server" in text.lower()
    )
    if tls and dropped and "ssl_certfile" not in options:
        # A server that wants a client certificate sends an alert, or just drops the
        # connection: an EOF, a reset or the alert, whichever this side notices first.
        return (
            f"the TLS connection failed ({text}); if the server requires a client certificate "
            "(tls-auth-clients), set ssl_certfile= and ssl_keyfile= in the Redis URL"
        )
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return f"TLS handshake failed: {text}"
    if tls:
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path"):
            for path in options.get(name, []):
                if not os.path.exists(path):
                    return f"{name}={path} in the Redis URL does not exist ({text})"
    return text


def moved_hint(exc: BaseException) -> str:
    """A MOVED reply where none was expected: the URL names a Redis Cluster node, but asking
    it ``CLUSTER SLOTS`` (how hotreload detects a cluster) was refused."""
    return (
        f"the server answered MOVED {exc}: it is a Redis Cluster node and the key lives on "
        "another one; hotreload detects a cluster with CLUSTER SLOTS, which this user may "
        "not run: grant it +cluster|slots (see deploy/README.md)"
    )


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
    secret_option = any(name in parts.query for name in _SECRET_OPTIONS)
    if parts.password is None and not secret_option:
        return url
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if secret_option:  # e.g. ssl_password=: the passphrase of the client key
        options = "|".join(_SECRET_OPTIONS)
        parts = parts._replace(query=re.sub(rf"(?<![^&])({options})=[^&]*", r"\1=***", parts.query))
    return parts.geturl()


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
    pool_class: type[redis.asyncio.ConnectionPool] | None = None,
) -> redis.asyncio.Redis:
    """``connect`` for ``redis.asyncio``; ``pool_class`` likewise builds the client's pool."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options = _options(socket_timeout, connect_timeout, client_name)
    try:
        if pool_class is None:
            return aredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)  # type: ignore[arg-type]
        pool = pool_class.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None
    return aredis.Redis.from_pool(pool)


# Retries of a cluster command after redis-py reloaded the slot map (a dead or demoted node,
# CLUSTERDOWN, an uncovered slot): one, so a map gone stale in a failover is followed at once,
# while a dead cluster fails within a connect (or socket) timeout or two.
CLUSTER_RETRIES = 1

# URL -> the cluster nodes its node named ((), a standalone Redis): asked once per process.
_modes: dict[str, tuple[tuple[str, int], ...]] = {}
_modes_lock = threading.Lock()


def is_cluster(url: str, *, socket_timeout: float = 2.0, connect_timeout: float = 2.0) -> bool:
    """Whether ``url`` names a Redis Cluster node: asked once per URL per process.

    Raises redis-py's ``ConnectionError`` / ``TimeoutError`` (nothing is remembered then)
    when the node cannot be asked.
    """
    return bool(cluster_nodes(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout))


def cluster_nodes(
    url: str, *, socket_timeout: float = 2.0, connect_timeout: float = 2.0
) -> tuple[tuple[str, int], ...]:
    """Every node ``url``'s node named when first asked ``CLUSTER SLOTS`` (masters first);
    ``()`` for a standalone Redis (it refused: "cluster support disabled", NOPERM, ...)."""
    if urlsplit(url).scheme not in {"redis", "rediss"}:
        return ()  # unix://: a pod's own Redis; a cluster redirects to TCP addresses anyway
    with _modes_lock:
        known = _modes.get(url)
    if known is not None:
        return known
    import redis as redis_mod

    from subscriber._cluster import node_url, slot_master

    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 6379
    # without the URL's database: a cluster node refuses SELECT, which would look standalone
    probe = connect(
        node_url(url, host, port), socket_timeout=socket_timeout, connect_timeout=connect_timeout
    )
    try:
        reply = cast(Any, probe).execute_command("CLUSTER", "SLOTS")  # untyped in redis-py
    except redis_mod.ResponseError:
        nodes: tuple[tuple[str, int], ...] = ()
    else:
        nodes = tuple(slot_master(reply, 0, host)[1]) or ((host, port),)
    finally:
        probe.close()
    with _modes_lock:
        _modes[url] = nodes
    return nodes


def connect_any(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float = 2.0,
    client_name: str | None = None,
) -> AnyRedis:
    """What ``url`` needs: redis-py's ``RedisCluster`` when it names a cluster node, else
    exactly what :func:`connect` returns (see the module docstring).

    The first call for a URL asks its node (``is_cluster``) and so raises redis-py's
    ``ConnectionError`` / ``TimeoutError`` when it cannot be reached; making a cluster client
    loads the slot map and may raise ``RedisClusterException`` (no node reachable).
    """
    if url.startswith("redis+sentinel://"):
        return _sentinel_master(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
    nodes = cluster_nodes(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout)
    if not nodes:
        return connect(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry

    options: dict[str, Any] = _options(socket_timeout, connect_timeout, client_name)
    del options["health_check_interval"]  # not passed on by RedisCluster; 0 is the default
    try:
        pool_class = _cluster_pool_class(url)
        if pool_class is not None:
            options["connection_pool_class"] = pool_class
        return RedisCluster.from_url(
            url,
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],  # type: ignore[no-untyped-call]
            retry=Retry(NoBackoff(), CLUSTER_RETRIES),
            # a cluster that serves some slots only (cluster-require-full-coverage no)
            # still serves ours; an uncovered slot fails that key's commands alone
            require_full_coverage=False,
            # reload the whole slot map on every MOVED, and before a pipeline retries the
            # commands that failed (a frozen master: its retries would wait out the socket
            # timeout on it again): a failover moves many slots at once
            reinitialize_steps=1,
            **options,
        )
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None
    except RedisClusterException as exc:
        if "db" in str(exc):  # a Redis Cluster has database 0 only
            raise ConfigurationError(
                f"Redis URL {redacted(url)!r} names a Redis Cluster node, which has database "
                "0 only: drop the /DB or use /0"
            ) from None
        raise


def _sentinel_master(
    url: str, *, socket_timeout: float, connect_timeout: float, client_name: str | None
) -> redis.Redis:
    """A client of the master a ``redis+sentinel://`` URL names (see ``_sentinel``): redis-py's
    Sentinel pool asks the sentinels on every new connection, and turns a ``READONLY`` reply
    (the master was demoted) into a ``ConnectionError``, so reconnecting finds the new one."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    from subscriber import _sentinel

    target = _sentinel.parse(url)
    # redis-py < 8.2 has no annotations here (hence unused-ignore: 8.2 has them)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(connect_timeout)
    )
    options: dict[str, Any] = dict(_options(socket_timeout, connect_timeout, client_name))
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    return client


def _cluster_pool_class(url: str) -> type[redis.ConnectionPool] | None:
    """A pool class that passes ``ssl_min_version`` / ``ssl_ciphers`` from ``url`` on to each
    node's connections: redis-py's cluster client drops both (not in its allowed keys)."""
    import redis as redis_mod
    from redis.connection import parse_url

    parsed = parse_url(url)  # type: ignore[no-untyped-call]  # as a standalone client gets them
    extra = {name: parsed[name] for name in ("ssl_min_version", "ssl_ciphers") if name in parsed}
    if not extra:
        return None

    class _TlsOptionsPool(redis_mod.ConnectionPool):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**kwargs, **extra})

    return _TlsOptionsPool


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
