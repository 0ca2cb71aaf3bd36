"""One master of a Redis Cluster as the shared followers see it (``_clusterhub`` for threads,
``_aioclusterhub`` for asyncio): its connections, the keys it serves, and when its next round
is due (read ``_clusterhub``'s docstring: the announcements, the rounds, the catch-up read).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import TYPE_CHECKING, Any, cast

from subscriber._aiopool import aclose
from subscriber._clusterplan import ClusterMember, due_now, held_until
from subscriber._pool import InterruptiblePool, close

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from subscriber._target import Target

__all__ = ["AioLink", "Link"]


class _Keys:
    """The keys one master serves and when each wants a round."""

    def __init__(self, node: Target) -> None:
        self.node = node
        self.members: list[ClusterMember] = []
        self.subscribed: set[bytes] = set()
        self.notified: set[ClusterMember] = set()
        self.next_round = 0.0  # the catch-up round (every key) is due

    def chosen(self, now: float) -> set[ClusterMember] | None:
        """The keys of a round now: None for the catch-up read (every key), else those
        notified and those whose held reports are due (maybe none)."""
        if now >= self.next_round:
            return None
        return due_now(self.notified, self.members, now)

    def due(self) -> float:
        """When the next round is due without a push: the catch-up read, or held reports."""
        return min(self.next_round, held_until(self.members))


class Link(_Keys):
    """One master of a thread's hub: its command and pub/sub connections."""

    def __init__(self, node: Target) -> None:
        super().__init__(node)
        self.client: redis.Redis | None = None  # the command connection
        self.pubsub: redis.Redis | None = None  # its held connection is SSUBSCRIBEd

    def connection(self) -> Any:
        return cast("InterruptiblePool", cast("redis.Redis", self.pubsub).connection_pool).held()

    def close(self) -> None:
        close(self.client)
        close(self.pubsub)
        self.client = self.pubsub = None
        self.subscribed.clear()


class AioLink(_Keys):
    """One master of a task's hub: its connections (the pub/sub one made when first
    needed), the task reading pushes, and the task following its keys in a blocking
    ``XREAD`` when they are all in one slot (``_aioclusterblock``)."""

    def __init__(self, node: Target) -> None:
        super().__init__(node)
        self.client: redis.asyncio.Redis | None = None
        self.pubsub: redis.asyncio.Redis | None = None
        self.reader: asyncio.Task[None] | None = None
        self.awaiting: collections.deque[ClusterMember] = collections.deque()
        self.moved: list[ClusterMember] = []
        self.failure: BaseException | None = None
        # the blocking read (_aioclusterblock): its task, the command connection's CLIENT
        # ID (None: not asked yet), whether CLIENT UNBLOCK may wake it, whether a read is
        # in flight, whether the hub wants the connection back, the task waking it
        self.follower: asyncio.Task[None] | None = None
        self.client_id: int | None = None
        self.can_unblock = True
        self.blocked = False
        self.deadline = math.inf  # the read in flight fails (times out) after this
        self.wanted = False
        self.waking: asyncio.Task[None] | None = None
        self.ended: list[ClusterMember] = []

    def following(self) -> bool:
        """A blocking read's task is running (the command connection is its)."""
        return self.follower is not None and not self.follower.done()

    def busy(self) -> bool:
        if self.follower is not None:  # its task ends, or fails, and wakes the hub
            return self.follower.done() or self.failure is not None
        return bool(self.notified or self.moved or self.failure)

    def due(self) -> float:
        """When the hub's task wants to serve it: its blocking read's deadline (checked
        by the hub's one timer: no timer per read), else a round's."""
        return self.deadline if self.follower is not None else super().due()

    async def close(self) -> None:
        for name in ("reader", "follower", "waking"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait({task})
        await aclose(self.client)
        await aclose(self.pubsub)
        self.client = self.pubsub = None
        self.client_id = None
        self.blocked = self.wanted = False
        self.deadline = math.inf
        self.subscribed.clear()
        self.awaiting.clear()
