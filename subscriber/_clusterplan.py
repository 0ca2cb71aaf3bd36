"""The decisions of the Redis Cluster shared follower (``_clusterhub``), none of them I/O.

In a cluster one ``XREAD`` may not name keys of two slots (``CROSSSLOT``), and every config
key has its own slot, so the keys of one master cannot wait in one blocking read as they do
on a standalone Redis (``_hubplan``). Instead the publish script announces each new entry on
the key's own-slot shard channel (``SPUBLISH <prefix>:{KEY}:notify <version>``, see
docs/design.md) and the follower of one master, SSUBSCRIBEd to all its keys' channels, reads
with *non-blocking* ``XREAD``\\ s, one per key, pipelined on one command connection: a round.

:func:`plan_round` queues, for each key in the round, what its own cycle would send (its
reports, heartbeat and reset check: ``_transport._queue_cycle_head``) and its own ``XREAD``
from its own cursor; :func:`dispatch_round` hands each key its slice of the replies, as
``_hubplan.dispatch`` does. A reply saying the key's slot is served elsewhere (``MOVED``,
``CLUSTERDOWN``, ...) concerns that key only: it is returned to be routed again, never
raised for the whole connection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

from subscriber._cluster import is_wrong_node
from subscriber._hubplan import Followed, Member, failed
from subscriber._stream import stream_entries
from subscriber._transport import DISCONNECTED
from subscriber._wire import Batch

__all__ = [
    "ClusterMember",
    "Round",
    "cannot_subscribe",
    "dispatch_round",
    "due_now",
    "held_until",
    "notify_channel",
    "plan_round",
    "push_kind",
    "replies",
]  # fmt: skip


def notify_channel(events: str) -> bytes:
    """The shard channel a key's new entries are announced on: ``:events`` -> ``:notify``
    (the same hash tag, so the same slot: ``SPUBLISH`` runs inside the publish script)."""
    return (events.removesuffix("events") + "notify").encode()


def push_kind(reply: Any) -> tuple[bytes, bytes] | None:
    """A pub/sub connection's push as (kind, channel): ``smessage``, ``ssubscribe``,
    ``sunsubscribe`` (the server dropped the channel: its slot moved away); else None."""
    if not isinstance(reply, list | tuple) or len(reply) < 2:
        return None
    kind, channel = reply[0], reply[1]
    if not isinstance(kind, bytes) or not isinstance(channel, bytes):
        return None
    return kind.lower(), channel


class ClusterMember(Member):
    """A key in a cluster hub: ``channel``, its notify channel; ``slot``, its stream's;
    ``held_until``, when the reports it holds (``_reports``) are due: a round of its own
    then."""

    __slots__ = ("channel", "held_until", "slot")

    def __init__(self, sub: Followed, *, resync: bool) -> None:
        super().__init__(sub, resync=resync)
        self.channel = notify_channel(sub._keys.events)
        self.slot = key_slot(self.events)
        self.held_until = math.inf


# A report due this early counts as due (``_transport``'s rule: ``Reports.queue`` sends it).
_DUE_EARLY = 0.005


def due_now(
    notified: set[ClusterMember], members: list[ClusterMember], now: float
) -> set[ClusterMember]:
    """The keys of the next round: those notified, and those whose held reports are due
    (taken: a key that sits this round out, resyncing, writes its reports from there)."""
    chosen = set(notified)
    for member in members:
        if member.held_until <= now + _DUE_EARLY:
            member.held_until = math.inf
            chosen.add(member)
    return chosen


def held_until(members: list[ClusterMember]) -> float:
    """When the first of ``members``' held reports are due (``math.inf``: none held)."""
    return min((member.held_until for member in members), default=math.inf)


@dataclass(slots=True)
class Round:
    """One round trip on a master's command connection: ``batch`` for ``reading``;
    ``next_due``: when the earliest of them wants the next one (a heartbeat, or the
    catch-up read once per block time)."""

    batch: Batch = field(default_factory=Batch)
    reading: list[ClusterMember] = field(default_factory=list)
    next_due: float = 0.0


