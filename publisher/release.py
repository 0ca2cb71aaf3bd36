"""How a key's new content reaches the workers: the seam rollout control plugs into.

The daemon's loop decides *when* a key is published (its intake says which content is newest
and pending); a ``Release`` decides *to whom*. ``PublishNow`` is plain compare-and-publish,
every content to every worker at once. The daemon runs ``publisher.rollout.Rollout`` (the
design's "Rollout control"): with ``--canary`` it publishes a new content for a canary
audience first; always it writes again a pin Redis lost, and its periodic work (judging
canaries from acks and heartbeats; ``publisher.control``'s ``:control`` requests) runs in the
loop beside ``Upkeep``'s. Pins themselves (a content rolled back from, a halted canary) are
refused inside ``publish.lua``, whichever ``Release`` calls it.

Kept apart from ``publisher.daemon`` so that a rollout module can implement it without
importing the daemon that imports it.
"""

from __future__ import annotations

from typing import Protocol

from publisher.publish import Publisher, PublishResult

__all__ = ["PublishNow", "Release"]


class Release(Protocol):
    """Publishes one key's newest content; raises what ``Publisher.publish`` raises.

    ``above``: the highest version the key's workers have seen (``publisher._floor``); every
    version written is numbered above it, or the workers reject it as a replay. ``seen``: what
    the daemon knew of the stream before it read the content (``Publisher.publish``).
    """

    def publish(
        self,
        publisher: Publisher,
        key: str,
        content: bytes,
        *,
        sensitive: bool,
        sha256: str,
        above: int,
        seen: str = "",
    ) -> PublishResult: ...


class PublishNow:
    """Every content to every worker, at once (the behaviour without rollout control)."""

    def publish(
        self,
        publisher: Publisher,
        key: str,
        content: bytes,
        *,
        sensitive: bool,
        sha256: str,
        above: int,
        seen: str = "",
    ) -> PublishResult:
        return publisher.publish(
            key, content, sensitive=sensitive, sha256=sha256, above=above, seen=seen
        )
