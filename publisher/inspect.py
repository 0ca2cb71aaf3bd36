"""Read-only queries behind ``hotreload history / show / diff / status / wait``.

Everything here returns frozen value objects and prints nothing; ``publisher.cli`` formats.
Malformed stream entries and worker states become rows that say what is wrong with them,
never exceptions: an operator inspects a broken system precisely when it is broken.

Two rules decide what the operator sees, each in one function:

- :func:`liveness`: a worker is *live* while its last heartbeat is at most
  ``STALE_AFTER_BEATS`` heartbeat intervals old (intervals under 1 s count as 1 s), *stale*
  after that (SIGKILLed, frozen or partitioned: it runs no exit hook), and *gone* once it
  reported ``stopped``. Only live workers count for convergence.
- :func:`assess`: for one key and one target version, which live workers run it (same version
  and same sha256), which rejected it (their state says so, or an ``:acks`` entry does), and
  which are behind. ``wait`` polls it; ``status`` shows it for the newest version.

Content of a key marked sensitive (its entry, or the newest one, carries ``sensitive=1``: a
Secret) is only handed out by :func:`find_event` with ``reveal=True``; otherwise it raises
:class:`SensitiveContent`. ``history`` shows hashes and sizes only, sensitive or not.

Every function takes a standalone client or redis-py's ``RedisCluster``
(``publisher._admin.connect_any``): one key's commands go to its slot's node (the ``{KEY}``
hash tag), :func:`list_keys` scans every master, and no transaction spans two keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import msgspec

from subscriber.defaults import MIN_HEARTBEAT_INTERVAL, STALE_AFTER_BEATS
from subscriber.errors import ChecksumMismatch, HotReloadError, MalformedEntry
from subscriber.keys import StreamKeys, stream_keys, validate_key
from subscriber.protocol import (
    Ack,
    Event,
    WorkerState,
    decode_ack,
    decode_event,
    decode_snapshot,
    decode_worker_state,
    is_snapshot,
)

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = [
    "STALE_AFTER_BEATS",
    "Convergence",
    "ConvergenceState",
    "HistoryRow",
    "Liveness",
    "NotFound",
    "Rejection",
    "SensitiveContent",
    "StatusReport",
    "Target",
    "WaitResult",
    "WorkerRow",
    "assess",
    "find_event",
    "history",
    "list_keys",
    "liveness",
    "status",
    "wait_for",
]

_MAX_PAGE = 16  # events per XREVRANGE while walking back: each may hold up to 1 MiB
_FIRST_PAGE_CAP = 1000  # `history --limit N` reads N at once, up to this many

Liveness = Literal["live", "stale", "gone"]
ConvergenceState = Literal["converged", "behind", "rejected", "no-live-workers", "unpublished"]


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


# ---------------------------------------------------------------------------- liveness


def liveness(state: WorkerState, now_ms: int) -> Liveness:
    """Live, stale or gone: the one rule for which workers count (see the module docstring)."""
    if state.status == "stopped":
        return "gone"
    interval_ms = max(state.heartbeat_interval, MIN_HEARTBEAT_INTERVAL) * 1000
    return "live" if now_ms - state.heartbeat <= STALE_AFTER_BEATS * interval_ms else "stale"


def _server_now_ms(client: AnyRedis) -> int:
    # Redis' clock, not ours: the CLI may run on a laptop through a port-forward whose clock
    # is off, while workers and their Redis share a node (or an NTP-synced cluster).
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# ---------------------------------------------------------------------------- events


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


@dataclass(frozen=True, slots=True)
class _Malformed:
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
# cannot know that, hence these casts in one place.
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _xrange(client: AnyRedis, key: str, *, low: str, high: str = "+") -> _Entries:
    return cast(_Entries, client.xrange(key, min=low, max=high))


def _xrevrange(client: AnyRedis, key: str, *, high: str, count: int) -> _Entries:
    return cast(_Entries, client.xrevrange(key, max=high, min="-", count=count))


def _hgetall(client: AnyRedis, key: str) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], client.hgetall(key))


def _decode(raw_id: bytes, fields: dict[bytes, bytes]) -> Event | _Malformed:
    try:
        return decode_event(raw_id, fields, verify=True)
    except ChecksumMismatch as exc:
        # the claimed hash is the row's sha256 already: say what is wrong in a line
        reason = (
            f"content hashes to {exc.actual[:12]}..., not to its sha256 {exc.expected[:12]}...: "
            "the entry is corrupt or forged"
        )
        return _Malformed(exc.entry_id, reason, fields)
    except MalformedEntry as exc:
        return _Malformed(exc.entry_id, exc.reason, fields)


def _newest_first(
    client: AnyRedis, events_key: str, *, first_page: int = 1
) -> Iterator[Event | _Malformed]:
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


def _require_stream(client: AnyRedis, key: str, keys: StreamKeys, prefix: str) -> None:
    if client.exists(keys.events):
        return
    known = [k for k in list_keys(client, prefix) if client.exists(stream_keys(k, prefix).events)]
    hint = f"published keys: {', '.join(known[:8])}" if known else "nothing is published there"
    raise NotFound(f"unknown key {key!r}: no {keys.events} stream under prefix {prefix!r} ({hint})")


def find_event(
    client: AnyRedis,
    key: str,
    version: int | None = None,
    *,
    prefix: str,
    reveal: bool = True,
) -> Event:
    """The verified event of ``version`` (default: the newest well-formed one).

    Raises ``NotFound`` for an unknown key, a version not in the (bounded) history, or a
    version whose entry is malformed (its reason is in the message). Without ``reveal``,
    raises ``SensitiveContent`` when that entry or the newest one is marked sensitive (a key
    marked later was most likely a secret before, too).
    """
    keys = stream_keys(key, prefix)
    _require_stream(client, key, keys, prefix)
    newest: int | None = None
    newest_sensitive = False
    for entry in _newest_first(client, keys.events):
        if isinstance(entry, _Malformed):
            if version is not None and entry.number("version") == version:
                raise MalformedVersion(f"{key} v{version} is malformed: {entry.reason}")
            continue
        if newest is None:
            newest, newest_sensitive = entry.version, entry.sensitive
        if version is None or entry.version == version:
            if not reveal and (entry.sensitive or newest_sensitive):
                raise SensitiveContent(key)
            return entry
        if entry.version < version:
            break  # versions only grow along the stream: it is not further back either
    if newest is None:
        raise NotFound(f"{key} has no well-formed version in {keys.events}")
    raise NotFound(f"{key} has no version {version} in its history (newest is v{newest})")


# ---------------------------------------------------------------------------- acks


def _acks(client: AnyRedis, acks_key: str, after: str = "-") -> tuple[list[Ack], str]:
    """Decodable acks after entry id ``after`` (exclusive unless ``-``), and the last id read."""
    decoded: list[Ack] = []
    last = after
    for raw_id, fields in _xrange(client, acks_key, low=after if after == "-" else f"({after}"):
        last = raw_id.decode()
        try:
            decoded.append(decode_ack(fields))
        except (msgspec.ValidationError, UnicodeDecodeError, AttributeError):
            continue  # not an ack we can read; history counts and wait ignore it
    return decoded, last


def _acks_for(ack: Ack, version: int, sha256: str) -> bool:
    # the hash guards against a stream that was reset and numbered the same version anew
    return ack.version == version and (not ack.sha256 or ack.sha256 == sha256)


def history(client: AnyRedis, key: str, *, prefix: str, limit: int) -> tuple[HistoryRow, ...]:
    """The newest ``limit`` entries, newest first, with distinct applied / rejected workers."""
    keys = stream_keys(key, prefix)
    _require_stream(client, key, keys, prefix)
    acks, _ = _acks(client, keys.acks)
    rows: list[HistoryRow] = []
    # The first page is the whole request, but at most _FIRST_PAGE_CAP entries: Redis refuses
    # a COUNT beyond a 64-bit integer ("value is not an integer or out of range"), which made
    # `history --limit 99999999999999999999` fail as a Redis error (exit 3) instead of showing
    # the whole history (found by tests/test_fuzz.py). Later pages keep that size.
    for entry in _newest_first(client, keys.events, first_page=min(limit, _FIRST_PAGE_CAP)):
        if len(rows) >= limit:
            break
        if isinstance(entry, _Malformed):
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
                )
            )
            continue
        mine = [a for a in acks if _acks_for(a, entry.version, entry.sha256)]
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


# ---------------------------------------------------------------------------- workers


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One field of a key's ``:workers`` hash as the operator sees it.

    ``status`` is the worker's own (starting / applied / rejected / fallback / stopped), or
    ``invalid`` when the hash value is not a ``WorkerState`` (``error`` then says why).
    ``heartbeat_age_s`` is ``None`` when the worker never sent one.
    """

    key: str
    worker: str
    status: str
    version: int
    sha256: str
    error: str
    rejected_version: int
    heartbeat_age_s: float | None
    liveness: Liveness

    @property
    def live(self) -> bool:
        return self.liveness == "live"


