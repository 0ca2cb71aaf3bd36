"""How a subscriber tells about malformed entries without a flood becoming its own flood.

Anyone who can ``XADD`` to the events stream can append junk: 100k malformed entries cost
four subscribers 400k WARNING lines and 400k ack ``XADD``s, one each per entry, while a
genuine update waited behind them. A malformed entry is still refused and counted one by one
(``error_count``, the metric, ``seen`` in unsigned mode), but it is *told* in bulk:

- the acks: one per pass (a read's batch, a walk back) for its malformed entries, the newest
  one's, its error saying how many older ones it stands for (``Walk``);
- the log: :class:`MalformedLog`, at most one WARNING line per ``MALFORMED_LOG_INTERVAL``
  seconds -- the first malformed entry is logged at once with its reason, the ones after it
  within the interval are summed up in one line when the interval is over.
"""

from __future__ import annotations

import logging
import time

from subscriber.defaults import MALFORMED_LOG_INTERVAL

__all__ = ["MalformedLog", "summary"]


def summary(error: str, older: int) -> str:
    """The error of the one ack that stands for a pass's ``older + 1`` malformed entries."""
    if not older:
        return error
    entries = "entry" if older == 1 else "entries"
    return f"{error} (and {older} older malformed {entries} in the same read, not acked one by one)"


class MalformedLog:
    """The WARNING lines about malformed entries of one subscriber, at most one per interval."""

    def __init__(
        self, log: logging.Logger, key: str, interval: float = MALFORMED_LOG_INTERVAL
    ) -> None:
        self._log = log
        self._key = key
        self._interval = interval
        self._quiet_until = 0.0  # time.monotonic(): no line before this
        self._held = 0  # malformed entries rejected since the last line, not yet told

    def rejected(self, count: int, version: int, entry_id: str, error: str) -> None:
        """A pass rejected ``count`` malformed entries, the newest of which is described."""
        now = time.monotonic()
        if now < self._quiet_until:
            self._held += count
            return
        held, self._held = self._held + count - 1, 0
        self._quiet_until = now + self._interval
        self._log.warning(
            "%s: rejected version %s (entry %s), keeping the running config: %s%s",
            self._key,
            version or "?",
            entry_id,
            error,
            f" (and {held} more malformed entries, not logged one by one)" if held else "",
        )

    def flush(self) -> None:
        """Tell the entries held back, once the interval is over (cheap: call every cycle)."""
        if not self._held:
            return
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._log.warning(
            "%s: rejected %d more malformed entries in the last %g s (not logged one by one); "
            "is something other than the publisher writing to the events stream?",
            self._key,
            self._held,
            self._interval,
        )
        self._held = 0
        self._quiet_until = now + self._interval
