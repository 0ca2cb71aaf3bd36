"""A master of an asyncio cluster hub whose keys are all in one slot (the usual case: a
process follows one key, or a few on different masters) waits in one blocking ``XREAD``
on its command connection, as the one-Redis hub does (``_hubplan.plan_cycle``,
``_hubplan.dispatch``: one read over the keys' streams, legal in a cluster within a slot),
instead of waiting for each entry's announcement and then reading it (``_clusterplan``'s
rounds).

Why (issue 21, ``bench_scale --cluster``: 1,000 ``AsyncSubscriber``\\ s, each its own
worker id, so each its own hub with one key): a round costs an entry two messages in and
one out more than a blocking read -- the announcement (``SPUBLISH`` to every subscriber's
pub/sub connection: the master writes it, the reader task parses it and wakes the hub's
task), then the non-blocking ``XREAD`` and its reply -- and one more round trip before the
last subscriber has its entry. The blocking read gets the entry in its reply. Measured
with the held reports waited out (``_aiohub.held_for``), alternating with the code before
(load 5-27, 2 shared cores): ``profile_async --cluster`` 311-339 -> 204-223 us of CPU per
subscriber and update (the floor's raw loops: 220), the master's 13-18 -> 11-12 ms per
update; ``bench_scale --cluster`` p50 x1.61-2.01 -> x1.01-1.23 the floor (8 rounds);
docs/performance.md, "The asyncio scale target".

Such a master needs no pub/sub connection (the announcements are for rounds; made when
its keys stop being in one slot, with a catch-up round then). What a round learns from
the announcements the blocking read learns otherwise:

- a slot moved or its master demoted (``CLUSTER FAILOVER``, ``CLUSTER SETSLOT``): the
  server answers the blocked client with ``MOVED`` (or ``CLUSTERDOWN``) at once
  (``clusterRedirectBlockedClientIfNeeded``); the keys are routed again as a round's are;
- a master killed or unreachable: the read fails (lost) or times out (the block plus
  ``SOCKET_TIMEOUT_MARGIN``): the keys are routed again, as a lost connection's;
- a key joining (another key of the slot, or of another slot: rounds again), a key whose
  slot moved by a push: the hub wants the connection back, ``CLIENT UNBLOCK`` from a
  short-lived connection ends the read as if timed out (as ``_aiohub.nudge``); a user
  without ``+client|id`` / ``+client|unblock`` gets rounds, as before.

The follower is a task of its own per master (the hub's task serves the other masters
meanwhile); it decides its keys' entries itself and hands the master back to the hub's
task when anything else is to be done (a key to resync, stop, route or join).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import ResponseError

from subscriber._aiohub import held_for
from subscriber._aiopool import HeldPool, aclose, execute, read_reply, send
from subscriber._cluster import is_wrong_node
from subscriber._hub import NUDGE_FOR, cannot_wake
from subscriber._hubplan import dispatch, plan_cycle
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch
from subscriber.defaults import SOCKET_TIMEOUT_MARGIN

if TYPE_CHECKING:
    import redis.asyncio

    from subscriber._clusterlink import AioLink
    from subscriber._clusterplan import ClusterMember
    from subscriber._hubplan import Member

__all__ = ["blocks", "follow", "unblock"]

_POLL = 0.01


def one_slot(members: list[ClusterMember]) -> bool:
    """Whether one ``XREAD`` may name all ``members``' streams (no ``CROSSSLOT``)."""
    return len({member.slot for member in members}) == 1


def blocks(link: AioLink) -> bool:
    """Whether ``link``'s keys are followed by a blocking read now: all in one slot, none
    moved, and CLIENT UNBLOCK not refused on this master."""
    members = [m for m in link.members if not m.gone]
    return bool(members) and link.can_unblock and not link.moved and one_slot(members)


def _attention(link: AioLink, members: list[ClusterMember]) -> bool:
    """The hub's task is wanted: a key joined or moved, one is due to resync, or the keys
    are no longer in one slot (a stopped key is left out of the next read)."""
    now = time.monotonic()
    return (
        link.wanted
        or not members
        or any(m.resync_due(now) for m in members)
        or not one_slot(members)
    )


