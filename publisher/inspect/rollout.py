"""A key's rollout state, read from Redis alone: the stream's newest entries, ``:workers``
and ``:acks`` -- never from a daemon's memory, so a restarted or second daemon, ``status``
and the console all see the same canary, promotion, halt or rollback.

The newest entry decides the state (the contract's ``rollout`` field, an ``audience``):

======================  ===================================================================
newest entry            state
======================  ===================================================================
has an ``audience``     ``canary``: for those workers; everyone else stays on ``stable``,
                        the newest entry before it meant for everyone
``rollout=promote``     ``promoted`` (the canary's content, now for everyone)
``rollout=halt``        ``halted`` (the stable content again, for everyone; the halted
                        canary content, ``rollout_sha256``, is published no further)
``rollout=rollback``    ``rolled-back`` (pinned: ``rollout_sha256`` is not re-published
                        while a mount still shows it)
anything else           ``none``
======================  ===================================================================

:func:`canary_progress` is the one rule for a canary's fate, used by the daemon to act and by
``status`` to explain: every canary worker applied it and proved it survived (a heartbeat at
least ``hold`` after its apply, both on the worker's clock) -> promote; one rejected it, or
went stale or gone before that proof, or never applied it within ``hold`` + ``APPLY_GRACE_MS``
of the publish -> halt; else wait. Proof survives the worker: a canary worker that proved
itself and is SIGKILLed later still counts as proven (its last heartbeat says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import msgspec

from publisher._floor import parse_version
from publisher.inspect._liveness import liveness
from subscriber.protocol import Ack, decode_audience

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = [
    "APPLY_GRACE_MS",
    "MARKS_READ",
    "NO_ROLLOUT",
    "ROLLOUT_KINDS",
    "CanaryWorker",
    "Marks",
    "Progress",
    "RolloutView",
    "canary_progress",
    "marks_of",
    "read_marks",
    "view_of",
]

ROLLOUT_KINDS = {"canary": "canary", "promote": "promoted", "halt": "halted"}
ROLLOUT_KINDS["rollback"] = "rolled-back"
MARKS_READ = 16  # newest entries read for the state: the canary and the stable entry before it
# a canary worker that has not applied the canary this long after the hold would have ended
# (live, but stuck or too slow) halts it: a rollout is never stuck waiting
APPLY_GRACE_MS = 60_000
# the newest entries' fields without their content (up to 1 MiB each): what the daemon reads
# every second (EVALSHA: the shipped publisher user may not EVAL)
MARKS_SCRIPT = """
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[1]))
for _, entry in ipairs(entries) do
  local fields, kept = entry[2], {}
  for i = 1, #fields, 2 do
    if fields[i] ~= 'content' then
      table.insert(kept, fields[i])
      table.insert(kept, fields[i + 1])
    end
  end
  entry[2] = kept
