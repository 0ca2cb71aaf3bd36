"""What a daemon remembers of pins, for a Redis that lost them.

Pins (a rollback, a halt) are entries in the stream, honoured by every publisher through
``publish.lua``. A Redis that restarts EMPTY (no persistence), or comes back older, loses
them; a daemon that lived through it then re-seeds its mount's content -- the very content
rolled back from, or a canary that never proved itself -- as if nothing had happened. So each
daemon remembers, per key, the last pin it wrote or was refused by (and the canary it wrote,
as the halt that ending it without proof would be), and when the stream no longer has it (its
newest version is below the pin's) and the mount still shows the pinned content, it writes
the pin again instead: the rollback target, or the stable content as a halt. A new content
ends the memory, as it ends the pin; so does the stream moving past the pin. A daemon that
restarted together with an empty Redis remembers nothing: nothing anywhere says there was a
pin, and its mount's content is published (the workers' floor still numbers it above what
they saw).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from publisher.inspect.rollout import Marks

__all__ = ["Pin", "Pins"]


@dataclass(frozen=True, slots=True)
class Pin:
    sha256: str  # the content not to publish: rolled back from, or the halted canary's
    version: int  # the entry that pins it (or the canary's own version)
    content: bytes  # what to write instead: the rollback's target, the stable content
    content_sha256: str
    sensitive: bool
    rollout: str  # rollback | halt
    rollout_of: int
    reason: str


class Pins:
    def __init__(self) -> None:
        self._pins: dict[str, Pin] = {}

    def remember(self, key: str, pin: Pin) -> None:
        self._pins[key] = pin

    def forget(self, key: str) -> None:
        self._pins.pop(key, None)

    def get(self, key: str) -> Pin | None:
        return self._pins.get(key)

    def lost(self, key: str, sha256: str, marks: Sequence[Marks]) -> Pin | None:
        """The pin to write again before publishing ``sha256``, if the stream lost it."""
        pin = self._pins.get(key)
        if pin is None:
            return None
        if sha256 != pin.sha256:
            self.forget(key)  # a new content ends the pin
            return None
        newest = marks[0] if marks else None
        if newest is None or newest.version < pin.version:
            return pin
        pinned = newest.rollout in ("rollback", "halt") and newest.rollout_sha256 == pin.sha256
        if newest.version > pin.version and not pinned:
            self.forget(key)  # the stream moved past it (promoted, or a newer content)
        return None
