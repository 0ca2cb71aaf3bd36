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
audience   optional, only on canary entries (then ``schema`` is ``2``): a JSON array of
           the worker ids (``:workers`` field names) the entry is for, e.g.
           ``["pod-a:12"]`` (:func:`encode_audience`). Absent: for everyone.
rollout    optional: ``canary``, ``promote``, ``halt`` or ``rollback`` (what the entry
           is in a rollout; absent on a normal publish). Any other value is kept as
           text, for display.
rollout_of optional: the version the entry is about -- promote: the canary version
           promoted; halt: the canary version halted; rollback: the version rolled
           back from. Absent (0) on a canary.
rollout_sha256  optional: the SHA-256 of version ``rollout_of``'s content, so a
           publisher honours a pin or a halt without reading that entry.
request    optional: the id of the ``:control`` request the entry carries out.
========== ===================================================================

Rollout entries: only a canary names an ``audience``. A worker not in it never sees the entry
(no callback, no ack, not counted in ``seen``); one starting later walks past it to the newest
entry meant for it, the stable version. A canary has ``schema`` ``2``, which subscribers older
than rollout control reject as malformed, so an old worker never runs a canary. Promote, halt
and rollback entries are for everyone and stay schema ``1`` (an old subscriber applying them
is right). ``rollout*`` and ``request`` are labels no worker acts on: an unreadable
``rollout_of``/``rollout_sha256`` reads as absent. ``audience`` without schema ``2``, or
schema ``2`` without it, is malformed.

A subscriber given signing keys accepts only entries whose ``sig`` verifies (compared in
constant time) with the key named by ``kid``; one without keys ignores ``sig`` and ``kid``.
The signature covers the identity, not the content itself: the content is bound to it by
``sha256``, which every subscriber re-hashes. An entry with an ``audience`` is signed over a
v2 message that adds ``rollout`` and the exact text of ``audience``, so an audience stripped
or changed in Redis makes the signature fail (the entry is rejected as forged); every other
entry over the v1 message, byte for byte as before. Signing keys are used as
:func:`signing_key` normalizes them: surrounding ASCII whitespace dropped (a key file written
by ``echo`` ends in a newline), at least ``MIN_SIGNING_KEY_BYTES`` bytes.

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
:func:`decode_snapshot` and :func:`is_snapshot` (in ``_snapshot``, re-exported here) are the
only code that knows the layout; the signing rules live in ``_signing`` (re-exported too).

Every entry is decoded through :func:`decode_event`: a malformed entry becomes a
``MalformedEntry`` with a precise reason (never a crash), and content that does not hash to
its ``sha256`` becomes a ``ChecksumMismatch``. An entry over ``MAX_ENTRY_BYTES`` is refused
before anything in it is decoded; a version outside ``1..MAX_VERSION`` makes its entry
malformed (:func:`parse_version` is the one rule for reading a version).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from subscriber._fields import field_map
from subscriber._signing import (
    MIN_SIGNING_KEY_BYTES,
    key_id,
    sign,
    signature_message,
    signing_key,
)
from subscriber._snapshot import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    decode_snapshot,
    encode_snapshot,
    is_snapshot,
)
from subscriber.errors import ChecksumMismatch, MalformedEntry