end
return entries
"""

State = Literal["none", "canary", "promoted", "halted", "rolled-back"]


@dataclass(frozen=True, slots=True)
class Marks:
    """What an entry says about rollouts (its content left out). ``version`` 0: malformed;
    ``audience`` ``None``: for everyone (an unreadable audience is the empty tuple: nobody)."""

    entry_id: str
    version: int
    sha256: str
    audience: tuple[str, ...] | None = None
    rollout: str = ""
    rollout_of: int = 0
    rollout_sha256: str = ""
    request: str = ""
    reason: str = ""
    published_at: int = 0
    publisher: str = ""
    sensitive: bool = False


def _text(raw: object) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def parse_audience(raw: str) -> tuple[str, ...]:
    """The ``audience`` field (``protocol.decode_audience``); () when it is not one."""
    try:
        return decode_audience(raw)
    except ValueError:
        return ()


def marks_of(entry_id: object, fields: Mapping[Any, Any]) -> Marks:
    data = {_text(name): _text(value) for name, value in fields.items() if _text(name) != "content"}
    audience = data.get("audience")
    return Marks(
        entry_id=_text(entry_id),
        version=parse_version(data.get("version", "")) or 0,
        sha256=data.get("sha256", ""),
        audience=parse_audience(audience) if audience is not None else None,
        rollout=data.get("rollout", "")[:40],
        rollout_of=parse_version(data.get("rollout_of", "")) or 0,
        rollout_sha256=data.get("rollout_sha256", ""),
        request=data.get("request", "")[:64],
        reason=data.get("reason", "")[:200],
        published_at=parse_version(data.get("published_at", "")) or 0,
        publisher=data.get("publisher", "")[:300],
        sensitive=data.get("sensitive") == "1",
    )


def read_marks(
    client: AnyRedis, events_key: str, *, count: int = MARKS_READ, script: Any = None
) -> list[Marks]:
    """The newest ``count`` entries' marks, newest first. ``script``: ``MARKS_SCRIPT``
    registered on ``client`` (contents stay in Redis); without it, ``XREVRANGE``."""
    if script is not None:
        raw = cast(list[Any], script(keys=[events_key], args=[count]))
        entries = [(eid, dict(zip(f[::2], f[1::2], strict=True))) for eid, f in raw]
    else:
        entries = cast(list[Any], client.xrevrange(events_key, count=count))
    return [marks_of(eid, fields) for eid, fields in entries]


@dataclass(frozen=True, slots=True)
class RolloutView:
    """A key's rollout state (``status --json``'s ``rollout``; see the module docstring)."""

    state: State
    version: int = 0  # the newest entry's (the canary, promotion, halt or rollback)
    canary: tuple[str, ...] = ()  # the canary's audience (halted/promoted: the one it had)
    reason: str = ""
    of: int = 0  # the version promoted, halted or rolled back from
    newest: Marks | None = None
    stable: Marks | None = None  # canary: the newest entry before it meant for everyone

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "version": self.version,
            "canary": list(self.canary),
            "reason": self.reason,
            "of": self.of,
        }


NO_ROLLOUT = RolloutView("none")


def view_of(marks: Sequence[Marks]) -> RolloutView:
    """The state the newest entries (newest first) say."""
    if not marks:
        return NO_ROLLOUT
    newest = marks[0]
    if newest.audience is not None:
        stable = next((m for m in marks[1:] if m.audience is None and m.version), None)
        others = f"everyone else stays on v{stable.version}" if stable else "nobody else yet"
        return RolloutView(
            "canary",
            newest.version,
            newest.audience,
            f"canary for {len(newest.audience)} worker(s)"
            + (f", {newest.reason}" if newest.reason else "")
            + f"; {others}",
            newest=newest,
            stable=stable,
        )
    state = ROLLOUT_KINDS.get(newest.rollout)
    if state is None or state == "canary":
        return RolloutView("none", newest.version, newest=newest)
    canary = next((m for m in marks if m.version == newest.rollout_of), None)
    audience = canary.audience if canary is not None and canary.audience else ()
    default = {
        "promoted": f"canary v{newest.rollout_of} promoted",
        "halted": f"canary v{newest.rollout_of} halted",
        "rolled-back": f"rolled back from v{newest.rollout_of}",
    }[state]
    return RolloutView(
        cast(State, state),
        newest.version,
        audience if state != "rolled-back" else (),
        newest.reason or default,
        of=newest.rollout_of,
        newest=newest,
    )


# ---------------------------------------------------------------------------- canary fate


class _Canary(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of a ``WorkerState`` the canary rule reads (decoded loosely)."""

    status: str = ""
    version: int = 0
    sha256: str = ""
    rejected_version: int = 0
    error: str = ""
    heartbeat: int = 0
    heartbeat_interval: float = 0.0
    audience: bool = False  # honours audience entries (this release's workers)


_decoder = msgspec.json.Decoder(_Canary)


