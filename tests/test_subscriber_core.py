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
from subscriber.defaults import HISTORY_READ_CAP
from subscriber.protocol import MAX_ENTRY_BYTES, SCHEMA_VERSION, sha256_hex
from tests.helpers import Recorder

KEY = "app.yaml"
LOG = logging.getLogger("tests.core")
REASON = "limit must be positive"  # what Recorder raises for content containing REJECT

RawEntry = tuple[bytes, dict[bytes, bytes]]

PUBLISHED_AT = 1_700_000_000_000  # every entry's published_at: ids below it are on time
# An old entry appended again an hour after it was published: ids from here on are late.
LATER = PUBLISHED_AT + 3_600_000


def late(n: int) -> str:
    """The id of an entry appended an hour after its ``published_at`` (a replay)."""
    return f"{LATER + n}-0"


def entry(
    entry_id: str, content: bytes, version: int, *, key: str = KEY, sha256: str | None = None
) -> RawEntry:
    return entry_id.encode(), {
        b"schema": str(SCHEMA_VERSION).encode(),
        b"key": key.encode(),
        b"version": str(version).encode(),
        b"sha256": (sha256 or sha256_hex(content)).encode(),
        b"content": content,
        b"published_at": str(PUBLISHED_AT).encode(),
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
        (with_field(b"version", b"one"), "not a decimal integer in 1..9007199254740991"),
        (with_field(b"version", b"0"), ">= 1"),
        (with_field(b"version", b"9223372036854775808"), "not a decimal integer"),
        (with_field(b"version", b"1e17"), "not a decimal integer"),
        (with_field(b"version", b"-1"), "not a decimal integer"),
        (with_field(b"version", b"9007199254740992"), "not a decimal integer"),
        (with_field(b"junk", b"x" * (MAX_ENTRY_BYTES + 1)), "over the"),
        (with_field(b"sha256", b"xyz"), "at `$.sha256`"),
        (with_field(b"schema", b"3"), "upgrade the subscriber"),
        (with_field(b"publisher", b"\xff\xfe"), "not UTF-8"),
        (entry("1-0", b"a: 1", 1, sha256="0" * 64)[1], "corrupt or forged"),
        (entry("1-0", b"a: 1", 1, key="other.yaml")[1], "not 'app.yaml'"),
        (entry("1-0", b"a: \xff\xfe", 2)[1], "not valid UTF-8"),
        (None, "not a field map"),
    ],
    ids=[
        "garbage",
        "partial",
        "wrong-type",
        "version-0",
        "version-2**63",
        "version-1e17",
        "version-negative",
        "version-2**53",
        "oversized",
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


def test_a_junk_version_never_counts_toward_seen_and_junk_is_acked_once_per_pass() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1)])
    walk = core.walk(limit=20, batch=True)
    junk = [
        (b"2-0", with_field(b"version", b"9223372036854775808")),  # 2**63
        (b"3-0", {b"version": b"1e17", b"content": b"x"}),
        *[(f"{n}-0".encode(), {b"garbage": b"x"}) for n in range(4, 17)],
    ]
    for entry_id, fields in reversed(junk):
        walk.step(entry_id, fields)
    walk.finish()
    assert core.state.seen == 1  # unsigned mode trusts claims, but not a junk one
    assert core.state.error_count == 15  # each one counted ...
    # ... the newest 10 (MALFORMED_TOLD_ONE_BY_ONE) acked one by one, then one ack for the
    # rest: the newest of them, saying how many it stands for
    assert [a.entry_id for a in walk.acks] == [f"{n}-0" for n in range(16, 5, -1)]
    assert "(and 4 older malformed entries in the same read" in walk.acks[-1].error
    walk_newest_first(core, [entry("17-0", b"a: 2", 2)], stop_at=core.cursor)
    assert rec.applied == ["a: 1", "a: 2"]  # version 2 is not a replay