__all__ = [
    "AUDIENCE_SCHEMA",
    "MAX_AUDIENCE",
    "MAX_CONTENT_BYTES",
    "MAX_ENTRY_BYTES",
    "MAX_VERSION",
    "MIN_SIGNING_KEY_BYTES",
    "SCHEMA_VERSION",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "Ack",
    "Event",
    "WorkerState",
    "decode_ack",
    "decode_audience",
    "decode_event",
    "decode_snapshot",
    "decode_worker_state",
    "encode_ack",
    "encode_audience",
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

SCHEMA_VERSION = 1  # every entry without an audience: unchanged since the first release
AUDIENCE_SCHEMA = 2  # an entry with an audience (a canary): older subscribers refuse it
# A canary goes to a few workers, or a percentage of a Deployment's; 10,000 ids (about 250 KB
# of JSON) is far beyond any real audience and keeps a hostile one from costing much to parse.
MAX_AUDIENCE = 10_000
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
    # Rollout control. ``audience``: the worker ids a canary entry is for (None: everyone);
    # ``audience_json`` the field's exact text, which the v2 signature covers.
    audience: tuple[str, ...] | None = None
    audience_json: str = ""
    rollout: str = ""  # canary, promote, halt, rollback (any other text: display only)
    rollout_of: SeenVersion = 0  # the version a promote/halt/rollback is about
    rollout_sha256: str = ""  # the content hash of version rollout_of
    request: str = ""  # the :control request this entry carries out

    def is_for(self, worker: str) -> bool:
        """Whether ``worker`` is meant to see this entry (everyone, without an audience)."""
        return self.audience is None or worker in self.audience


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
    # The worker honours audience entries (rollout control), so it may be made a canary.
    # Workers older than rollout control do not write it: False, never chosen.
    audience: bool = False
    # The worker writes max(version, rejected_version, seen) to the key's ``:floor`` sorted
    # set (``ZADD GT``) with every state, so the publish script reads the workers' floor
    # there. Older workers do not: False, and while any row says so the daemon passes the
    # floor it read from ``:workers`` (publisher/_earlyfloor.py).
    floor: bool = False


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
    "audience",
    "rollout",
    "rollout_of",
    "rollout_sha256",
    "request",
}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_audience_decoder = msgspec.json.Decoder(
    Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=MAX_AUDIENCE)
    ]
)


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def encode_audience(workers: Iterable[str]) -> str:
    """The ``audience`` field for ``workers``: compact JSON, sorted, each id once.

    ``ValueError`` for an empty audience (nobody: publish to everyone, or not at all), an
    empty id or more than ``MAX_AUDIENCE`` ids.
    """
    ids = sorted(set(workers))
    if not ids:
        raise ValueError("an audience names at least one worker")
    if len(ids) > MAX_AUDIENCE:
        raise ValueError(f"an audience names at most {MAX_AUDIENCE} workers, not {len(ids)}")
    if not all(isinstance(worker, str) and worker for worker in ids):
        raise ValueError("a worker id in an audience is a non-empty string")
    return msgspec.json.encode(ids).decode()


def decode_audience(text: str) -> tuple[str, ...]:
    """The worker ids of an ``audience`` field, or ``ValueError`` saying what is wrong."""
    try:
        ids = _audience_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(
            f"audience is not a JSON array of 1..{MAX_AUDIENCE} non-empty worker ids ({exc})"
        ) from None
    if not ids:
        raise ValueError("audience is an empty array (an entry for nobody)")
    return tuple(ids)


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
    # the fields named in _EVENT_FIELDS, decoded; an entry over MAX_ENTRY_BYTES is refused
    # before anything of it is decoded, copied or hashed (subscriber/_fields.py)
    data = field_map(eid, fields, _EVENT_FIELDS, MAX_ENTRY_BYTES, MAX_CONTENT_BYTES)
    schema = data.get("schema")
    if schema is not None and schema not in _SCHEMAS:
        raise MalformedEntry(
            eid,
            f"schema {str(schema)[:40]!r} is not {SCHEMA_VERSION} or {AUDIENCE_SCHEMA}; "
            "upgrade the subscriber to read it",
        )
    _rollout_fields(eid, data)
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


_SCHEMAS = {str(SCHEMA_VERSION), str(AUDIENCE_SCHEMA)}


def _rollout_fields(eid: str, data: dict[str, object]) -> None:
    """Check the audience against the schema; read the unsigned labels leniently."""
    audience = data.get("audience")
    has_schema_2 = data.get("schema") == str(AUDIENCE_SCHEMA)
    if audience is None:
        if has_schema_2:
            raise MalformedEntry(eid, f"schema {AUDIENCE_SCHEMA} entry without an audience")
    else:
        if not has_schema_2:
            # an older subscriber would take it for an entry for everyone
            raise MalformedEntry(eid, f"an entry with an audience has schema {AUDIENCE_SCHEMA}")
        text = str(audience)
        try:
            data["audience"] = decode_audience(text)
        except ValueError as exc:
            raise MalformedEntry(eid, str(exc)) from None
        data["audience_json"] = text
    if "rollout_of" in data:
        data["rollout_of"] = parse_version(data["rollout_of"]) or 0
    if "rollout_sha256" in data and not _SHA256_HEX.fullmatch(str(data["rollout_sha256"])):
        data["rollout_sha256"] = ""


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
