"""The held reports of an asyncio hub's decision (``_reports``), waited out before its next
read: ``_aiohub`` and ``_aioclusterblock`` (a cluster master's one blocking read).

Why before the read, not during it: the read that would block until the hold's end and be
sent again cost one more message each way and a wake-up per key and update (``held_for``).
Why on past its own hold while the event loop's other hubs decide (``wait_held``): their
reports went out among the decisions of the same update still to come, competing for the
cores with them. Both measured in docs/performance.md, "The asyncio scale target".
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from subscriber import _hubplan

if TYPE_CHECKING:
    from subscriber._hubplan import Member

__all__ = ["HOLD_CAP", "LOOP_HOLD_CAP", "LOOP_QUIET", "LOOP_RUN_GAP", "Hold", "held_for",
           "wait_held"]  # fmt: skip

# The longest hold waited out without a read in flight: ``_hubplan``'s, shared with the
# threaded hub (the reports' own 30 ms, ``_reports.REPORT_DELAY``; a longer one is waited in
# the read).
HOLD_CAP = _hubplan.HOLD_CAP
# ``wait_held``: when other hubs of the loop decided after this one, the reports go out once
# none has decided for as long as the loop's run of decisions went on (at least
# ``LOOP_QUIET``), at most ``LOOP_HOLD_CAP`` after their own decision. Decisions less than
# ``LOOP_RUN_GAP`` apart are one run (a process waiting for a core waits tens of ms).
LOOP_QUIET = 0.03
LOOP_RUN_GAP = 0.1
LOOP_HOLD_CAP = 0.3


class _LoopDecided:
    """One event loop's run of decisions with entries, by any of its hubs: its first and
    its latest (``time.monotonic()``)."""

    __slots__ = ("at", "first")

    def __init__(self) -> None:
        self.first = self.at = -math.inf

    def decided(self, now: float) -> None:
        if now - self.at > LOOP_RUN_GAP:
            self.first = now
        self.at = now

    def quiet_at(self) -> float:
        """When the loop counts as quiet if no hub decides before."""
        return self.at + max(LOOP_QUIET, self.at - self.first)


_decided: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopDecided] = (
    weakref.WeakKeyDictionary()
)


def _loop_decided() -> _LoopDecided:
    loop = asyncio.get_running_loop()
    decided = _decided.get(loop)
    if decided is None:
        decided = _decided[loop] = _LoopDecided()
    return decided


def held_for(reading: list[Member], read: object) -> float:
    """How long, from now, the reports of the keys that just decided are held
    (``_reports``): the next read waits that out *before* it is sent, with the reports,
    rather than blocking until then and being sent again. 0 after a full batch (a backlog
    is read on at once) or with nothing held. A read with entries is noted as the loop's
    latest decision (``wait_held``).

    The cost: an entry appended during the hold is read at its end (30 ms at most after
    the one before; ``wait_held`` may wait on, for the loop's other hubs). What it saves:
    the read that times out at the hold's end -- one more message each way and a wake-up
    per key and update, for the server too. Measured
    (issue 21, ``profile_async``, 250 subscribers each its own hub, unix socket, with the
    hub's watchdog, alternating with the code before): 259-288 -> 201-208 us of CPU per
    subscriber and update (the floor: 206), the server's 14-14.7 -> 9 ms per update;
    docs/performance.md, "The asyncio scale target"."""
    if read and isinstance(read, list):
        _loop_decided().decided(time.monotonic())
    return _hubplan.held_for(reading, read)


class Hold:
    """A hub's hold, ended early by a key joining (``AioHub._add``): the sleep
    ``asyncio.sleep`` is (a future and a timer), with the future kept."""

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    async def sleep(self, delay: float) -> None:
        future = self._future = self._loop.create_future()
        timer = self._loop.call_later(delay, _ended, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None

    def end(self) -> None:
        if self._future is not None:
            _ended(self._future)


def _ended(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_held(
    reading: list[Member],
    read: object,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    joined: Callable[[], bool] | None = None,
) -> None:
    """Wait out the hold of ``held_for``; then, if another hub of this event loop decided
    entries since, on until the loop is quiet: no decision for as long as its run of
    decisions went on (``_LoopDecided``), at most ``LOOP_HOLD_CAP`` after this decision.
    With one hub in the loop (an app: one worker id, all its keys in one hub) the loop's
    last decision is its own: 30 ms, as before.

    Why (issue 21, ``bench_scale``: 250 subscribers per process, each its own worker id,
    so its own hub, 4 processes on 2 cores): an update is decided by every hub of a loop
    in a run of ~50-150 ms, the processes taking turns on the cores and ending tens of ms
    apart. Each hub's reports (an ``XADD`` and an ``HSET``: packed, executed by Redis,
    their replies parsed) went out 30 ms after its own decision, among the decisions
    still to come here, in the other processes and in Redis: 300-750 of the 1,000 acks
    of an update were in Redis before the last process's 250th callback returned. Quiet
    30 ms after the loop's last decision: still 100-500 in some updates (the processes
    finish up to ~60 ms apart, more under load); as long as the run: 0-2 in most, up to
    one process's 250 in a few. Figures: docs/performance.md, "The asyncio scale target".

    The cost: the hub's next read waits too (an entry appended meanwhile is read at most
    ``LOOP_HOLD_CAP`` after the one before), and its acks reach Redis later (an ack's
    ``at`` is the apply's time, so a canary's proof is not delayed). Not a key joining:
    ``joined`` says one did, and ``sleep`` (``Hold.sleep``) ends when one does; its
    first read goes at once with whatever reports are due (the rest: at their time)."""
    hold = held_for(reading, read)
    if hold <= 0:
        return
    decided = _loop_decided()
    mine = decided.at
    now = time.monotonic()
    latest, end = now + max(hold, LOOP_HOLD_CAP), now + hold
    while (left := end - time.monotonic()) > 0:
        await sleep(left)
        if joined is not None and joined():
            return  # a key joined (``sleep`` ended early): its first read goes now
        if decided.at > mine:  # another hub decided since: the loop is not quiet yet
            end = min(decided.quiet_at(), latest)
