"""The publisher's Redis admin client: one for a standalone Redis, a Redis Cluster or Sentinel.

Only the publisher's few long-lived processes use it (the daemon, its ack follower, the CLI);
a worker never does -- a subscriber finds its slot's master itself with one ``CLUSTER SLOTS``
on the connection it makes anyway (``subscriber._cluster``), since making redis-py's cluster
client costs ~60 ms per subscriber and per reconnect. Hence this module lives in
``publisher``, and the worker package stays a plain connection layer.

Redis Cluster (:func:`connect_any`): a ``redis://`` or
``rediss://`` URL naming any node of a cluster just works. The URL's node is asked
``CLUSTER SLOTS`` once per URL per process, on a short-lived plain connection (without the
URL's database: a cluster node refuses ``SELECT``); a refusal ("cluster support disabled",
NOPERM, an unknown command) means a standalone Redis, and :func:`connect_any` then returns
exactly what ``subscriber._redis.connect`` does. A ``unix://`` URL is never asked (a pod's
own Redis; a cluster redirects to TCP addresses anyway). A cluster node gets redis-py's
``RedisCluster`` (~60 ms to make: fine for these few long-lived clients), seeded with every
node the probe named (so it starts even if the URL's node has died since), with the URL's
credentials and TLS options (redis-py's cluster client drops ``ssl_min_version`` and
``ssl_ciphers``: a pool class puts them back), our socket timeouts and client name, raw
bytes, no health checks, and:

- one retry (``CLUSTER_RETRIES``) of a command that met a dead, frozen or demoted node,
  CLUSTERDOWN or an uncovered slot, after redis-py reloaded the slot map: a map gone stale in
  a failover costs one more round trip, while a dead node still fails within milliseconds
  (refused) and a frozen one after the socket timeout (twice at worst); the caller's own loop
  retries with its backoff. ``MOVED`` and ``ASK`` are followed by redis-py itself (up to 16
  hops), every ``MOVED`` reloading the whole map (``reinitialize_steps=1``: a failover moves
  many slots at once, and a pipeline reloads it before retrying what failed);
- ``require_full_coverage=False``: a cluster that still serves some slots (server-side
  ``cluster-require-full-coverage no``) serves ours; an uncovered slot fails its keys alone.

All keys of one config key share a slot (``subscriber.keys``), so single-key commands, the
publish script and one key's ``MULTI`` go to one node; anything spanning keys must group them
per slot.

A ``redis+sentinel://`` URL gets a client of the master the sentinels name (redis-py's
Sentinel pool), found again on every new connection.

Every client here reads with the reply cap (``subscriber._replycap``): a cluster node's pool
gets the capped parser from a pool class (redis-py's cluster client drops ``parser_class``),
the sentinel master's connections through the options. The connections to the sentinels
themselves read only the sentinels' own small answers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from subscriber._cluster import slot_master
from subscriber._redis import connect, connection_options, credentials, reply_parser
from subscriber._target import Target, parse
from subscriber.defaults import CONNECT_TIMEOUT
from subscriber.errors import ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.cluster

    # What :func:`connect_any` returns: a standalone client, or one for a Redis Cluster.
    AnyRedis: TypeAlias = redis.Redis | redis.cluster.RedisCluster

__all__ = ["CLUSTER_RETRIES", "AnyRedis", "cluster_nodes", "connect_any", "is_cluster"]


# Retries of a cluster command after redis-py reloaded the slot map (a dead or demoted node,
# CLUSTERDOWN, an uncovered slot): one, so a map gone stale in a failover is followed at once,
# while a dead cluster fails within a connect (or socket) timeout or two.
CLUSTER_RETRIES = 1

# URL -> the cluster nodes its node named ((), a standalone Redis): asked once per process.
_modes: dict[str, tuple[tuple[str, int], ...]] = {}
_modes_lock = threading.Lock()


def is_cluster(
    url: Target | str,
    *,
    socket_timeout: float = CONNECT_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> bool:
    """Whether ``url`` names a Redis Cluster node: asked once per URL per process.

    Raises redis-py's ``ConnectionError`` / ``TimeoutError`` (nothing is remembered then)
    when the node cannot be asked.
    """
    return bool(cluster_nodes(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout))


def cluster_nodes(
    url: Target | str,
    *,
    socket_timeout: float = CONNECT_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[tuple[str, int], ...]:
    """Every node ``url``'s node named when first asked ``CLUSTER SLOTS`` (masters first);
    ``()`` for a standalone Redis (it refused: "cluster support disabled", NOPERM, ...)."""
    target = _target(url)
    if target.unix or target.sentinel:
        return ()  # unix://: a pod's own Redis; a cluster redirects to TCP addresses anyway
    with _modes_lock:
        known = _modes.get(target.url)
    if known is not None:
        return known
    import redis as redis_mod

    host, port = target.host, target.port
    # without the URL's database: a cluster node refuses SELECT, which would look standalone
    probe = connect(
        target.node(host, port), socket_timeout=socket_timeout, connect_timeout=connect_timeout
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
        _modes[target.url] = nodes
    return nodes


def connect_any(
    url: Target | str,
    *,
    socket_timeout: float,
    connect_timeout: float = CONNECT_TIMEOUT,
    client_name: str | None = None,
) -> AnyRedis:
    """What ``url`` needs: redis-py's ``RedisCluster`` when it names a cluster node, a client
    of the master when it is a ``redis+sentinel://`` URL, else exactly what
    ``subscriber._redis.connect`` returns (see the module docstring).

    The first call for a URL asks its node (``is_cluster``) and so raises redis-py's
    ``ConnectionError`` / ``TimeoutError`` when it cannot be reached; making a cluster client
    loads the slot map and may raise ``RedisClusterException`` (no node reachable).
    """
    target = _target(url)
    if target.sentinel:
        return _sentinel_master(
            target,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
    nodes = cluster_nodes(target, socket_timeout=socket_timeout, connect_timeout=connect_timeout)
    if not nodes:
        return connect(
            target,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry

    options: dict[str, Any] = connection_options(socket_timeout, connect_timeout, client_name)
    del options["health_check_interval"]  # not passed on by RedisCluster; 0 is the default
    try:
        options["connection_pool_class"] = _cluster_pool_class(target)
        return RedisCluster.from_url(
            credentials(target, options),
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
        raise ConfigurationError(f"malformed Redis URL {target.redacted()!r}: {exc}") from None
    except RedisClusterException as exc:
        if "db" in str(exc):  # a Redis Cluster has database 0 only
            raise ConfigurationError(
                f"Redis URL {target.redacted()!r} names a Redis Cluster node, which has database "
                "0 only: drop the /DB or use /0"
            ) from None
        raise


def _sentinel_master(
    target: Target, *, socket_timeout: float, connect_timeout: float, client_name: str | None
) -> redis.Redis:
    """A client of the master a ``redis+sentinel://`` URL names (``subscriber._sentinel``):
    redis-py's Sentinel pool asks the sentinels on every new connection, and turns a
    ``READONLY`` reply (the master was demoted) into a ``ConnectionError``, so reconnecting
    finds the new one."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    # redis-py < 8.2 has no annotations here (hence unused-ignore: 8.2 has them)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(connect_timeout)
    )
    options: dict[str, Any] = connection_options(socket_timeout, connect_timeout, client_name)
    options["parser_class"] = reply_parser()
    if target.password_file is None:
        options.update(username=target.username, password=target.password)
    else:  # read anew for every connection (see subscriber._secrets)
        credentials(target, options)
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.service,
        db=target.db,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    return client


def _cluster_pool_class(url: Target | str) -> type[redis.ConnectionPool]:
    """A pool class that gives each node's connections what redis-py's cluster client drops
    (not in its allowed keys): the capped reply parser (``subscriber._replycap``), and
    ``ssl_min_version`` / ``ssl_ciphers`` of ``url``."""
    import redis as redis_mod
    from redis.connection import parse_url

    from subscriber._replycap import parser_class

    parsed = parse_url(_target(url).url)  # type: ignore[no-untyped-call]  # as a standalone client gets them
    extra = {name: parsed[name] for name in ("ssl_min_version", "ssl_ciphers") if name in parsed}

    class _NodePool(redis_mod.ConnectionPool):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**kwargs, **extra, "parser_class": parser_class()})

    return _NodePool


def _target(url: Target | str) -> Target:
    return url if isinstance(url, Target) else parse(url)
