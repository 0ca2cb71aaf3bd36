"""A per-reply byte budget, for readers whose legitimate replies are small (the ack readers).

The reply cap (:mod:`subscriber._replycap`) bounds each bulk string (~1 MiB) and each
aggregate (65,536 members), so a reply of many entries each just under the caps is still
read whole: 2,000 acks of ~1 MiB each, XADDed by anyone with the ``subscriber`` password,
are one ~2 GB reply to the daemon's ack follower or ``hotreload status`` (the container
limit is 128 MiB). An event reader must read such replies (``COUNT`` entries of up to 1 MiB
each are legitimate), an ack reader never: an ack is a few hundred bytes (at most ~2 KiB of
error text plus its other fields). So a reader opts in with :func:`reply_budget`: in its
context (thread, or asyncio task), each reply keeps at most ``nbytes`` of bulk strings,
each charged its size + ``PER_STRING`` (so many tiny ones count too); past that, the capped
parser drops every bulk string over ``SMALL`` bytes as it arrives (``_replycap.DROPPED`` in
its place, whose ``len()`` is over the cap) and skips every aggregate of more than 2 members
whole (an empty one in its place). An entry ``[id, fields]`` keeps its shape and its id (a
reader pages on from it), its fields read as junk. The rest of the reply is read off the
socket, so the connection stays in step; what is kept is bounded by the budget plus ~1 KiB
per entry past it (an id, at most one field of ``SMALL`` bytes). The daemon's ``:control``
reader uses it too (anyone with the operator password may ``XADD`` there).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["PER_STRING", "SMALL", "Budget", "reply_budget"]

PER_STRING = 64  # what a kept bulk string costs besides its bytes: its object and its slot
# kept even past the budget: entry ids (41 bytes at most) and stream names (a key is at most
# 253 bytes), so a reader still knows where it is
SMALL = 512
_BUDGET: ContextVar[int | None] = ContextVar("hotreload_reply_budget", default=None)


@contextmanager
def reply_budget(nbytes: int) -> Iterator[None]:
    """Every reply read in this context keeps at most ``nbytes`` (see the module docstring)."""
    token = _BUDGET.set(nbytes)
    try:
        yield
    finally:
        _BUDGET.reset(token)


class Budget:
    """What is left of the current reply's budget (``left`` ``None``: no budget)."""

    __slots__ = ("left", "over")

    def __init__(self) -> None:
        self.left: int | None = None
        self.over = False

    def start(self) -> None:
        """A reply begins: the budget of the context reading it, whole."""
        self.left, self.over = _BUDGET.get(), False

    def keeps(self, length: int) -> bool:
        """Whether a bulk string of ``length`` bytes is kept: once the budget is spent, only
        those of ``SMALL`` bytes at most."""
        if self.left is not None and not self.over:
            self.left -= length + PER_STRING
            self.over = self.left < 0
        return not self.over or length <= SMALL