def test_a_callbacks_base_exception_is_a_rejection_unless_it_must_stop_the_process() -> None:
    def exits(text: str) -> None:
        if "EXIT" in text:
            raise SystemExit(3)
        if "INTERRUPT" in text:
            raise KeyboardInterrupt

    core = SubscriberCore(KEY, exits, decode=True, logger=LOG)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1)])
    walk = walk_newest_first(core, [entry("2-0", b"a: EXIT", 2)], stop_at=core.cursor)
    assert [(a.status, a.error) for a in walk.acks] == [("rejected", "SystemExit: 3")]
    assert (core.status(), core.state.running and core.state.running.version) == ("rejected", 1)

    core.propagates = lambda exc: isinstance(exc, KeyboardInterrupt)  # the transport's rule
    with pytest.raises(KeyboardInterrupt):
        walk_newest_first(core, [entry("3-0", b"a: INTERRUPT", 3)], stop_at=core.cursor)
    assert core.callback_seconds() == 0.0  # no callback is left marked as running


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


# -- versions only go up -------------------------------------------------------------------


def test_seen_is_the_highest_version_decided_and_replays_are_refused_and_reported() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry("1-0", b"a: 1", 1), entry("2-0", b"a: 2", 2)])
    assert core.state.seen == 2
    walk_newest_first(core, [entry("3-0", b"REJECT", 3)])  # a rejection counts too
    assert (core.state.seen, core.state.running and core.state.running.version) == (3, 2)
    walk = core.walk(limit=10, batch=True)
    walk.step(*entry("4-0", b"a: 1", 1))  # v1's entry appended again
    walk.finish()
    (ack,) = walk.acks
    assert (ack.status, ack.version, ack.entry_id) == ("rejected", 1, "4-0")
    assert ack.error.startswith("replay: version 1 is not above version 3")
    assert walk.replays == 1
    assert rec.applied == ["a: 2"]
    assert core.status() == "rejected"  # still v3's rejection: a replay changes no status
    assert core.state.rejection is not None
    assert core.state.rejection.version == 3
    assert core.survey_due  # is the stream behind? the next resync reads it
    state = core.worker_state(heartbeat_interval=5.0, started_at=1, pid=7, host="pod")
    assert (state.seen, state.version, state.rejected_version) == (3, 2, 3)


def test_a_fresh_walk_picks_the_highest_version_not_the_last_appended() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    history = [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 6)]
    history += [entry(late(6), b"a: 1", 1), entry(late(7), b"a: 3", 3)]  # replays, ascending
    walk = walk_newest_first(core, history)
    assert rec.applied == ["a: 5"]
    assert walk.reordered  # v5 is above the newer v1: read on past it
    assert [(a.version, a.entry_id, a.status) for a in walk.acks] == [
        (3, late(7), "rejected"),
        (1, late(6), "rejected"),
        (5, "5-0", "applied"),
    ]  # the replays newer than v5 reported; v1..v4 are history: no ack
    assert core.status() == "applied"
    assert core.cursor.entry_id == late(7)


def test_equal_versions_prefer_the_entry_appended_first() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk = walk_newest_first(core, [entry("1-0", b"a: 1", 1), entry(late(2), b"a: 1", 1)])
    assert [(a.entry_id, a.status) for a in walk.acks] == [
        (late(2), "rejected"),
        ("1-0", "applied"),
    ]


def test_an_on_time_newest_entry_is_taken_with_a_single_read() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk = core.walk(limit=100)
    steps = [walk.step(*entry(f"{v}-0", f"a: {v}".encode(), v)) for v in range(10, 4, -1)]
    assert steps == [False] * 6  # appended when it was published: nothing older is read
    assert walk.examined == 1
    walk.finish()
    assert (rec.applied, core.status()) == (["a: 10"], "applied")
    assert [(a.version, a.status) for a in walk.acks] == [(10, "applied")]


def test_an_on_time_newest_entry_walks_back_only_past_rejections() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk = core.walk(limit=100)
    history = [entry("1-0", b"a: 1", 1), entry("2-0", b"a: 2", 2), entry("3-0", b"REJECT", 3)]
    steps = [walk.step(*raw) for raw in reversed(history)]
    assert steps == [True, False, False]  # v3 rejected, v2 runs: v1 is never read
    walk.finish()
    assert rec.applied == ["a: 2"]
    assert [(a.version, a.status) for a in walk.acks] == [(3, "rejected"), (2, "applied")]
    assert core.status() == "rejected"


