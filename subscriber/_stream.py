"""The events stream as a subscriber reads it: a walk back page by page, an XREAD reply.

Both transports read history the same way (:class:`HistoryPages` queues each page on a
``_wire.Batch`` and steps a ``_core.Walk`` through the reply) and take entries out of a
blocking read's reply the same way (:func:`stream_entries`); no I/O here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from subscriber._walk import Walk
    from subscriber._wire import Batch

__all__ = ["HistoryPages", "stream_entries"]


class HistoryPages:
    """Paging of a walk over the stream, newest first, one ``XREVRANGE`` per round trip.

    Pages grow 1, 1, 2, 4, ... up to ``batch_size``: the newest entry is usually the one,
    the one before it the usual walk-back, and a 1 MiB config is not fetched 8 times to step
    back once. Loop: :meth:`queue` on a pipeline, execute it, :meth:`feed` the reply.
    """

    def __init__(self, events_key: str, batch_size: int) -> None:
        self._key = events_key
        self._batch_size = batch_size
        self._upper = "+"
        self._count = 1
        self._next_count = 1

    def queue(self, pipe: Batch) -> None:
        pipe.xrevrange(self._key, self._upper, "-", count=self._count)

    def feed(self, entries: list[Any], walk: Walk) -> bool:
        """Step ``walk`` through one page; True when another page is wanted."""
        for entry_id, fields in entries:
            if not walk.step(entry_id, fields):
                return False
        if len(entries) < self._count:
            return False  # reached the oldest entry
        last = entries[-1][0]
        self._upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        self._count, self._next_count = (
            self._next_count,
            min(self._batch_size, self._next_count * 2),
        )
        return True


def stream_entries(reply: Any) -> list[tuple[Any, Any]]:
    """``(id, fields)`` pairs of an XREAD reply (one stream), in either shape redis-py uses:
    a list of ``[stream, entries]`` or a dict ``{stream: entries}``."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (pair[1] for pair in reply)
    entries: list[tuple[Any, Any]] = []
    for items in streams:
        for item in items:
            if isinstance(item, list) and item and isinstance(item[0], tuple | list):
                entries.extend(item)  # RESP3 callback: one more level of nesting
            else:
                entries.append(item)
    return entries
