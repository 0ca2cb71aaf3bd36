"""The events and acks streams of a key, read for ``history``, ``show``, ``diff`` and ``wait``.

An entry that does not decode (or whose content does not hash to its ``sha256``) becomes a
:class:`RawEntry` carrying its fields and the reason, never an exception: an operator inspects
a broken system precisely when it is broken, and ``history`` shows such entries as rows.

Content of a key marked sensitive (its entry, or the newest one, carries ``sensitive=1``: a
Secret) is only handed out by :func:`find_event` with ``reveal=True``; otherwise it raises
:class:`SensitiveContent`. ``history`` shows hashes and sizes only, sensitive or not.

The newest version is the entry with the HIGHEST version, never simply the last appended:
anyone who can write the stream can append a copy of an old entry (a replay) or junk, and a
Redis restored from an older backup ends on an older entry. With a signing key (the CLI's
``--signing-key-file``) only entries whose signature verifies count; ``history`` marks the
others. Finding the highest reads the stream newest first, at most ``SCAN_CAP`` entries.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import msgspec

from subscriber._reasons import MAX_ERROR_CHARS
from subscriber._replybudget import reply_budget
from subscriber._replycap import Dropped
from subscriber.defaults import ACK_HISTORY, HISTORY_READ_CAP
from subscriber.errors import ChecksumMismatch, HotReloadError, MalformedEntry
from subscriber.keys import StreamKeys, stream_keys, validate_key
from subscriber.protocol import (
    Ack,
    Event,
    decode_ack,
    decode_event,
    decode_snapshot,
    is_snapshot,
    key_id,
    sign,
)

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = [
    "ACK_REPLY_BUDGET",
    "MAX_ACKS",
    "HistoryRow",
    "MalformedVersion",
    "NotFound",
    "RawEntry",
    "SensitiveContent",
    "ack_matches",
    "acks_after",
    "decoded_ack",
    "find_event",
    "highest",
    "history",
    "list_keys",
    "newest_first",
    "require_stream",
    "verified",
]

_MAX_PAGE = 16  # events per XREVRANGE while walking back: each may hold up to 1 MiB
_FIRST_PAGE_CAP = 1000  # `history --limit N` reads N at once, up to this many
SCAN_CAP = HISTORY_READ_CAP  # entries read, at most, looking for the highest version or a given one
# acks read, at most, newest first: subscribers keep ~ACK_HISTORY of them (approximate
# trimming), and anyone who can write Redis can XADD without MAXLEN (440k acks read whole took
# the daemon to 600-800 MiB and `status` to 16 s)
MAX_ACKS = 2 * ACK_HISTORY
# What one reply of acks may keep (subscriber._replybudget): an ack is ~300 bytes, ~3.4 KiB
# at most with its error text cut to MAX_ERROR_CHARS (2,000 ASCII characters) and the 64-byte
# charge for each of its 21 bulk strings; 8 KiB each (room for a non-ASCII error) for a page
# of MAX_ACKS is 16 MiB. A writer's 2,000 acks of ~1 MiB each (a ~2 GB reply) cost that much.
ACK_REPLY_BUDGET = MAX_ACKS * 8 * 1024
_ACK_ERROR_KEPT = 2 * MAX_ERROR_CHARS  # a worker cuts its error text to MAX_ERROR_CHARS
_ACK_PAGE = 500


class NotFound(HotReloadError):
    """The key has no events stream, or the version asked for is not (usably) in it."""


class MalformedVersion(NotFound):
    """The version asked for is in the history, but its entry is malformed."""


class SensitiveContent(HotReloadError):
    """The content asked for is a secret and ``reveal`` was not given."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"{key} is sensitive (a Secret mount, or `hotreload watch --sensitive {key}`): "
            "its content is not shown without --reveal"
        )


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One entry of a key's events stream, with how many workers applied / rejected it.

    A malformed entry keeps whatever fields could be read (``version`` may be ``None``) and
    says why in ``malformed``. The counts are distinct workers found in ``:acks``, which is
    trimmed to about 1000 entries, so very old versions may show fewer than really acked.
    """

    entry_id: str
    version: int | None
    sha256: str
    size: int | None
    published_at_ms: int | None
    publisher: str
    applied: int = 0
    rejected: int = 0
    malformed: str = ""
    kid: str = ""  # id of the key that signed it; "" unsigned
    sensitive: bool = False
    snapshot_keys: int | None = None  # a snapshot (a whole ConfigMap): how many keys
    # with a signing key: whether its signature verifies with it; None: no key given
    verified: bool | None = None
    # rollout control: canary / promote / halt / rollback ("" a normal publish), the version
    # it is about, and a canary's audience
    rollout: str = ""
    rollout_of: int = 0
    audience: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RawEntry:
    """An entry that did not decode: its raw fields, and why it is malformed."""

    entry_id: str
    reason: str
    fields: Mapping[bytes, bytes]

    def text(self, name: str) -> str:
        return self.fields.get(name.encode(), b"").decode("utf-8", "replace")

    def number(self, name: str) -> int | None:
        try:
            return int(self.text(name))
        except ValueError:
            return None


# The client is made with decode_responses=False, so every reply is bytes; redis-py's stubs
# cannot know that, hence these casts (and convergence's ``_hgetall``).
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _xrevrange(client: AnyRedis, key: str, *, high: str, count: int) -> _Entries:
    return cast(_Entries, client.xrevrange(key, max=high, min="-", count=count))


def _decode(raw_id: bytes, fields: dict[bytes, bytes]) -> Event | RawEntry:
    try:
        return decode_event(raw_id, fields, verify=True)
    except ChecksumMismatch as exc:
        # the claimed hash is the row's sha256 already: say what is wrong in a line
        reason = (
            f"content hashes to {exc.actual[:12]}..., not to its sha256 {exc.expected[:12]}...: "
            "the entry is corrupt or forged"
        )
        return RawEntry(exc.entry_id, reason, fields)
    except MalformedEntry as exc:
        return RawEntry(exc.entry_id, exc.reason, fields)


def newest_first(
    client: AnyRedis, events_key: str, *, first_page: int = 1
) -> Iterator[Event | RawEntry]:
    """Every entry, newest first, read in growing pages.

    Callers usually want only the first few and an entry can hold 1 MiB, so nothing is read
    far ahead of what is consumed.
    """
    upper, count = "+", first_page
    while True:
        page = _xrevrange(client, events_key, high=upper, count=count)
        for raw_id, fields in page:
            yield _decode(raw_id, fields)
        if len(page) < count:
            return
        upper = "(" + page[-1][0].decode()
        count = max(count, min(count * 2, _MAX_PAGE))


def require_stream(client: AnyRedis, key: str, keys: StreamKeys, prefix: str) -> None:
    if client.exists(keys.events):
        return
    known = [k for k in list_keys(client, prefix) if client.exists(stream_keys(k, prefix).events)]
    hint = f"published keys: {', '.join(known[:8])}" if known else "nothing is published there"
    raise NotFound(f"unknown key {key!r}: no {keys.events} stream under prefix {prefix!r} ({hint})")


def verified(event: Event, secret: bytes) -> bool:
    """Whether ``event`` is signed with ``secret`` (normalized, as subscribers hold it)."""
    if not event.sig or (event.kid and event.kid != key_id(secret)):
        return False
    expected = sign(
        secret,
        event.key,
        event.version,
        event.sha256,
        event.published_at,
        audience_json=event.audience_json if event.audience is not None else None,
        rollout=event.rollout,
    )
    return hmac.compare_digest(expected.encode(), event.sig.encode())


def _counts(event: Event, signing_key: bytes | None) -> bool:
    return signing_key is None or verified(event, signing_key)


def highest(client: AnyRedis, events_key: str, signing_key: bytes | None = None) -> Event | None:
    """The well-formed (and, with ``signing_key``, verified) entry with the highest version
    among the newest ``SCAN_CAP``; of equal versions the last appended. ``None``: none."""
    best: Event | None = None
    for read, entry in enumerate(newest_first(client, events_key)):
        if read >= SCAN_CAP:
            break
        if isinstance(entry, RawEntry) or not _counts(entry, signing_key):
            continue
        if best is None or entry.version > best.version:
            best = entry
    return best


def find_event(
    client: AnyRedis,
    key: str,
    version: int | None = None,
    *,
    prefix: str,
    reveal: bool = True,
    signing_key: bytes | None = None,
) -> Event:
    """The verified event of ``version`` (default: the newest, i.e. highest, well-formed one).

    With ``signing_key``, entries whose signature does not verify with it do not count.
    Raises ``NotFound`` for an unknown key, a version not in the (bounded) history, or a
    version whose entry is malformed (its reason is in the message). Without ``reveal``,
    raises ``SensitiveContent`` when that entry or the newest one is marked sensitive (a key
    marked later was most likely a secret before, too).
    """
    keys = stream_keys(key, prefix)
    require_stream(client, key, keys, prefix)
    newest = highest(client, keys.events, signing_key)
    if newest is None:
        what = "verified" if signing_key is not None else "well-formed"
        raise NotFound(f"{key} has no {what} version in {keys.events}")
    if version is None or version == newest.version:
        if not reveal and newest.sensitive:
            raise SensitiveContent(key)
        return newest
    malformed = ""
    # a replayed copy may sit anywhere: look through the whole (bounded) history
    for read, entry in enumerate(newest_first(client, keys.events)):
        if read >= SCAN_CAP:
            break
        if isinstance(entry, RawEntry):
            if entry.number("version") == version:
                malformed = entry.reason
            continue
        if entry.version == version and _counts(entry, signing_key):
            if not reveal and (entry.sensitive or newest.sensitive):
                raise SensitiveContent(key)
            return entry
    if malformed:
        raise MalformedVersion(f"{key} v{version} is malformed: {malformed}")
    raise NotFound(f"{key} has no version {version} in its history (newest is v{newest.version})")


# ---------------------------------------------------------------------------- acks


def acks_after(
    client: AnyRedis, acks_key: str, after: str = "-", *, limit: int = MAX_ACKS
) -> tuple[list[Ack], str]:
    """Decodable acks after entry id ``after`` (exclusive unless ``-``), oldest first, and the
    newest id read: the newest ``limit`` of them at most, read newest first (``XREVRANGE
    COUNT``), so no writer flooding ``:acks`` makes a reader take them all."""
    entries = newest_acks(client, acks_key, after, limit=limit)
    last = entries[0][0].decode() if entries else after
    decoded = [a for _, f in reversed(entries) if (a := decoded_ack(f)) is not None]
    return decoded, last


def newest_acks(
    client: AnyRedis, acks_key: str, after: str = "-", *, limit: int = MAX_ACKS
) -> _Entries:
    """The raw entries of ``acks_key`` after ``after``, newest first, ``limit`` at most."""
    low = after if after == "-" else f"({after}"
    entries: _Entries = []
    high = "+"
    while len(entries) < limit:
        count = min(_ACK_PAGE, limit - len(entries))
        with reply_budget(ACK_REPLY_BUDGET):  # acks past it read as junk (decoded_ack)
            page = cast(_Entries, client.xrevrange(acks_key, max=high, min=low, count=count))
        entries += page
        if len(page) < count:
            break
        high = "(" + page[-1][0].decode()
    return entries


def decoded_ack(fields: dict[bytes, bytes]) -> Ack | None:
    """The ack, or ``None`` when it is not one we can read (history counts and wait ignore
    it, the daemon too): so is one whose field the reply budget dropped (a field over the
    reply cap reads as its ``Oversized`` note: a rejection's error shows its size). An error
    longer than a worker writes is cut."""
    if any(isinstance(v, Dropped) for item in fields.items() for v in item):
        return None
    try:
        ack = decode_ack(fields)
    except (msgspec.ValidationError, UnicodeDecodeError, AttributeError):
        return None
    if len(ack.error) > _ACK_ERROR_KEPT:  # a reader keeps acks: never a writer's megabyte
        ack = msgspec.structs.replace(ack, error=ack.error[:_ACK_ERROR_KEPT] + "... (cut)")
    return ack


def ack_matches(ack: Ack, version: int, sha256: str) -> bool:
    # the hash guards against a stream that was reset and numbered the same version anew
    return ack.version == version and (not ack.sha256 or ack.sha256 == sha256)


def history(
    client: AnyRedis,
    key: str,
    *,
    prefix: str,
    limit: int,
    signing_key: bytes | None = None,
) -> tuple[HistoryRow, ...]:
    """The newest ``limit`` entries, newest first, with distinct applied / rejected workers;
    with ``signing_key``, each row says whether its signature verifies with it."""
    keys = stream_keys(key, prefix)
    require_stream(client, key, keys, prefix)
    acks, _ = acks_after(client, keys.acks)
    rows: list[HistoryRow] = []
    # The first page is the whole request, but at most _FIRST_PAGE_CAP entries: Redis refuses
    # a COUNT beyond a 64-bit integer ("value is not an integer or out of range"), which made
    # `history --limit 99999999999999999999` fail as a Redis error (exit 3) instead of showing
    # the whole history (found by tests/test_fuzz.py). Later pages keep that size.
    for entry in newest_first(client, keys.events, first_page=min(limit, _FIRST_PAGE_CAP)):
        if len(rows) >= limit:
            break
        if isinstance(entry, RawEntry):
            content = entry.fields.get(b"content")
            rows.append(
                HistoryRow(
                    entry_id=entry.entry_id,
                    version=entry.number("version"),
                    sha256=entry.text("sha256"),
                    size=len(content) if content is not None else None,
                    published_at_ms=entry.number("published_at"),
                    publisher=entry.text("publisher"),
                    malformed=entry.reason,
                    kid=entry.text("kid")[:64],
                    sensitive=entry.text("sensitive") == "1",
                    verified=False if signing_key is not None else None,
                )
            )
            continue
        mine = [a for a in acks if ack_matches(a, entry.version, entry.sha256)]
        rows.append(
            HistoryRow(
                entry_id=entry.id,
                version=entry.version,
                sha256=entry.sha256,
                size=len(entry.content),
                published_at_ms=entry.published_at,
                publisher=entry.publisher,
                applied=len({a.worker for a in mine if a.status == "applied"}),
                rejected=len({a.worker for a in mine if a.status == "rejected"}),
                kid=entry.kid if entry.sig else "",
                sensitive=entry.sensitive,
                snapshot_keys=_snapshot_keys(entry.content),
                verified=verified(entry, signing_key) if signing_key is not None else None,
                rollout=entry.rollout[:40],
                rollout_of=entry.rollout_of,
                audience=entry.audience,
            )
        )
    return tuple(rows)


def _snapshot_keys(content: bytes) -> int | None:
    """How many keys a snapshot content holds (key names only: nothing sensitive)."""
    if not is_snapshot(content):
        return None
    try:
        return len(decode_snapshot(content))
    except ValueError:
        return None


def list_keys(client: AnyRedis, prefix: str) -> tuple[str, ...]:
    """Config keys with any stream or hash under ``prefix`` (``{prefix}:{KEY}:...``), sorted."""
    stream_keys("probe", prefix)  # validates the prefix (keys.py has no public check of its own)
    head = prefix + ":{"
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in head) + "*}:*"
    found = set()
    for raw in client.scan_iter(match=pattern, count=1000):
        name, _, suffix = raw.decode("utf-8", "replace")[len(head) :].rpartition("}:")
        if suffix in {"events", "acks", "workers"}:
            try:
                found.add(validate_key(name))
            except HotReloadError:
                continue  # not one of ours (a key hotreload could never have written)
    return tuple(sorted(found))