def test_an_on_time_newest_entry_below_seen_ends_the_pass_holding() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 6)])
    # restored from a backup taken at v3 (ids and published_at kept together: on time)
    walk = core.walk(limit=100, stop_at=core.cursor)
    assert not walk.step(*entry("3-0", b"a: 3", 3))  # nothing older can be above seen
    walk.finish()
    assert (rec.applied, core.status()) == (["a: 5"], "holding")
    # a fresh worker takes the restored stream's newest: it ran nothing newer
    fresh = make_core(Recorder())
    walk_newest_first(fresh, [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 4)])
    assert fresh.state.running is not None
    assert fresh.state.running.version == 3


def test_a_late_newest_entry_makes_the_pass_read_on_for_the_highest_version() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    history = [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 6)]
    history.append(entry(late(6), b"a: 3", 3))  # v3 appended again an hour after signing
    walk = walk_newest_first(core, history)
    assert walk.examined == 6  # read on past the late one, to the end
    assert rec.applied == ["a: 5"]
    assert [(a.version, a.entry_id, a.status) for a in walk.acks] == [
        (3, late(6), "rejected"),
        (5, "5-0", "applied"),
    ]
    # a late newest entry that is the highest version is still the one taken
    fresh = make_core(Recorder())
    walk = walk_newest_first(fresh, [*history[:5], entry(late(6), b"a: 6", 6)])
    assert walk.examined == 6
    assert fresh.state.running is not None
    assert fresh.state.running.version == 6


def test_a_skewed_clock_costs_reads_never_the_highest_version() -> None:
    """The publisher's clock is more than the tolerance behind Redis's: every genuine entry
    looks late, so each pass reads on, and still ends on the highest version."""
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    history = [entry(late(v), f"a: {v}".encode(), v) for v in range(1, 8)]
    walk = walk_newest_first(core, history)
    assert walk.examined == 7  # the whole history, where an on-time newest costs one read
    assert rec.applied == ["a: 7"]
    assert [(a.version, a.status) for a in walk.acks] == [(7, "applied")]
    assert core.status() == "applied"


def test_a_history_whose_versions_decrease_is_read_to_the_limit_only() -> None:
    core = make_core(Recorder(reason=REASON))
    walk = core.walk(limit=3)
    # late entries (a skewed clock): the pass reads on, but only to its limit
    steps = [walk.step(*entry(late(v), f"a: {v}".encode(), v)) for v in range(10, 4, -1)]
    assert steps == [True, True, False, False, False, False]  # read to the limit, no further
    assert walk.examined == 3
    walk.finish()
    assert core.state.running is not None
    assert core.state.running.version == 10


def test_a_reordered_history_is_read_further_up_to_the_hard_cap() -> None:
    core = make_core(Recorder(reason=REASON))
    walk = core.walk(limit=3)
    assert walk.step(*entry(late(2000), b"a: 1", 1))  # appended again
    assert walk.step(*entry("1999-0", b"a: 1999", 1999))  # versions went up: read on
    more = [walk.step(*entry(f"{v}-0", f"a: {v}".encode(), v)) for v in range(1998, 0, -1)]
    assert walk.examined == HISTORY_READ_CAP  # bounded, however long the stream
    assert more.count(True) == HISTORY_READ_CAP - 3  # the step that reached the cap: False
    walk.finish()
    assert core.state.running is not None
    assert core.state.running.version == 1999


def test_a_history_behind_seen_leaves_the_worker_holding_until_a_higher_version() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 6)])
    # restored from a backup taken at v3: the resync does not find the cursor (v5's entry)
    restored = [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 4)]
    walk = walk_newest_first(core, restored, stop_at=core.cursor)
    assert [(a.version, a.status) for a in walk.acks] == [(3, "rejected")]  # v1, v2: history
    assert rec.applied == ["a: 5"]
    assert core.status() == "holding"
    reason = (
        "holding v5: the stream's newest version is 3 (restored, re-created or failed over "
        "behind this worker); waiting for a version above 5"
    )
    assert core.state.holding == reason
    state = core.worker_state(heartbeat_interval=5.0, started_at=1, pid=7, host="pod")
    assert (state.status, state.error, state.version, state.seen) == ("holding", reason, 5, 5)
    # the cursor moved to the restored stream's newest entry: nothing is decided twice
    assert walk_newest_first(core, restored, stop_at=core.cursor).acks == []
    assert core.status() == "holding"
    walk_newest_first(core, [*restored, entry("6-0", b"a: 6", 6)], stop_at=core.cursor)
    assert (core.status(), rec.applied) == ("applied", ["a: 5", "a: 6"])
    assert core.worker_state(heartbeat_interval=5.0, started_at=1, pid=7, host="").error == ""


