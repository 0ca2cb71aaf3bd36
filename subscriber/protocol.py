"""The wire contract between the publisher and every subscriber.

One stream entry per published version, under ``hotreload:{KEY}:events``. Its fields are flat
so ``redis-cli XRANGE`` shows them readably:

========== ===================================================================
field      value
========== ===================================================================
schema     wire version, ``1``; a subscriber rejects a schema it does not know
key        the config key (the ConfigMap key, e.g. ``app.yaml``)
version    decimal integer in 1..2**53-1 (``MAX_VERSION``), per key, never goes backwards
sha256     lowercase hex SHA-256 of ``content``
content    the raw bytes of the file (at most ``MAX_CONTENT_BYTES``)
published_at  unix time in milliseconds
publisher  ``host:pid`` of the daemon that published it
sig        optional: lowercase hex HMAC-SHA256, keyed with the signing key, of
           :func:`signature_message` -- the entry's identity (key, version,
           sha256, published_at); absent when the publisher has no signing key
kid        optional, with ``sig``: :func:`key_id` of the key that signed it (16 hex
           digits; names the key, reveals nothing of it), so a subscriber holding
           several keys during a rotation knows which one to check, and says which
           key it is missing when none matches
sensitive  optional: ``1`` when the content is a secret (``hotreload watch
           --sensitive KEY``, or a key of a Secret mount); ``hotreload show`` and
           ``diff`` then refuse without ``--reveal``. Absent means not sensitive.
========== ===================================================================

A subscriber given signing keys accepts only entries whose ``sig`` verifies (compared in
constant time) with the key named by ``kid``; one without keys ignores ``sig`` and ``kid``.
The signature covers the identity, not the content itself: the content is bound to it by
``sha256``, which every subscriber re-hashes. Signing keys are used as :func:`signing_key`
normalizes them: surrounding ASCII whitespace dropped (a key file written by ``echo`` ends in
a newline), at least ``MIN_SIGNING_KEY_BYTES`` bytes.

Acks go to ``...:acks`` (fields of :class:`Ack`), and each worker's latest state is one field
of the ``...:workers`` hash, its value a JSON :class:`WorkerState`. Versions only go up: a
worker refuses an entry whose version is not above the highest it has seen (``seen``) as a
replay, and holds its config (status ``holding``) while the stream is behind it.

Snapshots (a whole ConfigMap as one config, ``hotreload watch --snapshot NAME``) use the same
entry fields; only ``content`` differs. It is one MessagePack document, encoded
deterministically (map keys sorted, so equal maps give equal bytes, equal ``sha256`` and one
entry under compare-and-publish)::

    ["hotreload-snapshot", 1, {"KEY": <bin: the file's raw bytes>, ...}]

i.e. a 3-element array (format name, snapshot format version, key -> value map; an empty
ConfigMap is the empty map). Its first bytes are therefore always :data:`SNAPSHOT_MAGIC`
(``\x93\xb2hotreload-snapshot\x01``); ``\x93`` can never start UTF-8 text, so no text
config is mistaken for a snapshot. The marker is part of the content, hence covered by
``sha256`` and, through it, by ``sig``: an unsigned entry field could be flipped, this cannot.
A per-key subscriber rejects a snapshot entry, and a snapshot subscriber (``snapshot=True``)
rejects anything else, each with a reason saying so. :func:`encode_snapshot`,
:func:`decode_snapshot` and :func:`is_snapshot` are the only code that knows the layout.

Every entry is decoded through :func:`decode_event`: a malformed entry becomes a
``MalformedEntry`` with a precise reason (never a crash), and content that does not hash to
its ``sha256`` becomes a ``ChecksumMismatch``. An entry over ``MAX_ENTRY_BYTES`` is refused
before anything in it is decoded; a version outside ``1..MAX_VERSION`` makes its entry
malformed (:func:`parse_version` is the one rule for reading a version).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from subscriber.errors import ChecksumMismatch, MalformedEntry

__all__ = [
    "MAX_CONTENT_BYTES",
    "MAX_ENTRY_BYTES",
    "MAX_VERSION",
    "MIN_SIGNING_KEY_BYTES",
    "SCHEMA_VERSION",
    "SNAPSHOT_MAGIC",
    "Ack",
    "Event",
    "WorkerState",
    "decode_ack",
    "decode_event",
    "decode_snapshot",
    "decode_worker_state",
    "encode_ack",
    "encode_snapshot",
    "encode_worker_state",
    "is_snapshot",
    "key_id",
    "now_ms",
    "parse_version",
    "process_identity",
    "sha256_hex",
    "sign",
    "signature_message",
    "signing_key",
]

SCHEMA_VERSION = 1
# Redis stores a value of exactly 1 MiB in a 1.25 MiB allocation (measured, see docs/design.md);
# ConfigMaps cap at 1 MiB anyway, so 512 bytes of headroom keeps every value in 1 MiB.
MAX_CONTENT_BYTES = 1024 * 1024 - 512
# What a whole entry may weigh, every field name and value counted: the content plus room for
# the other fields (a key name, a host:pid, hex hashes) and a few more a newer publisher may
# add. A larger entry is malformed and refused before any of it is decoded, copied or hashed:
# whoever can XADD to the stream must not make every worker spend memory or CPU on it.
MAX_ENTRY_BYTES = MAX_CONTENT_BYTES + 16 * 1024
# Versions are integers in 0..2**53 - 1 on both sides: the publish script handles them as Lua
# numbers (doubles), exact only up to 2**53. Anything else -- 2**63, 1e17, -1, "three" -- is
# a junk version: its entry is malformed, and it never counts toward what a worker has seen.
MAX_VERSION = 2**53 - 1

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
SeenVersion = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]  # 0: none
Millis = Annotated[int, msgspec.Meta(ge=0)]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One published version of one config key (one entry of the events stream)."""

    id: str
    key: str
    version: Version
    sha256: Sha256Hex
    content: bytes
    published_at: Millis
    publisher: str
    schema: int = SCHEMA_VERSION
    sig: str = ""  # hex HMAC-SHA256 of signature_message(); "" when unsigned
    kid: str = ""  # key_id() of the key that signed it; "" when unsigned
    sensitive: bool = False  # the content is a secret: the CLI shows it only with --reveal


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's report about one event: applied (or already running it) or rejected."""

    worker: str
    version: SeenVersion
    sha256: str
    status: Literal["applied", "rejected"]
    error: str = ""
    entry_id: str = ""
    at: int = 0  # unix ms when the worker decided
    apply_ms: float = 0.0  # time spent in the callback
    published_at: int = 0  # copied from the event, so propagation time needs no second read
    unchanged: bool = False  # same hash as the running config: acknowledged without a callback


