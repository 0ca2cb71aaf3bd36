"""The wire contract between the publisher and every subscriber.

One stream entry per published version, under ``hotreload:{KEY}:events``. Its fields are flat
so ``redis-cli XRANGE`` shows them readably:

========== ===================================================================
field      value
========== ===================================================================
schema     wire version, ``1``; a subscriber rejects a schema it does not know
key        the config key (the ConfigMap key, e.g. ``app.yaml``)
version    decimal integer >= 1, per key, never goes backwards
sha256     lowercase hex SHA-256 of ``content``
content    the raw bytes of the file (at most ``MAX_CONTENT_BYTES``)
published_at  unix time in milliseconds
publisher  ``host:pid`` of the daemon that published it
========== ===================================================================

Acks go to ``...:acks`` (fields of :class:`Ack`), and each worker's latest state is one field
of the ``...:workers`` hash, its value a JSON :class:`WorkerState`.

Every entry is decoded through :func:`decode_event`: a malformed entry becomes a
``MalformedEntry`` with a precise reason (never a crash), and content that does not hash to
its ``sha256`` becomes a ``ChecksumMismatch``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Annotated, Literal

import msgspec

from subscriber.errors import ChecksumMismatch, MalformedEntry

__all__ = [
    "ACK_HISTORY",
    "MAX_CONTENT_BYTES",
    "SCHEMA_VERSION",
    "Ack",
    "Event",
    "WorkerState",
    "decode_ack",
    "decode_event",
    "decode_worker_state",
    "encode_ack",
    "encode_worker_state",
    "now_ms",
    "process_identity",
    "sha256_hex",
]

SCHEMA_VERSION = 1
# Redis stores a value of exactly 1 MiB in a 1.25 MiB allocation (measured, see DESIGN.md);
# ConfigMaps cap at 1 MiB anyway, so 512 bytes of headroom keeps every value in 1 MiB.
MAX_CONTENT_BYTES = 1024 * 1024 - 512
ACK_HISTORY = 1000  # approximate length the :acks stream is trimmed to

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Version = Annotated[int, msgspec.Meta(ge=1)]
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


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's report about one event: applied (or already running it) or rejected."""

    worker: str
    version: int
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
    status: Literal["starting", "applied", "rejected", "fallback", "stopped"]
    version: int = 0  # the version running (0: none, or from the fallback file)
    sha256: str = ""
    error: str = ""  # why the newest version was rejected (status "rejected")
    rejected_version: int = 0
    heartbeat: int = 0  # unix ms of the last heartbeat
    heartbeat_interval: float = 0.0  # seconds; stale after a few missed beats
    started_at: int = 0
    pid: int = 0
    host: str = ""


_EVENT_FIELDS = {"schema", "key", "version", "sha256", "content", "published_at", "publisher"}


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def process_identity() -> str:
    """``host:pid``: the pod name (``$HOSTNAME`` in Kubernetes) and this process."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}:{os.getpid()}"


def _text(entry_id: str, name: str, raw: object) -> str:
    if not isinstance(raw, bytes | str):
        raise MalformedEntry(entry_id, f"field {name!r} is {type(raw).__name__}, not a string")
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEntry(entry_id, f"field {name!r} is not UTF-8 ({exc.reason})") from None


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
    data: dict[str, object] = {"id": eid}
    for raw_name, raw_value in fields.items():
        name = _text(eid, "<name>", raw_name)
        if name not in _EVENT_FIELDS:
            continue
        if name == "content":
            data[name] = raw_value.encode() if isinstance(raw_value, str) else raw_value
        else:
            data[name] = _text(eid, name, raw_value)
    schema = data.get("schema")
    if schema is not None and schema != str(SCHEMA_VERSION):
        raise MalformedEntry(
            eid,
            f"schema {schema!r} is not {SCHEMA_VERSION}; upgrade the subscriber to read it",
        )
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
