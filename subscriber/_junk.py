"""How a subscriber tells about malformed entries without a flood becoming its own flood.

Anyone who can ``XADD`` to the events stream can append junk: 100k malformed entries cost
four subscribers 400k WARNING lines and 400k ack ``XADD``s, one each per entry, while a
genuine update waited behind them. A malformed entry is still refused and counted one by one
(``error_count``, the metric, ``seen`` in unsigned mode), but it is *told* in bulk:

- the first ``MALFORMED_TOLD_ONE_BY_ONE`` malformed entries of each ``MALFORMED_LOG_INTERVAL``
  seconds are acked and logged one by one, with their reasons (a few forged entries are each
  reported, as always);
- beyond those, a pass (a read's batch, a walk back) writes one ack for its malformed entries,
  the newest one's, its error saying how many older ones it stands for, and they go into one
  summary line logged when the interval is over (:class:`MalformedLog`).
"""

from __future__ import annotations

import logging
import time

from subscriber.defaults import MALFORMED_LOG_INTERVAL, MALFORMED_TOLD_ONE_BY_ONE

__all__ = ["MalformedLog", "summary"]


def summary(error: str, older: int) -> str:
    """The error of the one ack that stands for a pass's ``older + 1`` malformed entries."""
    if not older:
        return error
    entries = "entry" if older == 1 else "entries"
    return f"{error} (and {older} older malformed {entries} in the same read, not acked one by one)"


class MalformedLog:
    """What one subscriber tells about malformed entries: the first ``burst`` of each
    ``interval`` one by one, the rest summed up."""

    def __init__(
        self,
        log: logging.Logger,
        key: str,
        interval: float = MALFORMED_LOG_INTERVAL,
        burst: int = MALFORMED_TOLD_ONE_BY_ONE,
    ) -> None:
        self._log = log
        self._key = key
        self._interval = interval
        self._burst = burst
        self._window_ends = 0.0  # time.monotonic() the current interval ends
        self._told = 0  # entries told one by one in the current interval
        self._held = 0  # entries rejected in it beyond the burst, not yet told

    def one_by_one(self, count: int) -> int:
        """How many of a pass's ``count`` malformed entries (newest first) may be acked and
        logged one by one; the rest get one ack and go into the interval's summary line."""
        self.flush()
        now = time.monotonic()
        if now >= self._window_ends:
            self._window_ends, self._told = now + self._interval, 0
        allowed = max(0, min(count, self._burst - self._told))
        self._told += allowed
        self._held += count - allowed
        return allowed

    def rejected(self, version: int, entry_id: str, error: str) -> None:
        """Log one malformed entry that is told one by one."""
        self._log.warning(
            "%s: rejected version %s (entry %s), keeping the running config: %s",
            self._key,
            version or "?",
            entry_id,
            error,
        )

    def flush(self) -> None:
        """Tell the entries held back, once their interval is over (cheap: call every cycle)."""
        if not self._held or time.monotonic() < self._window_ends:
            return
        self._log.warning(
            "%s: rejected %d more malformed entries within %g s (not logged or acked one by "
            "one); is something other than the publisher writing to the events stream?",
            self._key,
            self._held,
            self._interval,
        )
        self._held = 0