def _worker_rows(client: AnyRedis, key: str, keys: StreamKeys, now_ms: int) -> list[WorkerRow]:
    rows = []
    for raw_worker, raw_state in sorted(_hgetall(client, keys.workers).items()):
        worker = raw_worker.decode("utf-8", "replace")
        try:
            state = decode_worker_state(raw_state)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # unreadable means unknown heartbeat: it cannot be shown live, so it never counts
            reason = f"unreadable state: {exc}"
            rows.append(WorkerRow(key, worker, "invalid", 0, "", reason, 0, None, "stale"))
            continue
        age = max(0, now_ms - state.heartbeat) / 1000 if state.heartbeat else None
        rows.append(
            WorkerRow(
                key=key,
                worker=worker,
                status=state.status,
                version=state.version,
                sha256=state.sha256,
                error=state.error,
                rejected_version=state.rejected_version,
                heartbeat_age_s=age,
                liveness=liveness(state, now_ms),
            )
        )
    return rows


# ---------------------------------------------------------------------------- convergence


@dataclass(frozen=True, slots=True)
class Target:
    """The version a key's workers should run, identified by number and content hash."""

    version: int
    sha256: str

    @classmethod
    def of(cls, event: Event) -> Target:
        return cls(event.version, event.sha256)


@dataclass(frozen=True, slots=True)
class Rejection:
    worker: str
    version: int
    error: str


