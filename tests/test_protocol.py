"""The wire contract's rollout fields (issue 19): audience entries, schema 2, the v2 signature.

What must not change is pinned by value: an entry without an audience decodes, and is signed,
exactly as before rollout control (the v1 signature below was computed on the release before
it). What is new is checked field by field: the audience is strict (it decides who runs a
config), the other rollout fields are labels read leniently (no worker acts on them).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from subscriber.errors import MalformedEntry
from subscriber.protocol import (
    AUDIENCE_SCHEMA,
    MAX_AUDIENCE,
    SCHEMA_VERSION,
    WorkerState,
    decode_audience,
    decode_event,
    decode_worker_state,
    encode_audience,
    encode_worker_state,
    sha256_hex,
    sign,
    signature_message,
)

SECRET = b"k" * 32
SHA = "ab" * 32
# Computed on the release before rollout control (git c4bd062): the v1 message and signature.
V1_MESSAGE = b"hotreload-event-v1\napp.yaml\n7\n" + SHA.encode() + b"\n1700000000123"
V1_SIG = "874d65c2e0bc350fdc248d03351ef6c3bb3a4f6e89d16e8457ca526be91caee7"


def fields(content: bytes = b"limit: 5\n", **extra: Any) -> dict[bytes, bytes]:
    base: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "key": "app.yaml",
        "version": 3,
        "sha256": sha256_hex(content),
        "content": content,
        "published_at": 1700000000000,
        "publisher": "pod:1",
    }
    base.update(extra)
    return {
        name.encode(): value if isinstance(value, bytes) else str(value).encode()
        for name, value in base.items()
        if value is not None
    }


def test_the_v1_signature_is_byte_for_byte_what_it_was() -> None:
    assert signature_message("app.yaml", 7, SHA, 1700000000123) == V1_MESSAGE
    assert sign(SECRET, "app.yaml", 7, SHA, 1700000000123) == V1_SIG
    # rollout labels on an entry for everyone are unsigned metadata: still the v1 message
    assert sign(SECRET, "app.yaml", 7, SHA, 1700000000123, rollout="promote") == V1_SIG


def test_the_v2_message_covers_the_rollout_and_the_exact_audience_text() -> None:
    audience = '["pod-a:12"]'
    message = signature_message(
        "app.yaml", 7, SHA, 1700000000123, audience_json=audience, rollout="canary"
    )
    assert message == (
        b"hotreload-event-v2\napp.yaml\n7\n" + SHA.encode() + b"\n1700000000123\ncanary\n"
        b'["pod-a:12"]'
    )
    signed = sign(SECRET, "app.yaml", 7, SHA, 1700000000123, audience_json=audience)
    assert signed != V1_SIG  # stripping the audience breaks the signature
    others = {
        sign(SECRET, "app.yaml", 7, SHA, 1700000000123, audience_json='["pod-b:1"]'),
        sign(SECRET, "app.yaml", 7, SHA, 1700000000123, audience_json='[ "pod-a:12"]'),
        sign(SECRET, "app.yaml", 7, SHA, 1700000000123, audience_json=audience, rollout="x"),
    }
    assert signed not in others
    assert len(others) == 3
    for bad in ({"audience_json": '["a"]\n'}, {"audience_json": "[]", "rollout": "a\nb"}):
        with pytest.raises(ValueError, match="newline"):
            signature_message("app.yaml", 7, SHA, 1, **bad)


def test_an_entry_without_audience_decodes_as_before() -> None:
    event = decode_event(b"5-0", fields())
    assert (event.schema, event.audience, event.audience_json) == (1, None, "")
    assert (event.rollout, event.rollout_of, event.rollout_sha256, event.request) == ("", 0, "", "")
    assert event.is_for("anyone:1")
    halt = decode_event(
        "6-0",
        fields(rollout="halt", rollout_of=5, rollout_sha256="cd" * 32, request="ab12"),
    )
    assert (halt.schema, halt.audience) == (1, None)
    assert (halt.rollout, halt.rollout_of, halt.rollout_sha256, halt.request) == (
        "halt",
        5,
        "cd" * 32,
        "ab12",
    )


def test_an_audience_entry_names_its_workers() -> None:
    text = encode_audience(["pod-b:3", "pod-a:12", "pod-b:3"])
    assert text == '["pod-a:12","pod-b:3"]'  # compact, sorted, each id once
    event = decode_event(b"5-0", fields(schema=AUDIENCE_SCHEMA, audience=text, rollout="canary"))
    assert event.schema == AUDIENCE_SCHEMA
    assert event.audience == ("pod-a:12", "pod-b:3")
    assert event.audience_json == text
    assert event.is_for("pod-a:12")
    assert not event.is_for("pod-c:1")
    # the exact text is kept (the signature covers it), whatever its spacing
    spaced = decode_event(b"5-0", fields(schema=2, audience='[ "pod-a:12" ]'))
    assert (spaced.audience, spaced.audience_json) == (("pod-a:12",), '[ "pod-a:12" ]')


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"audience": '["a:1"]'}, "has schema 2"),
        ({"schema": None, "audience": '["a:1"]'}, "has schema 2"),
        ({"schema": 2}, "schema 2 entry without an audience"),
        ({"schema": 3}, "upgrade the subscriber"),
        ({"schema": 2, "audience": "a:1"}, "not a JSON array"),
        ({"schema": 2, "audience": '{"a": 1}'}, "not a JSON array"),
        ({"schema": 2, "audience": '["a:1", ""]'}, "not a JSON array"),
        ({"schema": 2, "audience": '["a:1", 5]'}, "not a JSON array"),
        ({"schema": 2, "audience": "[]"}, "empty array"),
        ({"schema": 2, "audience": msgspec.json.encode([f"w:{i}" for i in range(10_001)])},
         "not a JSON array"),
        ({"schema": 2, "audience": b'["\xff"]'}, "not UTF-8"),
    ],
)  # fmt: skip
def test_a_bad_audience_makes_the_entry_malformed(extra: dict[str, Any], reason: str) -> None:
    with pytest.raises(MalformedEntry, match=reason):
        decode_event(b"5-0", fields(**extra))


def test_unreadable_rollout_labels_read_as_absent() -> None:
    event = decode_event(
        b"5-0", fields(rollout="someday", rollout_of="-3", rollout_sha256="nothex")
    )
    assert (event.rollout, event.rollout_of, event.rollout_sha256) == ("someday", 0, "")
    assert decode_event(b"5-0", fields(rollout_of=2**60)).rollout_of == 0


def test_audience_encoding_refuses_nobody_and_too_many() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_audience([])
    with pytest.raises(ValueError, match="non-empty"):
        encode_audience(["a:1", ""])
    with pytest.raises(ValueError, match=f"at most {MAX_AUDIENCE}"):
        encode_audience(f"w:{i}" for i in range(MAX_AUDIENCE + 1))
    many = [f"w:{i}" for i in range(MAX_AUDIENCE)]
    assert decode_audience(encode_audience(many)) == tuple(sorted(many))


def test_worker_state_says_whether_it_honours_audiences() -> None:
    # what a worker before rollout control wrote: no audience field -> False
    old = b'{"worker":"pod:1","status":"applied","version":3}'
    assert decode_worker_state(old).audience is False
    state = WorkerState(worker="pod:2", status="applied", audience=True)
    assert decode_worker_state(encode_worker_state(state)).audience is True
    assert b'"audience":true' in encode_worker_state(state)
