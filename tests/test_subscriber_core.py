"""The subscriber's decisions, without I/O: walk-back, dedupe by hash, cursor, rejections.

Entries here have exactly the shape redis-py returns (``bytes`` ids, ``dict[bytes, bytes]``
fields); the Redis-backed tests in test_subscriber*.py prove the same rules end to end.
"""

from __future__ import annotations

import logging

import pytest

from subscriber._core import SubscriberCore
from subscriber._reasons import MAX_ERROR_CHARS, describe
from subscriber._state import ZERO_ID, Cursor, compare_ids
from subscriber._walk import Walk
from subscriber.protocol import SCHEMA_VERSION, sha256_hex
from tests.helpers import Recorder

KEY = "app.yaml"
LOG = logging.getLogger("tests.core")
REASON = "limit must be positive"  # what Recorder raises for content containing REJECT

RawEntry = tuple[bytes, dict[bytes, bytes]]


def entry(
    entry_id: str, content: bytes, version: int, *, key: str = KEY, sha256: str | None = None
) -> RawEntry:
    return entry_id.encode(), {
        b"schema": str(SCHEMA_VERSION).encode(),
        b"key": key.encode(),
        b"version": str(version).encode(),
        b"sha256": (sha256 or sha256_hex(content)).encode(),
        b"content": content,
        b"published_at": b"1700000000000",
        b"publisher": b"test:1",
    }


def with_field(name: bytes, value: bytes) -> dict[bytes, bytes]:
    """A valid entry's fields with one of them replaced."""
    return {**entry("1-0", b"a", 1)[1], name: value}


def make_core(recorder: Recorder, *, decode: bool = True) -> SubscriberCore:
    core = SubscriberCore(KEY, recorder, decode=decode, logger=LOG)
    core.worker = "pod:1"
    return core


def walk_newest_first(
    core: SubscriberCore, entries: list[RawEntry], stop_at: Cursor | None = None
) -> Walk:
    """Feed entries (given oldest first, as XREAD returns them) newest first, as walks do."""
    walk = core.walk(limit=100, stop_at=stop_at)
    for entry_id, fields in reversed(entries):
        if not walk.step(entry_id, fields):
            break
    walk.finish()
    return walk


def test_walk_back_applies_newest_accepted_and_reports_each_rejection() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    history = [
        entry("1-0", b"a: 1", 1),
        entry("2-0", b"a: 2", 2),
        entry("3-0", b"REJECT 3", 3),
        entry("4-0", b"REJECT 4", 4),
    ]
    walk = core.walk(limit=100)
    for entry_id, fields in reversed(history):
        if not walk.step(entry_id, fields):
            break
    walk.finish()

    assert rec.applied == ["a: 2"]  # v1 is older than the accepted one: never called back
    assert [(a.version, a.status) for a in walk.acks] == [
        (4, "rejected"),
        (3, "rejected"),
        (2, "applied"),
    ]
    assert walk.acks[0].error == "ValueError: limit must be positive"
    assert all(a.worker == "pod:1" for a in walk.acks)
    snap = core.state
    assert snap.running is not None
    assert snap.running.version == 2
    assert snap.rejection is not None  # the newest rejected
    assert snap.rejection.version == 4
    assert (snap.reload_count, snap.error_count) == (1, 2)
    assert core.status() == "rejected"
    assert core.cursor == Cursor("4-0", sha256_hex(b"REJECT 4"))


def test_walk_stops_at_the_limit_and_reports_why_nothing_was_acceptable() -> None:
    core = make_core(Recorder(reason=REASON))
    history = [entry(f"{i}-0", f"REJECT {i}".encode(), i) for i in range(1, 6)]
    walk = core.walk(limit=3)
    for entry_id, fields in reversed(history):
        if not walk.step(entry_id, fields):
            break
    walk.finish()
    assert walk.examined == 3
    assert core.state.running is None
    assert [r.split(" (")[0] for r in walk.reasons] == ["version 5", "version 4", "version 3"]


def test_same_hash_is_acknowledged_unchanged_without_calling_back() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1)])
    # a revert to the same content, or a stream re-seeded after a reset with version 1
    walk = core.walk(limit=10)
    walk.step(*entry("9-0", b"a: 1", 7))
    walk.finish()
    assert rec.applied == ["a: 1"]
    (ack,) = walk.acks
    assert (ack.status, ack.unchanged, ack.version) == ("applied", True, 7)
    assert core.state.running is not None
    assert core.state.running.version == 7
    assert core.state.reload_count == 1


def test_a_batch_applies_only_its_newest_acceptable_entry() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1)])
    batch = [entry("2-0", b"a: 2", 2), entry("3-0", b"a: 3", 3), entry("4-0", b"REJECT", 4)]
    walk = walk_newest_first(core, batch)
    assert rec.applied == ["a: 1", "a: 3"]  # v2 superseded within the batch: no callback
    assert [(a.version, a.status) for a in walk.acks] == [(4, "rejected"), (3, "applied")]
    assert core.status() == "rejected"


def test_a_newer_accepted_version_clears_the_rejected_status() -> None:
    core = make_core(Recorder(reason=REASON))
    walk_newest_first(core, [entry("1-0", b"a: 1", 1), entry("2-0", b"REJECT", 2)])
    assert core.status() == "rejected"
    walk_newest_first(core, [entry("3-0", b"a: 3", 3)])
    assert core.status() == "applied"
    assert core.state.rejection is None