@dataclass(frozen=True, slots=True)
class Convergence:
    """Where one key's live workers stand with respect to ``target``."""

    key: str
    target: Target | None  # None: nothing (well-formed) published yet
    live: tuple[str, ...]
    current: tuple[str, ...]  # live workers running the target
    behind: tuple[WorkerRow, ...]  # live, not running it, not rejecting it
    rejected: tuple[Rejection, ...]  # live workers that rejected it
    stale: tuple[str, ...]
    gone: tuple[str, ...]

    @property
    def state(self) -> ConvergenceState:
        if self.target is None:
            return "unpublished"
        if self.rejected:
            return "rejected"
        if not self.live:
            return "no-live-workers"
        return "behind" if self.behind else "converged"


def _runs(row: WorkerRow, target: Target) -> bool:
    return row.version == target.version and (not row.sha256 or row.sha256 == target.sha256)


def assess(
    key: str,
    target: Target | None,
    workers: Iterable[WorkerRow],
    rejected_by_ack: Mapping[str, str],
) -> Convergence:
    """Classify workers for ``target``; ``rejected_by_ack`` maps worker -> error for it.

    A rejection counts only from a live worker that does not run the target now (a retry
    may have applied it since); acks of stale or unknown workers are history, not a verdict.
    """
    rows = list(workers)
    live = [r for r in rows if r.live]
    current, behind, rejected = [], [], []
    for row in live:
        if target is None:
            continue
        if _runs(row, target):
            current.append(row.worker)
        elif row.status == "rejected" and row.rejected_version == target.version:
            rejected.append(Rejection(row.worker, target.version, row.error))
        elif row.worker in rejected_by_ack:
            rejected.append(Rejection(row.worker, target.version, rejected_by_ack[row.worker]))
        else:
            behind.append(row)
    return Convergence(
        key=key,
        target=target,
        live=tuple(r.worker for r in live),
        current=tuple(current),
        behind=tuple(behind),
        rejected=tuple(rejected),
        stale=tuple(r.worker for r in rows if r.liveness == "stale"),
        gone=tuple(r.worker for r in rows if r.liveness == "gone"),
    )