async def _client_id(link: AioLink, log: Any) -> bool:
    """The command connection's CLIENT ID (for CLIENT UNBLOCK); False if refused."""
    if link.client_id is not None:
        return True
    batch = Batch()
    batch.command("CLIENT", "ID")
    (reply,) = await execute(cast("redis.asyncio.Redis", link.client), batch)
    if not isinstance(reply, int):
        link.can_unblock = False
        cannot_wake(log, reply if isinstance(reply, BaseException) else ValueError(reply))
        return False
    link.client_id = reply
    return True


def _cancelled() -> None:
    """Raise the cancel Python 3.11 swallowed (as ``_aiohub._active``): its
    ``asyncio.wait_for`` (redis-py's every write of the connection's handshake, in
    ``_client_id`` and ``held``) returns the write's result when the cancel arrives as the
    write completes (fixed in 3.12), and the task went on into its blocking read, and
    again for good while its keys stayed (``AioLink.close`` awaiting it: a loop shut down
    without ``stop()`` hung). Measured: cancelled at each of the first 40 steps of the event
    loop from its start, the task went on at 12-14 of them (steps 6-20; 3 rounds)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def follow(link: AioLink, wake: Callable[[], None], arm: Callable[[float], None]) -> None:
    """The blocking read's task: plan (every key's reports, one ``XREAD BLOCK``), send,
    read, decide, until the hub's task is wanted (then ``wake``); a failure is the
    link's (``link.failure``: the hub's task loses or routes its keys). ``arm(when)``:
    the hub's task looks at the link by then (its timer, kept if it rings earlier)."""
    try:
        members = [m for m in link.members if not m.gone]
        if not members or not await _client_id(link, members[0].sub._log):
            return
        client = cast("redis.asyncio.Redis", link.client)
        held = await cast("HeldPool", client.connection_pool).held()
        while not _attention(link, members := [m for m in link.members if not m.gone]):
            _cancelled()
            block_cap = max(m.sub._block for m in members)
            cycle = plan_cycle(cast("list[Member]", members), block_cap)
            if cycle is None:
                return
            link.blocked = True
            # The replies' timeout: the hub's task fails the read after ``deadline``
            # (a frozen master), not an asyncio.timeout per read (a timer made and
            # cancelled per key and update: 7 % of the task's time under cProfile).
            link.deadline = time.monotonic() + block_cap + SOCKET_TIMEOUT_MARGIN
            arm(link.deadline)
            try:
                await send(held, cycle.batch.pack())
                results: list[Any] = []
                for index in range(len(cycle.batch)):
                    try:
                        results.append(cycle.batch.reply(index, await read_reply(held, math.inf)))
                    except ResponseError as exc:
                        results.append(cycle.batch.refused(index, exc))
            finally:
                link.blocked = False
                link.deadline = math.inf
            if any(is_wrong_node(result) for result in results):
                for member in cycle.reading:  # one slot: all of them moved
                    member.plan = None  # its reports stay pending: sent from its new master
                    link.moved.append(cast("ClusterMember", member))
                return
            ended: list[Member] = []
            dispatch(cycle, results, ended)
            if ended:
                link.ended.extend(cast("list[ClusterMember]", ended))
                return
            hold = held_for(cycle.reading, results[-1])
            if hold > 0:
                await asyncio.sleep(hold)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the hub's task decides (its _serve)
        link.failure = exc
    finally:
        wake()


async def unblock(link: AioLink, connect: Callable[[], redis.asyncio.Redis]) -> None:
    """End ``link``'s blocking read now (the hub wants its connection): CLIENT UNBLOCK
    from a connection of its own, closed after; retried while the read is not yet
    blocked on the server (the command may reach it first), for ``NUDGE_FOR`` at most.
    Refused (an ACL without it): the read ends at its block time, rounds from then on."""
    client = connect()
    batch = Batch()
    batch.command("CLIENT", "UNBLOCK", cast("int", link.client_id))
    deadline = time.monotonic() + NUDGE_FOR
    try:
        while link.following() and time.monotonic() < deadline:
            if link.blocked:
                (reply,) = await execute(client, batch, raise_on_error=True)
                if reply:
                    return
            await asyncio.sleep(_POLL)
    except ResponseError as exc:
        link.can_unblock = False
        if link.members:
            cannot_wake(link.members[0].sub._log, exc)
    except (*DISCONNECTED, redis.RedisError):
        pass  # the read ends at its block time
    finally:
        with contextlib.suppress(Exception):
            await aclose(client)
