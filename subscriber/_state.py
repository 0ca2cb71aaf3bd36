"""What a subscriber holds, as immutable values: where it is in the stream, what runs.

``_core`` decides and replaces these whole; the introspection properties of both transports
read them from any thread without a lock, since a frozen value swapped in one assignment is
never seen half-updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ZERO_ID",
    "Cursor",
    "LiveStatus",
    "Rejection",
    "Running",
    "State",
    "Status",
    "compare_ids",
]

ZERO_ID = "0-0"

Status = Literal["starting", "applied", "rejected", "holding", "fallback", "stopped"]
# What the ``status`` property may also say: "stalled", a callback running too long. Only the
# process itself can tell (its follower is inside the callback); :workers never holds it.
LiveStatus = Status | Literal["stalled"]


@dataclass(frozen=True, slots=True)
class Running:
    """The config this process runs."""

    content: bytes
    sha256: str
    version: int  # 0 when it came from the fallback file
    entry_id: str  # "" when it came from the fallback file
    source: Literal["redis", "fallback"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """The newest entry that is not running because it was rejected (malformed or refused)."""

    version: int  # 0 when the entry was too malformed to tell
    entry_id: str
    error: str


@dataclass(frozen=True, slots=True)
class State:
    """Everything the introspection properties read; replaced whole, so reads need no lock."""

    running: Running | None = None
    rejection: Rejection | None = None
    reload_count: int = 0  # accepted by the callback, the initial load included
    error_count: int = 0  # rejections: malformed entries and callback refusals
    last_reload_time: float | None = None  # unix time of the last accepted callback
    # The highest version decided (applied, adopted or rejected; a malformed entry's claimed
    # one in unsigned mode): versions only go up, an entry at or below it is a replay.
    seen: int = 0
    # Why the worker holds its config: the stream is behind ``seen`` (restored, failed over,
    # re-created); None while it is not.
    holding: str | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the subscriber is in the stream: the id to read after, and the hash that entry
    claimed, so a reset stream that reuses the id with other content is not mistaken for it."""

    entry_id: str = ZERO_ID
    claimed_sha256: str = ""


def compare_ids(a: str, b: str) -> int:
    """-1, 0 or 1 as stream id ``a`` sorts before, equal to or after ``b``."""
    ka, kb = _id_key(a), _id_key(b)
    return (ka > kb) - (ka < kb)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)