def test_an_empty_stream_holds_and_a_signed_walk_trusts_no_unverified_version() -> None:
    core = make_core(Recorder(reason=REASON))
    walk_newest_first(core, [entry("1-0", b"a: 1", 1), entry("2-0", b"a: 2", 2)])
    core.reconcile_newest(None)
    assert core.state.holding is not None
    assert core.state.holding.startswith("holding v2: the stream is empty")
    walk_newest_first(core, [entry("3-0", b"a: 3", 3)])
    assert core.status() == "applied"

    signed = SubscriberCore(KEY, Recorder(), decode=True, logger=LOG, signing_keys=[b"k" * 32])
    walk = signed.walk(limit=10, batch=True)
    walk.step(*entry("9-0", b"a: 9", 99))  # unsigned: rejected, and its version is no claim
    walk.finish()
    assert signed.state.seen == 0
    unsigned = make_core(Recorder())
    walk = unsigned.walk(limit=10, batch=True)
    walk.step(b"9-0", with_field(b"sha256", b"xyz") | {b"version": b"7"})
    walk.finish()
    assert unsigned.state.seen == 7  # unsigned mode: a malformed entry's readable version


def survey(core: SubscriberCore, entries: list[RawEntry]) -> Walk:
    """An ``XREAD`` batch of ``entries``, then the history pass it asks for when it was
    nothing but replays (``survey_due``), over the same entries: as both transports do."""
    batch = core.walk(limit=100, batch=True)
    for raw in entries:
        batch.step(*raw)
    batch.finish()
    assert core.survey_due
    walk = core.resync_walk(limit=100)
    for raw in reversed(entries):
        if not walk.step(*raw):
            break
    walk.finish()
    return walk


def test_the_version_that_runs_carried_by_another_content_holds_until_a_version_above() -> None:
    """Redis lost the entry this worker applied as v3 (a publish whose answer was lost, then
    a restart empty) and another content was numbered v3: no replay of what runs, nothing
    above it either. The worker holds, saying so, until a version above 3 arrives."""
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 4)])
    renumbered = [entry("90-0", b"a: other", 3)]  # the re-created stream's only entry
    walk = survey(core, renumbered)
    assert rec.applied == ["a: 3"]
    assert core.status() == "holding"
    reason = (
        f"holding version 3 (sha256 {sha256_hex(b'a: 3')[:12]}): the stream's version 3 is "
        "another entry (Redis lost the one this worker applied and numbered another content "
        "the same); waiting for a version above 3"
    )
    assert core.state.holding == reason
    state = core.worker_state(heartbeat_interval=5.0, started_at=1, pid=7, host="pod")
    assert (state.status, state.error, state.version, state.seen) == ("holding", reason, 3, 3)
    assert walk.acks == []  # the batch reported the replay; the survey reports nothing again
    # a batch of nothing new keeps it holding; a version above ends it
    walk_newest_first(core, renumbered, stop_at=core.cursor)
    assert core.status() == "holding"
    batch = core.walk(limit=100, batch=True)
    batch.step(*entry("91-0", b"a: other", 5))
    batch.finish()
    assert core.state.holding is None
    assert (core.status(), rec.applied) == ("applied", ["a: 3", "a: other"])


def test_the_same_content_at_the_version_that_runs_or_a_rejected_seen_does_not_hold() -> None:
    rec = Recorder(reason=REASON)
    core = make_core(rec)
    walk_newest_first(core, [entry(f"{v}-0", f"a: {v}".encode(), v) for v in range(1, 4)])
    survey(core, [entry("90-0", b"a: 3", 3)])  # re-seeded identical content as v3
    assert (core.status(), core.state.holding) == ("applied", None)
    # seen from a rejection: v3 another content than the rejected one is no lost entry of
    # what runs (v2): the stream is not behind either
    rejecting = make_core(Recorder(reason=REASON))
    walk_newest_first(rejecting, [entry("1-0", b"a: 2", 2), entry("2-0", b"REJECT", 3)])
    assert (rejecting.state.seen, rejecting.status()) == (3, "rejected")
    survey(rejecting, [entry("90-0", b"a: other", 3)])
    assert rejecting.state.holding is None
