"""The bytes a worker sends and the fields it reads, against their references.

``_wire.pack`` (every round trip a subscriber makes) must put on the wire exactly what
redis-py's own packer does, also for arguments its cache of short texts has seen before; and
``_fields.field_map`` (every entry a worker decodes) must read a plain ``bytes`` entry the
same way on its fast path as field by field. No Redis needed: both are pure.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.connection import Connection
from redis.exceptions import DataError

from subscriber import _fields, _wire
from subscriber.errors import MalformedEntry
from subscriber.protocol import MAX_ENTRY_BYTES, decode_event, sha256_hex


def reference(commands: list[tuple[Any, ...]]) -> bytes:
    parts = Connection().pack_commands(commands)  # type: ignore[no-untyped-call]
    return b"".join(bytes(part) for part in parts)


def packed(commands: list[tuple[Any, ...]]) -> bytes:
    return b"".join(bytes(part) for part in _wire.pack(commands))


COMMANDS: list[tuple[Any, ...]] = [
    ("XADD", "hotreload:{app.yaml}:acks", "MAXLEN", "~", 1000, "*", "worker", "pod-1:7",
     "version", 12, "apply_ms", 0.125, "error", "", "status", "applied", "note", "é ünïcode"),
    ("HSET", "hotreload:{app.yaml}:workers", "pod-1:7", b'{"status":"applied"}'),
    ("XREAD", "COUNT", 8, "BLOCK", 4999, "STREAMS", "s", "1700000000000-0"),
    ("SET", "big", b"x" * 7000, "big-text", "y" * 7000, "view", memoryview(b"abc")),
    ("SET", "negative", -5, "float", -1.5e-9, "huge", 2**70),
]  # fmt: skip


def test_pack_matches_redis_py_also_once_its_texts_are_cached() -> None:
    _wire._BULK_CACHE.clear()
    want = reference(COMMANDS)
    assert packed(COMMANDS) == want  # the texts are encoded and cached here
    assert _wire._BULK_CACHE  # ...and reused here
    assert packed(COMMANDS) == want


def test_the_cache_stays_bounded_and_right_when_it_fills() -> None:
    _wire._BULK_CACHE.clear()
    many = [("SET", f"key-{i}", f"value-{i}") for i in range(3 * _wire._BULK_CACHE_SIZE)]
    assert packed(many) == reference(many)
    assert len(_wire._BULK_CACHE) <= _wire._BULK_CACHE_SIZE
    assert packed(many[:5]) == reference(many[:5])


def test_what_changes_with_every_entry_is_never_cached() -> None:
    _wire._BULK_CACHE.clear()
    digest = sha256_hex(b"content")  # 64 characters: new with every version
    entry_id = "1700000000000-0"  # new with every entry
    commands: list[tuple[Any, ...]] = [("SET", digest, entry_id), ("SET", "", "x")]
    assert packed(commands) == reference(commands)
    assert digest not in _wire._BULK_CACHE
    assert entry_id not in _wire._BULK_CACHE
    assert "" in _wire._BULK_CACHE  # the empty text (an ack's error) is


@pytest.mark.parametrize("bad", [True, None, object()])
def test_pack_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(DataError):
        _wire.pack([("SET", "k", bad)])  # type: ignore[list-item]


def fields_of(version: int = 3, **extra: bytes) -> dict[bytes, bytes]:
    content = b"limits:\n  rps: 10\n"
    fields = {b"schema": b"1", b"key": b"app.yaml", b"version": str(version).encode(),
              b"sha256": sha256_hex(content).encode(), b"content": content,
              b"published_at": b"1700000000000", b"publisher": b"pod:1"}  # fmt: skip
    fields.update({name.encode(): value for name, value in extra.items()})
    return fields


def slow(fields: dict[Any, Any]) -> dict[str, object]:
    """The field-by-field path alone (the fast one turned off)."""
    names = {"schema", "key", "version", "sha256", "content", "published_at", "publisher",
             "sensitive", "unknown_is_dropped"}  # fmt: skip
    saved = _fields._bytes_fields
    _fields._bytes_fields = lambda *args: None
    try:
        return _fields.field_map("1-0", fields, names - {"unknown_is_dropped"}, 10**6, 10**6)
    finally:
        _fields._bytes_fields = saved


@pytest.mark.parametrize(
    "fields",
    [fields_of(), fields_of(sensitive=b"1"), fields_of(sensitive=b"yes"), fields_of(extra=b"x")],
)
def test_the_fast_path_reads_an_entry_as_the_field_by_field_one(fields: dict[bytes, bytes]) -> None:
    names = {"schema", "key", "version", "sha256", "content", "published_at", "publisher",
             "sensitive"}  # fmt: skip
    assert _fields._bytes_fields("1-0", fields, names, 10**6) is not None  # the fast path ran
    assert _fields.field_map("1-0", fields, names, 10**6, 10**6) == slow(fields)


def test_text_fields_take_the_field_by_field_path_to_the_same_event() -> None:
    as_bytes = fields_of()
    as_text = {k.decode(): v.decode() for k, v in as_bytes.items()}
    assert decode_event("1-0", as_text) == decode_event("1-0", as_bytes)


def test_bytes_that_are_not_utf8_are_still_refused_with_the_field_named() -> None:
    with pytest.raises(MalformedEntry, match="'publisher' is not UTF-8"):
        decode_event("1-0", fields_of(publisher=b"\xff\xfe"))
    with pytest.raises(MalformedEntry, match="'<name>' is not UTF-8"):
        decode_event("1-0", {**fields_of(), b"\xff": b"x"})


def test_an_oversized_entry_is_refused_before_it_is_read() -> None:
    fields = fields_of(padding=b"x" * MAX_ENTRY_BYTES)
    with pytest.raises(MalformedEntry, match=r"over the \d+ limit"):
        decode_event("1-0", fields)