def test_resync_stops_at_the_cursor_and_decides_nothing_twice() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    history = [entry("1-0", b"a: 1", 1), entry("2-0", b"REJECT", 2)]
    walk_newest_first(core, history)
    errors = core.state.error_count
    # reconnect, nothing new: the newest entry is the cursor itself
    walk = walk_newest_first(core, history, stop_at=core.cursor)
    assert walk.acks == []
    assert walk.examined == 0
    assert core.state.error_count == errors
    assert core.status() == "rejected"  # still true: v2 is still not running
    # reconnect after new entries: decided down to the cursor, not past it
    history += [entry("3-0", b"REJECT again", 3)]
    walk = walk_newest_first(core, history, stop_at=core.cursor)
    assert [a.version for a in walk.acks] == [3]
    assert rec.applied == ["a: 1"]


def test_a_reused_id_with_other_content_is_not_mistaken_for_the_cursor() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("5-0", b"a: 1", 1)])
    # the stream was deleted and re-created in the same millisecond: same id, new content
    # (published above what the worker has seen, as publishers do)
    walk = walk_newest_first(core, [entry("5-0", b"a: 2", 2)], stop_at=core.cursor)
    assert rec.applied == ["a: 1", "a: 2"]
    assert [a.status for a in walk.acks] == ["applied"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"junk": b"\x00\xff"}, "missing required field"),
        ({b"version": b"1", b"content": b"a: 1"}, "missing required field"),
        (with_field(b"version", b"one"), "Expected `int`"),
        (with_field(b"version", b"0"), ">= 1"),
        (with_field(b"sha256", b"xyz"), "at `$.sha256`"),
        (with_field(b"schema", b"2"), "upgrade the subscriber"),
        (with_field(b"publisher", b"\xff\xfe"), "not UTF-8"),
        (entry("1-0", b"a: 1", 1, sha256="0" * 64)[1], "corrupt or forged"),
        (entry("1-0", b"a: 1", 1, key="other.yaml")[1], "not 'app.yaml'"),
        (entry("1-0", b"a: \xff\xfe", 1)[1], "not valid UTF-8"),
        (None, "not a field map"),
    ],
    ids=[
        "garbage",
        "partial",
        "wrong-type",
        "version-0",
        "bad-hash-field",
        "future-schema",
        "binary-field",
        "forged",
        "other-key",
        "bad-utf8-content",
        "no-fields",
    ],
)
def test_malformed_entries_are_rejections_with_a_reason(fields: object, reason: str) -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1)])
    walk = core.walk(limit=10, batch=True)
    assert walk.step(b"2-0", fields)  # a rejection: the walk goes on to older entries
    walk.finish()
    (ack,) = walk.acks
    assert ack.status == "rejected"
    assert reason in ack.error
    assert ack.entry_id == "2-0"
    assert rec.applied == ["a: 1"]
    assert core.state.running is not None
    assert core.state.running.version == 1
    assert core.status() == "rejected"


def test_bytes_callbacks_receive_any_content() -> None:
    received: list[bytes] = []
    core = SubscriberCore(KEY, received.append, decode=False, logger=LOG)
    walk = core.walk(limit=1)
    walk.step(*entry("1-0", b"\xff\xfe binary", 1))
    walk.finish()
    assert received == [b"\xff\xfe binary"]


def test_an_empty_stream_resets_the_cursor_and_a_stream_behind_it_needs_a_resync() -> None:
    core = make_core(Recorder(reason=REASON))
    walk_newest_first(core, [entry("100-0", b"a: 1", 1)])
    assert not core.reconcile_newest(entry("100-0", b"a: 1", 1))  # all as expected
    assert not core.reconcile_newest(entry("101-0", b"a: 2", 2))  # ahead: XREAD gets it
    assert core.reconcile_newest(entry("50-0", b"a: 2", 1))  # re-created with lower ids
    assert core.reconcile_newest(entry("100-0", b"a: 2", 1))  # same id, other content
    assert not core.reconcile_newest(None)
    assert core.cursor == Cursor(ZERO_ID, "")


def test_fallback_content_runs_as_version_0() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    core.use_fallback(b"a: 0")
    assert core.status() == "fallback"
    assert core.state.running is not None
    assert core.state.running.version == 0
    # Redis comes back with the same content: adopted without a callback
    walk_newest_first(core, [entry("1-0", b"a: 0", 4)])
    assert rec.applied == ["a: 0"]
    assert core.status() == "applied"


def test_worker_state_reports_status_version_and_rejection() -> None:
    core = make_core(Recorder(reason=REASON))
    walk_newest_first(core, [entry("1-0", b"a: 1", 1), entry("2-0", b"REJECT", 2)])
    state = core.worker_state(heartbeat_interval=5.0, started_at=1, pid=7, host="pod")
    assert (state.worker, state.status, state.version) == ("pod:1", "rejected", 1)
    assert (state.rejected_version, state.error) == (2, "ValueError: limit must be positive")
    assert state.heartbeat > 0
    stopped = core.worker_state(stopped=True, heartbeat_interval=5.0, started_at=1, pid=7, host="")
    assert stopped.status == "stopped"


def test_id_ordering_and_error_text_bounds() -> None:
    assert compare_ids("10-0", "9-5") == 1
    assert compare_ids("9-5", "9-5") == 0
    assert compare_ids("9-5", "9-10") == -1
    assert compare_ids("0-0", "1-0") == -1
    assert describe(ValueError()) == "ValueError"
    assert len(describe(ValueError("x" * 10_000))) == MAX_ERROR_CHARS