def _ack_rejections(acks: Iterable[Ack], target: Target) -> dict[str, str]:
    return {
        a.worker: a.error
        for a in acks
        if a.status == "rejected" and _acks_for(a, target.version, target.sha256)
    }


# ---------------------------------------------------------------------------- status


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


@dataclass(frozen=True, slots=True)
class StatusReport:
    workers: tuple[WorkerRow, ...]
    summaries: tuple[Convergence, ...]


# Reads every decodable ack of an ``:acks`` stream, oldest first, as ``_acks`` does; the
# daemon passes one that keeps what it read before (publisher.ackwatch).
AckReader = Callable[["AnyRedis", str], list[Ack]]


def _key_status(
    client: AnyRedis,
    key: str,
    prefix: str,
    now_ms: int,
    read_acks: AckReader | None = None,
) -> tuple[Convergence, list[WorkerRow]]:
    keys = stream_keys(key, prefix)
    newest = next((e for e in _newest_first(client, keys.events) if isinstance(e, Event)), None)
    target = Target.of(newest) if newest else None
    workers = _worker_rows(client, key, keys, now_ms)
    rejected_by_ack: dict[str, str] = {}
    if target is not None:
        acks = read_acks(client, keys.acks) if read_acks is not None else None
        if acks is None:
            acks = _acks(client, keys.acks)[0]
        rejected_by_ack = _ack_rejections(acks, target)
    return assess(key, target, workers, rejected_by_ack), workers


def status(
    client: AnyRedis,
    key: str | None = None,
    *,
    prefix: str,
    read_acks: AckReader | None = None,
) -> StatusReport:
    """Every worker of ``key`` (default: of every key under ``prefix``) and a summary per key.

    A named key is unknown only when it has neither events nor workers: workers that started
    before the first publish are worth seeing. ``read_acks`` replaces reading each ``:acks``
    stream whole (the daemon's status pass keeps the acks it read before).
    """
    if key is None:
        names = list_keys(client, prefix)
    else:
        keys = stream_keys(key, prefix)
        if not client.exists(keys.events, keys.workers):
            _require_stream(client, key, keys, prefix)
        names = (key,)
    now_ms = _server_now_ms(client)
    summaries = []
    workers: list[WorkerRow] = []
    for name in names:
        summary, rows = _key_status(client, name, prefix, now_ms, read_acks)
        summaries.append(summary)
        workers += rows
    return StatusReport(tuple(workers), tuple(summaries))


# ---------------------------------------------------------------------------- wait


@dataclass(frozen=True, slots=True)
class WaitResult:
    convergence: Convergence  # as last seen
    timed_out: bool
    elapsed_s: float
    # what was never published within the timeout ("v9", "content 3f2a...") and the newest
    # version then (0: none); "" when the target was published
    unpublished: str = ""
    newest: int = 0


