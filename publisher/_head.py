"""The head key: the newest entry's version, hash and marks, so a publish copies no content.

``publish.lua`` must know the newest entry's version, SHA-256 and rollout marks to decide.
Reading them with ``XREVRANGE ... COUNT 1`` copies the whole entry into Lua, content
included: at 1 MiB that copy cost more than the ``XADD`` itself (publish script 4.05 ms p50
against a plain ``XADD`` of the same entry 0.62 ms, 60 runs; the same script reading no entry
2.1 ms). So every entry the script appends also writes ``{prefix}:{KEY}:head`` (same hash
tag: same Redis Cluster slot), a hash of the entry's id, the stream's length after the append
and every field but the content, atomically with the entry (one script; for a content of
64 KiB or more the script writes it on consenting to the ``XADD`` queued after it in the same
``MULTI``, ``publisher._fast``, with a length that XLEN has only if that ``XADD`` appended).

The stream stays the source of truth. The head is used only when the stream's length is the
one it recorded and no entry is newer than its id (``XLEN`` and an exclusive ``XREVRANGE``,
which copy nothing when nothing is newer); otherwise the newest entry is read as before: a
publisher that predates the head appended (its entry is newer), the stream was trimmed
(``make_room``, an operator's ``XTRIM``), deleted, re-created, or its newest entry deleted
(``XDEL``: the length changed), the head itself is missing (a Redis restored or flushed,
a key never published with it) or is not a hash, or an ACL from before the head refuses it
(then nothing is written to it and every publish reads the newest entry, as before).
What it cannot tell: the stream key alone replaced by an older copy of exactly the same
length (``RESTORE`` of the events key without its head), a case no shipped tool produces.

The head is written on the master alone (``redis.set_repl(redis.REPL_NONE)``): a script that
propagates two writes is wrapped in ``MULTI``/``EXEC``, and Redis 7.0.15 loading its AOF runs
that ``EXEC`` as the default user, which ``deploy/redis`` turns off: the transaction was
refused, and every entry written with a head was gone after a restart (found by
``tests/deploy/test_cluster_users.py``'s ACL log; ``tests/test_publish_head.py`` restarts such
a Redis). So replicas, a promoted replica and an AOF reload see an older head, or none: told
apart from the stream like any other stale head.
"""

from __future__ import annotations

from subscriber.keys import stream_keys
from subscriber.protocol import MAX_VERSION

__all__ = ["EXHAUSTED", "exhausted", "head_key", "script_keys"]

EXHAUSTED = 7  # publish.lua's answer: the next version would be above MAX_VERSION


def head_key(key: str, prefix: str) -> str:
    """``{prefix}:{KEY}:head``: in the hash slot of the key's events stream."""
    events = stream_keys(key, prefix).events
    return events[: -len("events")] + "head"


def script_keys(key: str, prefix: str) -> list[str]:
    """The KEYS of ``publish.lua``: the events stream and its head."""
    events = stream_keys(key, prefix).events
    return [events, events[: -len("events")] + "head"]


def exhausted(key: str, events: str, version: int, entry_id: str, source: str) -> str:
    """Why a publish is refused when no version is left (``publisher.publish.VersionsExhausted``):
    the highest version is ``MAX_VERSION`` (2^53 - 1), so the next one could not be read by
    anyone (Lua's and JSON readers' numbers stop being exact there). Only a junk entry gets
    there (versions count up by one per publish). ``source`` is where the highest version was
    found: ``stream`` (``entry_id`` is that entry), ``floor`` (this publisher wrote or found it
    before) or ``workers`` (a worker reports having seen it)."""
    if source == "stream" and entry_id:
        where = f"entry {entry_id} of {events} is numbered {version}"
        fix = (
            f"delete it (XDEL {events} {entry_id}) and restart the workers that applied it; "
            "the content is then published again"
        )
    elif source == "workers":
        where = f"a worker of {key} reports having seen version {version}"
        fix = "restart the workers that report it (hotreload status shows them)"
    else:
        where = f"this publisher wrote or found version {version} of {key} before"
        fix = "delete the entry that carries it and restart the publisher"
    return (
        f"{key}: cannot publish: {where}, the highest a version may be ({MAX_VERSION}), so no "
        f"version is left above it (not written by hotreload: a junk or tampered entry); "
        f"nothing written: {fix}"
    )