class WorkerState(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's latest state, one field of the ``:workers`` hash (JSON)."""

    worker: str
    status: Literal["starting", "applied", "rejected", "holding", "fallback", "stopped"]
    version: SeenVersion = 0  # the version running (0: none, or from the fallback file)
    sha256: str = ""
    # why the newest version was rejected (status "rejected"), or why the worker holds its
    # config (status "holding": the stream is behind what it has seen)
    error: str = ""
    rejected_version: SeenVersion = 0
    heartbeat: int = 0  # unix ms of the last heartbeat
    heartbeat_interval: float = 0.0  # seconds; stale after a few missed beats
    started_at: int = 0
    pid: int = 0
    host: str = ""
    # The highest version the worker decided (applied or rejected): versions only go up, so
    # a publisher numbers above max(version, rejected_version, seen) of every worker. Older
    # workers do not write it: 0.
    seen: SeenVersion = 0


_EVENT_FIELDS = {
    "schema",
    "key",
    "version",
    "sha256",
    "content",
    "published_at",
    "publisher",
    "sig",
    "kid",
    "sensitive",
}

# A signing key shorter than this is refused on both sides: an HMAC is only as strong as its
# key, and a short one can be guessed offline from any signed entry.
MIN_SIGNING_KEY_BYTES = 16
_SIGNATURE_CONTEXT = b"hotreload-event-v1"  # domain separation: never valid for other data
_KEY_ID_CONTEXT = b"hotreload-key-id-v1\x00"


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def signing_key(raw: bytes | str) -> bytes:
    """A signing key as the publisher and subscribers both use it, or ``ValueError``.

    Surrounding ASCII whitespace is dropped on both sides (``echo KEY > file`` and
    ``kubectl create secret --from-file`` keep a trailing newline), and what is left must be
    at least ``MIN_SIGNING_KEY_BYTES`` long. ``openssl rand -hex 32`` makes a good key.
    """
    key = (raw.encode() if isinstance(raw, str) else bytes(raw)).strip(b" \t\r\n\v\f")
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(
            f"the signing key is {len(key)} bytes, shorter than {MIN_SIGNING_KEY_BYTES} "
            "(surrounding whitespace does not count); make one with: openssl rand -hex 32"
        )
    return key


def key_id(key: bytes) -> str:
    """The public name of a signing key (16 hex digits): a one-way hash, safe to log."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).hexdigest()[:16]


def signature_message(key: str, version: int, sha256: str, published_at: int) -> bytes:
    """The bytes an event's ``sig`` is the HMAC of: its identity, one field per line.

    Key names cannot hold a newline (``keys.validate_key``) and the other parts are decimal
    or hex, so no two identities give the same message.
    """
    return b"%b\n%b\n%d\n%b\n%d" % (
        _SIGNATURE_CONTEXT,
        key.encode(),
        version,
        sha256.encode(),
        published_at,
    )


def sign(secret: bytes, key: str, version: int, sha256: str, published_at: int) -> str:
    """The ``sig`` field of an event: hex HMAC-SHA256 of :func:`signature_message`."""
    message = signature_message(key, version, sha256, published_at)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def process_identity() -> str:
    """``host:pid``: the pod name (``$HOSTNAME`` in Kubernetes) and this process."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}:{os.getpid()}"


def parse_version(raw: object) -> int | None:
    """A version as the wire writes it (decimal digits, ``0..MAX_VERSION``), else ``None``.

    The one rule for reading a version that did not come through :func:`decode_event`: a
    malformed entry's claim, a value in ``:workers``. Bounded before it is converted, so a
    10,000-digit "version" costs nothing.
    """
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw[:20]).decode("ascii", "replace") if len(raw) <= 20 else ""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        return None
    if isinstance(raw, str):
        if not (0 < len(raw) <= 20 and raw.isascii() and raw.isdigit()):
            return None
        raw = int(raw)
    return raw if 0 <= raw <= MAX_VERSION else None


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


