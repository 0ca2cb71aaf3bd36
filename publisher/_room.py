"""Room for the newest content at ``maxmemory``: older history gives way, key by key.

Redis at ``maxmemory`` with ``noeviction`` refuses the publish script; the newest content
must still fit (it is what every worker needs), so history is trimmed until it does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

__all__ = ["make_room"]


def make_room(client: redis.Redis, events: str, others: list[str]) -> Iterator[str]:
    """Trim histories so that a refused write fits, yielding what was trimmed after each
    step for the caller to try again: ``events`` itself to its newest entry, then ``others``
    (oldest first) in doubling batches, each to its newest entry. ``XTRIM`` is not refused at
    maxmemory (it only frees); exact (no ``~``), as entries of large contents are one stream
    node each and a ``~`` trim frees no node that is still partly kept."""
    client.xtrim(events, maxlen=1, approximate=False)
    yield events
    batch, start = 1, 0
    while start < len(others):
        chosen = others[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for stream in chosen:
            pipe.xtrim(stream, maxlen=1, approximate=False)
        pipe.execute()
        yield ", ".join(chosen)
        start += batch
        batch *= 2