def wait_for(
    client: AnyRedis,
    key: str,
    version: int | None = None,
    *,
    sha256: str | None = None,
    prefix: str,
    timeout: float,
    poll_interval: float = 0.15,
) -> WaitResult:
    """Poll until every live worker runs the target or one rejects it.

    The target is ``version``, or the newest version whose content has the hex ``sha256``
    (the file a deploy just applied), or else the newest version now. A version newer than
    the newest, or a content not published yet, is first waited for within the same
    ``timeout``: right after ``kubectl apply``, kubelet and the publisher have not caught up.
    With ``sha256``, a newer entry of the same content (a revert published again) becomes
    the target as soon as it appears.

    Returns as soon as convergence or a rejection is seen, else after ``timeout`` seconds
    with ``timed_out`` (and ``unpublished`` when the target never appeared). With no live
    worker at all it keeps waiting: workers may be starting (a new pod, a gunicorn restart),
    and they replay the newest version before serving. Raises ``NotFound`` before waiting if
    the key does not exist (unless waiting for a content) or the version can never appear
    (older than the newest, yet not in the history).
    """
    keys = stream_keys(key, prefix)
    started = time.monotonic()
    awaited = _Awaited(client, key, version=version, sha256=sha256, prefix=prefix)
    while (target := awaited.target()) is None:
        elapsed = time.monotonic() - started
        if elapsed >= timeout:
            return WaitResult(
                assess(key, None, [], {}),
                timed_out=True,
                elapsed_s=elapsed,
                unpublished=awaited.describe(),
                newest=awaited.newest,
            )
        time.sleep(min(poll_interval, timeout - elapsed))
    rejected_by_ack: dict[str, str] = {}
    last_ack = "-"
    while True:
        if sha256 is not None:
            newer = awaited.newer_copy(target)
            if newer is not None:  # the same content published again: that is the one now
                target, rejected_by_ack = newer, {}
        new_acks, last_ack = _acks(client, keys.acks, after=last_ack)
        rejected_by_ack.update(_ack_rejections(new_acks, target))
        workers = _worker_rows(client, key, keys, _server_now_ms(client))
        seen = assess(key, target, workers, rejected_by_ack)
        elapsed = time.monotonic() - started
        if seen.state in ("converged", "rejected"):
            return WaitResult(seen, timed_out=False, elapsed_s=elapsed)
        if elapsed >= timeout:
            return WaitResult(seen, timed_out=True, elapsed_s=elapsed)
        time.sleep(min(poll_interval, timeout - elapsed))


class _Awaited:
    """What ``wait_for`` waits for, looked up in the stream until it is there."""

    def __init__(
        self,
        client: AnyRedis,
        key: str,
        *,
        version: int | None,
        sha256: str | None,
        prefix: str,
    ) -> None:
        self.client, self.key, self.keys = client, key, stream_keys(key, prefix)
        self.version, self.sha256, self.prefix = version, sha256, prefix
        self.newest = 0
        self._scanned = ""  # entries up to this id were looked through for the content

    def describe(self) -> str:
        return f"content {self.sha256[:12]}" if self.sha256 is not None else f"v{self.version}"

    def target(self) -> Target | None:
        """The target if published, ``None`` while it may still be; or raise ``NotFound``."""
        if self.sha256 is not None:
            return self._content()
        try:
            return Target.of(find_event(self.client, self.key, self.version, prefix=self.prefix))
        except MalformedVersion:
            raise  # published, and unusable: it will not get better
        except NotFound:
            if self.version is None or not self.client.exists(self.keys.events):
                raise  # unknown key: say so now
            self.newest = self._newest_version()
            if self.version <= self.newest:
                # published meanwhile, or trimmed from the history / malformed: ask again,
                # so only a version that is still missing is an error
                return Target.of(
                    find_event(self.client, self.key, self.version, prefix=self.prefix)
                )
            return None

    def newer_copy(self, target: Target) -> Target | None:
        """The newest entry, if it carries the awaited content under a newer version."""
        for entry in _newest_first(self.client, self.keys.events):
            if isinstance(entry, _Malformed):
                continue
            if entry.sha256 == self.sha256 and entry.version > target.version:
                return Target.of(entry)
            return None
        return None

    def _content(self) -> Target | None:
        """The newest entry with the awaited content, looking only at entries not yet seen."""
        top = ""
        for entry in _newest_first(self.client, self.keys.events):
            entry_id = entry.entry_id if isinstance(entry, _Malformed) else entry.id
            if self._scanned and _id_key(entry_id) <= _id_key(self._scanned):
                break
            top = top or entry_id
            if isinstance(entry, _Malformed):
                continue
            self.newest = max(self.newest, entry.version)
            if entry.sha256 == self.sha256:
                return Target.of(entry)
        self._scanned = top or self._scanned
        return None

    def _newest_version(self) -> int:
        for entry in _newest_first(self.client, self.keys.events):
            if not isinstance(entry, _Malformed):
                return entry.version
        return 0


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)