def decode_event(
    entry_id: bytes | str,
    fields: dict[bytes, bytes] | dict[str, str] | dict[bytes | str, bytes | str],
    *,
    verify: bool = True,
) -> Event:
    """Turn one raw stream entry into an :class:`Event`, or raise ``MalformedEntry``.

    ``verify`` re-hashes the content and raises ``ChecksumMismatch`` if it does not match.
    Unknown extra fields are ignored (a newer publisher may add some); a schema newer than
    this subscriber understands is rejected so it is never half-interpreted.
    """
    eid = entry_id.decode("ascii", "replace") if isinstance(entry_id, bytes) else entry_id
    if not isinstance(fields, dict):
        raise MalformedEntry(eid, f"entry is {type(fields).__name__}, not a field map")
    size = entry_size(fields)
    if size is not None and size > MAX_ENTRY_BYTES:  # nothing of it decoded, copied or hashed
        raise MalformedEntry(
            eid,
            f"entry is {size} bytes, over the {MAX_ENTRY_BYTES} limit (content at most "
            f"{MAX_CONTENT_BYTES}); not read any further",
        )
    data: dict[str, object] = {"id": eid}
    for raw_name, raw_value in fields.items():
        name = _text(eid, "<name>", raw_name)
        if name not in _EVENT_FIELDS:
            continue
        if name == "content":
            data[name] = _content(eid, raw_value)
        elif name == "sensitive":
            # a flag: "1" is set, anything else (an older or odd writer) is not
            data[name] = _text(eid, name, raw_value) == "1"
        else:
            data[name] = _text(eid, name, raw_value)
    schema = data.get("schema")
    if schema is not None and schema != str(SCHEMA_VERSION):
        raise MalformedEntry(
            eid,
            f"schema {schema!r} is not {SCHEMA_VERSION}; upgrade the subscriber to read it",
        )
    if "version" in data:
        version = parse_version(data["version"])
        if version is None:
            raise MalformedEntry(
                eid,
                f"version {str(data['version'])[:40]!r} is not a decimal integer in "
                f"1..{MAX_VERSION}",
            )
        data["version"] = version
    try:
        event = msgspec.convert(data, Event, strict=False)
    except msgspec.ValidationError as exc:
        raise MalformedEntry(eid, str(exc)) from None
    if len(event.content) > MAX_CONTENT_BYTES:
        raise MalformedEntry(
            eid, f"content is {len(event.content)} bytes, over the {MAX_CONTENT_BYTES} limit"
        )
    if verify:
        actual = sha256_hex(event.content)
        if actual != event.sha256:
            raise ChecksumMismatch(eid, expected=event.sha256, actual=actual)
    return event


