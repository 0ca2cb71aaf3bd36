"""``redis+sentinel://`` targets: a master found through Redis Sentinel, again after a failover.

::

    redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?sentinel_password=P]

(parsed and checked by ``_target``). Every new connection asks the sentinels for the master
(redis-py's ``Sentinel.discover_master``, which also checks the master is not down or
demoted) and connects to it with a plain ``redis://`` target (:meth:`Target.master`), so the
subscriber keeps its fast path on that connection. A master that becomes a replica refuses
the next write (``READONLY``) or cuts a blocked read (``UNBLOCKED``): that is a lost
connection (see ``_cluster``), and the next one asks the sentinels again.
"""

from __future__ import annotations

from subscriber._target import Target

__all__ = ["master", "master_async"]


def master(target: Target, *, timeout: float) -> Target:
    """Ask the sentinels of ``target`` where its master is now.

    Raises redis-py's ``MasterNotFoundError`` (a ``ConnectionError``) when none knows.
    """
    from redis.sentinel import Sentinel

    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout)
    )
    try:
        host, port = sentinel.discover_master(target.service)  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        for client in sentinel.sentinels:
            client.close()
    return target.master(str(host), int(port))


async def master_async(target: Target, *, timeout: float) -> Target:
    """:func:`master` on ``redis.asyncio``."""
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout)
    )
    try:
        host, port = await sentinel.discover_master(target.service)
    finally:
        for client in sentinel.sentinels:
            await client.aclose()
    return target.master(str(host), int(port))