def decode_state(raw: bytes | None) -> _Canary | None:
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass(frozen=True, slots=True)
class CanaryWorker:
    worker: str
    state: Literal["waiting", "applied", "proven", "rejected", "stale", "gone"]
    applied_at: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Progress:
    decision: Literal["promote", "halt", "wait"]
    reason: str
    workers: tuple[CanaryWorker, ...] = ()


def _one(  # noqa: PLR0917
    worker: str,
    canary: Marks,
    state: _Canary | None,
    acks: Sequence[Ack],
    now_ms: int,
    hold_ms: int,
    first_seen: Mapping[str, int],
) -> CanaryWorker:
    version = canary.version
    for ack in acks:
        if ack.worker == worker and ack.version == version and ack.status == "rejected":
            return CanaryWorker(worker, "rejected", detail=ack.error[:200])
    if state is not None and state.status == "rejected" and state.rejected_version == version:
        return CanaryWorker(worker, "rejected", detail=state.error[:200])
    applied = [
        a.at
        for a in acks
        if a.worker == worker
        and a.version == version
        and a.status == "applied"
        and (not a.sha256 or a.sha256 == canary.sha256)
    ]
    runs = state is not None and state.version == version and state.sha256 == canary.sha256
    applied_at = min(applied) if applied else (first_seen.get(worker) if runs else None)
    if state is None:
        return CanaryWorker(worker, "gone", applied_at, "its :workers entry is missing")
    if runs and applied_at is not None and state.heartbeat >= applied_at + hold_ms:
        return CanaryWorker(worker, "proven", applied_at)
    alive = liveness(state, now_ms)
    if alive == "gone":
        return CanaryWorker(worker, "gone", applied_at, "it stopped before proving it survived")
    if alive == "stale":
        silent = (now_ms - state.heartbeat) / 1000
        detail = f"no heartbeat for {silent:.0f} s, before proving it survived"
        return CanaryWorker(worker, "stale", applied_at, detail)
    if runs:
        return CanaryWorker(worker, "applied", applied_at)
    if now_ms - canary.published_at > hold_ms + APPLY_GRACE_MS:
        detail = f"did not apply v{version} within {(hold_ms + APPLY_GRACE_MS) / 1000:g} s"
        return CanaryWorker(worker, "stale", None, detail)
    return CanaryWorker(worker, "waiting")


def canary_progress(
    canary: Marks,
    states: Mapping[str, bytes | None],
    acks: Iterable[Ack],
    *,
    now_ms: int,
    hold_ms: int,
    first_seen: Mapping[str, int] | None = None,
) -> Progress:
    """The canary's fate (see the module docstring). ``states``: ``:workers`` values by
    worker id; ``acks``: the key's recent acks; ``now_ms``: Redis' clock; ``first_seen``:
    worker -> when the caller first saw it run the canary (Redis' clock), for a worker whose
    applied ack was trimmed away (the hold then counts from there: later, never earlier)."""
    acks = [a for a in acks if a.version == canary.version]
    seen = first_seen or {}
    workers = tuple(
        _one(w, canary, decode_state(states.get(w)), acks, now_ms, hold_ms, seen)
        for w in canary.audience or ()
    )
    if not workers:
        return Progress("halt", f"canary v{canary.version} has no (readable) audience")
    for one in workers:
        if one.state in ("rejected", "stale", "gone"):
            verb = {"rejected": "rejected it", "stale": "went stale", "gone": "is gone"}[one.state]
            return Progress("halt", f"canary worker {one.worker} {verb}: {one.detail}", workers)
    if all(one.state == "proven" for one in workers):
        reason = (
            f"every canary worker ({len(workers)}) applied it and survived {hold_ms / 1000:g} s"
        )
        return Progress("promote", reason, workers)
    done = sum(one.state == "proven" for one in workers)
    return Progress("wait", f"{done}/{len(workers)} canary worker(s) proven", workers)