def encode_ack(ack: Ack) -> dict[str, str | int | float]:
    """Flat stream fields for an :class:`Ack` (readable with ``redis-cli XRANGE``)."""
    return {
        "worker": ack.worker,
        "version": ack.version,
        "sha256": ack.sha256,
        "status": ack.status,
        "error": ack.error,
        "entry_id": ack.entry_id,
        "at": ack.at,
        "apply_ms": round(ack.apply_ms, 3),
        "published_at": ack.published_at,
        "unchanged": int(ack.unchanged),
    }


def decode_ack(fields: dict[bytes, bytes]) -> Ack:
    """Decode an ``:acks`` entry; raises ``msgspec.ValidationError`` if it is not one."""
    data = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
    if "unchanged" in data:
        data["unchanged"] = "true" if data["unchanged"] == "1" else "false"
    return msgspec.convert(data, Ack, strict=False)


_worker_encoder = msgspec.json.Encoder()
_worker_decoder = msgspec.json.Decoder(WorkerState)


def encode_worker_state(state: WorkerState) -> bytes:
    return _worker_encoder.encode(state)


def decode_worker_state(raw: bytes) -> WorkerState:
    """Decode a ``:workers`` hash value; raises ``msgspec.DecodeError`` if it is not one."""
    return _worker_decoder.decode(raw)


# -- snapshots: a whole ConfigMap (key -> raw bytes) as one content ---------------------------

SNAPSHOT_FORMAT = "hotreload-snapshot"
SNAPSHOT_VERSION = 1
_snapshot_encoder = msgspec.msgpack.Encoder(order="sorted")
# array of 3, str of 18 "hotreload-snapshot", int 1: how every encode_snapshot() output begins
SNAPSHOT_MAGIC = b"\x93\xb2hotreload-snapshot\x01"
_snapshot_decoder = msgspec.msgpack.Decoder(tuple[str, int, dict[str, bytes]])


def encode_snapshot(files: Mapping[str, bytes]) -> bytes:
    """The content of a snapshot entry for ``files`` (key -> raw bytes); deterministic."""
    return _snapshot_encoder.encode((SNAPSHOT_FORMAT, SNAPSHOT_VERSION, dict(files)))


def is_snapshot(content: bytes) -> bool:
    """Whether ``content`` is a snapshot (starts with :data:`SNAPSHOT_MAGIC`)."""
    return content.startswith(SNAPSHOT_MAGIC)


def decode_snapshot(content: bytes) -> dict[str, bytes]:
    """The key -> raw bytes map of a snapshot content, or ``ValueError`` with the reason."""
    if not is_snapshot(content):
        raise ValueError(
            "the entry is a single config file, not a snapshot (a whole ConfigMap published "
            "with `hotreload watch --snapshot NAME`); subscribe to it without snapshot=True"
        )
    try:
        name, version, files = _snapshot_decoder.decode(content)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed snapshot content: {exc}") from None
    if (name, version) != (SNAPSHOT_FORMAT, SNAPSHOT_VERSION):  # pragma: no cover - magic
        raise ValueError(f"snapshot format {name!r} version {version} is not understood")
    return files