def plan_round(members: list[ClusterMember], chosen: set[ClusterMember] | None) -> Round | None:
    """Queue the keys in step (not resyncing, not stopping) -- all of them (``chosen`` is
    None: the catch-up read) or those in ``chosen`` -- each with its own non-blocking
    ``XREAD``. None if there is nobody to read.

    As in ``_hubplan.plan_cycle``, a heartbeat due within half an interval rides on this
    round (``early``), so the keys' heartbeats fall into step: an idle master costs one
    round trip per block time for all its keys."""
    now = time.monotonic()
    cycle = Round(next_due=now + 3600.0)
    for member in members:
        if member.resync or (chosen is not None and member not in chosen):
            continue
        with member.lock:
            if member.stopping:
                continue
            sub = member.sub
            first = len(cycle.batch)
            head, key_block = sub._queue_cycle_head(cycle.batch, early=sub._heartbeat_interval / 2)
            cursor = sub._core.cursor.entry_id
            cycle.batch.xread({sub._keys.events: cursor}, count=sub._batch_size)
            member.plan = (head, first, len(cycle.batch) - first, cursor)
            member.held_until = math.inf  # its reports go now if due; else set again
            cycle.next_due = min(cycle.next_due, now + key_block / 1000)
            cycle.reading.append(member)
    return cycle if cycle.reading else None


def cannot_subscribe(member: Member, exc: BaseException) -> None:
    member.sub._log.info(
        "%s: cannot SSUBSCRIBE its notify channel (%s): changes are read once per block "
        "time; grant the subscriber user +ssubscribe and &<prefix>:{*}:notify",
        member.sub.key,
        exc,
    )


def replies(batch: Batch, read: Callable[[], Any]) -> list[Any]:
    """One reply per command of ``batch`` (``read``: a connection's ``read_response``), a
    refused one as its ``ResponseError``: a ``MOVED`` is one key's, never the round's."""
    results: list[Any] = []
    for index in range(len(batch)):
        try:
            results.append(batch.reply(index, read()))
        except ResponseError as exc:
            results.append(batch.refused(index, exc))
    return results


def dispatch_round(
    cycle: Round, results: list[Any], ended: list[ClusterMember], advanced: list[ClusterMember]
) -> list[ClusterMember]:
    """Each key its slice of the replies, decided as its own cycle would be; returns the
    keys whose slot is served elsewhere now (to route again). A key refused a command, or
    a bug deciding for it, resyncs alone after its backoff (``_hubplan.failed``); keys
    stopped meanwhile are appended to ``ended``, keys that read entries to ``advanced``
    (their acks go out, and what is left of a long backlog is read, on the next round
    trip, at once).

    Reports held (``_reports``: an entry's acks go out ``REPORT_DELAY`` after it was
    decided, out of the way of the other keys, and processes, still applying it) set the
    key's ``held_until`` instead (reports not held: at once): not read again at once unless
    its read was a full batch (a backlog). A newer entry is announced anyway (a push that comes
    during the round is kept for the next one), and read once per block time if the push was
    lost.
    Measured: the second round trip per key and update was half the shared follower's CPU
    (``profile_async --cluster``)."""
    moved: list[ClusterMember] = []
    for member in cycle.reading:
        with member.lock:
            if member.gone or member.plan is None:
                continue
            head, first, size, cursor = member.plan
            member.plan = None
            mine = results[first : first + size]
            if any(is_wrong_node(result) for result in mine):
                moved.append(member)  # its reports stay pending: sent from its new master
                continue
            try:
                member.resync = member.sub._cycle_done(head, mine)
                if member.sub._core.cursor.entry_id != cursor and (
                    len(stream_entries(mine[-1])) >= member.sub._batch_size
                ):
                    advanced.append(member)  # more may wait: read on at once
                elif member.sub._reports.due < math.inf:
                    member.held_until = min(member.held_until, member.sub._reports.due)
            except DISCONNECTED:
                raise
            except Exception as exc:  # noqa: BLE001 -- this key's alone (see failed)
                failed(member, exc)
        if member.stopping:
            ended.append(member)
    return moved
