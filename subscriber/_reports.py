"""A subscriber's reports (acks to ``:acks``, its state in ``:workers``) until Redis has them.

When a new version arrives, every worker is woken by the same ``XADD`` and all of them apply it
at once; the acks and states they then write are what the propagation of the slowest one waits
behind (issue 21, profiled: with reports switched off, 32 workers were x1.25 the floor instead
of x1.79): Redis executes N ``XADD``\\ s and ``HSET``\\ s, and N processes pack, send and parse
them, on the cores the last workers still need to read and apply. So the reports of an entry
decided by the follow loop can be *held* for ``REPORT_DELAY`` (30 ms) and ride on
the round trip after that, out of the way of the propagation; the one-Redis followers send no
read in between (they wait the hold out: ``_hubplan.held_for``), so a held report reaches
Redis at most ``REPORT_DELAY`` + one round trip after the decision. Not held: the reports
of ``start()`` (the operator sees the state before it returns) and of a resync, the
heartbeat (a report due with it goes with it), and the final ones of ``stop()``, which
writes whatever is held or unanswered.

A report is *written* once Redis answered the command that carried it (``Batch.answered``
counts the replies read). Redis executes pipelined commands as they arrive, so reports
queued before a blocking ``XREAD`` are answered before the read blocks: a read cut short
afterwards (``stop()`` interrupting it, a socket timeout) does not send them again. Reports
whose reply never came (the connection was lost before) are pending again and sent on the
next round trip (of the applied acks only the newest: ``_resendable``): acks stay
at-least-once (design.md; readers dedupe), but a stopped worker
no longer writes its last ack twice (it did on every ``stop()`` within a block time of an
ack: the final write re-sent what the interrupted round trip had already carried).

Pending acks are deduplicated by (entry id, status, hash): a decision already waiting to be
written (held, or in flight) is never queued twice, whichever pass reached it again.

A state is written with the worker's ``:floor`` score (``ZADD GT``, ``_floorwrite``) just
before its ``HSET``: a report of the state is those two commands, counted as queued.

After a fork the child drops what its parent holds: those are the parent's reports (its
worker id, its pid), which the parent's follower writes; the child has no follower of them.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from subscriber._wire import Batch
from subscriber.defaults import ACK_HISTORY
from subscriber.protocol import Ack, encode_ack

__all__ = ["REPORT_DELAY", "Reports"]

# How long the follow loop holds the reports of a decision before sending them (seconds).
REPORT_DELAY = 0.03

_AckKey = tuple[str, str, str]


def _key(ack: Ack) -> _AckKey:
    return ack.entry_id, ack.status, ack.sha256


@dataclass(slots=True)
class _InFlight:
    """Reports queued on ``batch``: written once it has ``end`` replies."""

    batch: Batch
    end: int
    acks: list[Ack]
    state: bool


class Reports:
    """The reports of one subscriber not yet answered by Redis; used by one thread (or one
    event loop) at a time: the follower's, or ``stop()``'s once the follower let go."""

    __slots__ = (
        "__weakref__", "_acks_key", "_keys", "_queue_state", "acks", "due", "in_flight", "state"
    )  # fmt: skip

    def __init__(self, acks_key: str, queue_state: Callable[[Batch, bool], None]) -> None:
        self._acks_key = acks_key
        self._queue_state = queue_state  # (pipe, stopped): the worker state's HSET
        self.acks: list[Ack] = []  # pending: decided, not yet queued
        self.state = False  # the worker state must be (re)written
        self.due = math.inf  # time.monotonic() by which the pending reports go out
        self.in_flight: list[_InFlight] = []
        self._keys: set[_AckKey] = set()  # of pending and in-flight acks
        _alive.add(self)

    def add(self, acks: Iterable[Ack], *, now: float, hold: bool) -> None:
        """Reports of a pass: its acks (each decision once) and the worker state; sent on the
        next round trip, or (``hold``) on the first one ``REPORT_DELAY`` from ``now``."""
        self.settle()
        for ack in acks:
            key = _key(ack)
            if key not in self._keys:
                self._keys.add(key)
                self.acks.append(ack)
        self.state = True
        self.due = min(self.due, now + REPORT_DELAY if hold else now)

    def queue(self, pipe: Batch, *, now: float, force: bool = False, stopped: bool = False) -> int:
        """Queue what is pending (unless it is held past ``now`` and neither ``force`` nor
        ``stopped``): the acks, then the state when it must be written, ``force`` (the
        heartbeat) or ``stopped`` (the final one). Returns how many commands were queued."""
        self.settle()
        force = force or stopped
        if not force and now < self.due:
            return 0
        start = len(pipe)
        acks, self.acks = self.acks, []
        for ack in acks:
            pipe.xadd(self._acks_key, encode_ack(ack), maxlen=ACK_HISTORY, approximate=True)
        write_state = self.state or force
        if write_state:
            self._queue_state(pipe, stopped)  # its HSET, after its ZADD on :floor if any
        queued = len(pipe) - start
        self.state = False
        self.due = math.inf
        if queued:
            self.in_flight.append(_InFlight(pipe, len(pipe), acks, write_state))
        return queued

    def settle(self) -> None:
        """Forget what Redis answered; what it never answered is pending again (ahead of
        newer reports, in its order), to be sent on the next round trip."""
        if not self.in_flight:
            return
        unanswered: list[Ack] = []
        for sent in self.in_flight:
            if sent.batch.answered >= sent.end:
                self._keys.difference_update(_key(ack) for ack in sent.acks)
                continue
            unanswered += sent.acks
            self.state = self.state or sent.state
            self.due = -math.inf
        self.in_flight = []
        if unanswered:
            self.acks[:0] = _resendable(unanswered)

    def drop(self) -> None:
        """Forget everything (a forked child's copy of its parent's reports)."""
        self.acks = []
        self.in_flight = []
        self._keys = set()
        self.state = False
        self.due = math.inf


def _resendable(unanswered: list[Ack]) -> list[Ack]:
    """What of ``unanswered`` goes out again: every rejection, and of the ``applied`` acks only
    the newest. A reply that never came does not mean Redis did not run the command (a
    connection killed after it did): sending an older applied ack again would put it after a
    newer one already in ``:acks`` -- this worker seen going back (the stress checker found
    it: ``applied v42`` re-sent after ``v43``). The older ones are superseded: the newest says
    what runs."""
    applied = [ack.version for ack in unanswered if ack.status == "applied"]
    newest = max(applied, default=0)
    return [ack for ack in unanswered if ack.status != "applied" or ack.version == newest]


_alive: weakref.WeakSet[Reports] = weakref.WeakSet()


def _drop_after_fork() -> None:
    for reports in list(_alive):
        reports.drop()


os.register_at_fork(after_in_child=_drop_after_fork)
