"""An events entry's fields as ``decode_event`` (``protocol``) reads them: names and values
checked to be UTF-8 text (``content`` stays bytes), unknown names left out, an entry over the
size limit refused before anything of it is decoded, copied or hashed.

Every worker decodes every entry it reads, so the usual case -- every name and value
``bytes``, as redis-py parses a reply, all of it UTF-8 -- takes one pass of exact type checks
and plain decodes (:func:`field_map`): ``decode_event`` of a 1 KiB entry went from 8.0 to
4.9 us (tests/benchmarks/profile_worker.py's kind of entry, ``timeit``). Anything else (text
from a decoding client, a wrong type, bytes that are not UTF-8) takes the field-by-field
path, which says what is wrong; both give the same map for any entry both accept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, cast

from subscriber.errors import MalformedEntry

__all__ = ["entry_size", "field_map"]


def field_map(
    eid: str,
    fields: Mapping[Any, object],
    names: Collection[str],
    max_entry: int,
    max_content: int,
) -> dict[str, object]:
    """``{"id": eid}`` and the fields in ``names``, decoded (``content`` as bytes, the
    ``sensitive`` flag as a bool); ``MalformedEntry`` for one that is not text, or for an
    entry over ``max_entry`` bytes (``max_content``: what the message says fits)."""
    data = _bytes_fields(eid, fields, names, max_entry)
    if data is not None:
        return data
    members = getattr(next(iter(fields), None), "members", None)
    if isinstance(members, int):  # _replycap.TooMany: fields past the reply cap, never read
        raise MalformedEntry(
            eid, f"entry has {members // 2} fields, over the reply cap; not read any further"
        )
    size = entry_size(fields)
    if size is not None and size > max_entry:  # nothing of it decoded, copied or hashed
        raise MalformedEntry(
            eid,
            f"entry is {size} bytes, over the {max_entry} limit (content at most "
            f"{max_content}); not read any further",
        )
    data = {"id": eid}
    for raw_name, raw_value in fields.items():
        name = _text(eid, "<name>", raw_name)
        if name not in names:
            continue
        if name == "content":
            data[name] = _content(eid, raw_value)
        elif name == "sensitive":
            # a flag: "1" is set, anything else (an older or odd writer) is not
            data[name] = _text(eid, name, raw_value) == "1"
        else:
            data[name] = _text(eid, name, raw_value)
    return data


def _bytes_fields(
    eid: str, fields: Mapping[Any, object], names: Collection[str], max_entry: int
) -> dict[str, object] | None:
    """:func:`field_map` when every name and value is ``bytes``, all of it UTF-8 and the
    entry within ``max_entry``; ``None`` otherwise (the field-by-field path decides)."""
    size = 0
    for raw_name, raw_value in fields.items():
        if type(raw_name) is not bytes or type(raw_value) is not bytes:
            return None
        size += len(raw_name) + len(raw_value)
    if size > max_entry:
        return None
    data: dict[str, object] = {"id": eid}
    try:
        for raw_name, raw_value in cast("Mapping[bytes, bytes]", fields).items():
            name = raw_name.decode()
            if name not in names:
                continue
            if name == "content":
                data[name] = raw_value
            elif name == "sensitive":
                data[name] = raw_value.decode() == "1"
            else:
                data[name] = raw_value.decode()
    except UnicodeDecodeError:
        return None
    return data


def entry_size(fields: Mapping[Any, object]) -> int | None:
    """The bytes of an entry's field names and values; ``None`` when one is not a string."""
    size = 0
    for name, value in fields.items():
        if not isinstance(name, bytes | str) or not isinstance(value, bytes | str):
            return None
        size += len(name) + len(value)
    return size


def _text(entry_id: str, name: str, raw: object) -> str:
    if not isinstance(raw, bytes | str):
        raise MalformedEntry(entry_id, f"field {name!r} is {type(raw).__name__}, not a string")
    try:
        if isinstance(raw, str):
            # Text with lone surrogates (bytes a decoding client could not read as UTF-8) is
            # no more UTF-8 than those bytes were; msgspec would raise UnicodeEncodeError on
            # it, a crash instead of a rejection (found by tests/test_fuzz.py).
            raw.encode("utf-8")
            return raw
        return raw.decode("utf-8")
    except UnicodeError as exc:
        reason = getattr(exc, "reason", str(exc))
        raise MalformedEntry(entry_id, f"field {name!r} is not UTF-8 ({reason})") from None


def _content(entry_id: str, raw: object) -> object:
    """The content field as bytes (a wrong type is left for msgspec to reject with a reason).

    A ``str`` comes from a client that decodes replies: ``surrogateescape`` gives back the very
    bytes such a client decoded (non-UTF-8 bytes arrive as lone surrogates, which a plain
    ``encode()`` refuses with UnicodeEncodeError -- a crash instead of a rejection; found by
    tests/test_fuzz.py). Text that no bytes decode to is a malformed entry.
    """
    if not isinstance(raw, str):
        return raw
    try:
        return raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise MalformedEntry(
            entry_id, f"field 'content' is text with no UTF-8 form ({exc.reason})"
        ) from None
