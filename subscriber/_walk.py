"""One newest-first pass over events entries, decided in version order: versions only go up.

Every pass a subscriber makes over entries is a :class:`Walk` (a replay in ``start()``, a
resync after a reconnect, an ``XREAD`` batch; see ``_core``). The reader feeds it entries
newest first with :meth:`Walk.step`, then :meth:`Walk.finish` decides. Deciding only once
the pass is read, and by version rather than by position, is what keeps a worker from going
backwards:

- The newest entry is the one with the highest version, never simply the last appended:
  anyone who can write the stream can append an old entry again (a genuinely signed one,
  fields copied from ``XRANGE``), and a stream restored from an older backup ends below what
  workers ran. Entries are decided highest version first: the highest the callback accepts
  is applied, each higher rejected one is reported, lower ones are superseded.
- A history pass stops at the newest entry when it is *on time*: its stream id (Redis's
  clock at ``XADD``) is at most ``REPLAY_TOLERANCE_MS`` after its ``published_at`` (the
  publisher's clock, signed in signed mode). Such an entry was appended when it was
  published, so it is the newest legitimate entry and the highest version: the pass tries it
  (walking back only past the callback's rejections) and reads nothing older, which keeps
  ``start()`` at one page in the normal case. A Redis restored from an older backup keeps
  ids and ``published_at`` together: its newest entry is on time, and a fresh worker may
  take it (it ran nothing newer); a running worker holds by ``seen``.
- An old entry appended again carries its old ``published_at``: it is late. Once an entry
  read is late, unreadable, or the versions read do not strictly decrease newest first, the
  pass reads on up to its limit for the highest version (a clock skew above the tolerance
  costs only these reads). Reading newest first, a genuine history's versions strictly
  decrease; once they do not, old entries were appended again, and the pass reads on up to
  ``HISTORY_READ_CAP`` entries.
- An entry whose version is not above the highest the worker has seen (``State.seen``:
  applied or rejected) is a replay: refused, and reported (when it is newer in the stream
  than the entry the pass settled on; older ones are history). It never changes what runs.
- A history pass that read the stream's newest entries and found nothing above ``seen``
  shows whether the stream is behind the worker (restored, re-created, failed over to a
  lagging replica): the worker then holds its config with status ``holding`` and a reason.
  So does a pass that finds the version the worker runs (= ``seen``) carried by another
  content: Redis lost the entry it applied and numbered another the same (a publish whose
  answer was lost, then a restart empty); the publisher's sweep writes above it.

With signing keys, only verified entries take part: an unverified entry is rejected like a
malformed one, and its claimed version counts for nothing.

An entry whose ``audience`` leaves this worker out (a canary for others) takes no part once
it verified: never tried, reported, counted toward ``seen``, the version order or the pass's
limit (only toward the hard cap, ``HISTORY_READ_CAP``); a pass reads past it to the newest
entry meant for the worker. So a new worker (a crashed canary's replacement has a new id)
replays the stable version, and a worker outside a canary stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from subscriber import _junk, _reasons
from subscriber._state import Cursor, Rejection, Running, compare_ids
from subscriber.defaults import HISTORY_READ_CAP, REPLAY_TOLERANCE_MS
from subscriber.errors import MalformedEntry, SignatureInvalid
from subscriber.protocol import Ack, Event, decode_event, now_ms

if TYPE_CHECKING:
    from subscriber._core import SubscriberCore

__all__ = ["Walk"]


@dataclass(frozen=True, slots=True)
class _Malformed:
    """An entry that did not decode or verify: what it claimed, and why it is refused."""

    position: int  # 0: the newest entry of the pass
    entry_id: str
    version: int  # as claimed; 0 when unreadable
    sha256: str
    error: str


class Walk:
    """One newest-first pass over entries; feed it with :meth:`step`, then :meth:`finish`.

    ``batch``: the entries are an ``XREAD`` batch (what came after the cursor), not the
    stream's history read from its newest entry; only a history pass can tell that the
    stream is behind the worker. ``decided_up_to``: entries at or before this id were
    reported by an earlier pass, so this one reports no replay or malformed entry among them.

    ``acks`` collects the reports to write (newest entry first), ``reasons`` the rejection
    texts (for ``NoAcceptableConfig``), ``examined`` how many entries were read.
    """

    def __init__(
        self,
        core: SubscriberCore,
        *,
        limit: int,
        stop_at: Cursor | None,
        batch: bool = False,
        decided_up_to: str | None = None,
    ) -> None:
        self._core = core
        self._limit = limit
        self._stop_at = stop_at
        self._batch = batch
        self._decided_up_to = decided_up_to
        self._floor = core.state.seen  # ``seen`` when the pass began: tried above it
        self._suspect = batch  # read on: an entry was late, unreadable or out of order
        self._decided: set[int] = set()  # positions tried (applied, adopted or rejected)
        self._settled_at: int | None = None  # the position that now runs
        self._newest: Cursor | None = None
        self._events: list[tuple[int, Event]] = []  # valid entries, newest first
        self._malformed: list[_Malformed] = []
        self._previous: int | None = None  # the version of the previous valid entry
        self._reports: list[tuple[int, Ack]] = []
        self._rejection: tuple[int, Rejection] | None = None  # the newest one reported
        self.acks: list[Ack] = []
        self.reasons: list[str] = []
        self._reasons: list[tuple[int, str]] = []
        self.examined = 0
        self.untrusted = 0  # entries rejected by the signature check
        self.reordered = False  # versions did not strictly decrease, newest first
        self.reached_stop = False  # ended at ``stop_at``: decided before this pass
        self.settled = False  # ended on an entry that now runs (accepted or unchanged)
        self.replays = 0  # entries refused because their version is not above ``seen``
        self.invisible = 0  # entries whose audience leaves this worker out (read past)
        self._read = 0  # entries read, invisible ones too: positions, and the hard cap
        self.done = False

    def step(self, entry_id: bytes | str, fields: object) -> bool:
        """Read one entry (older than the previous one); False once the pass has enough."""
        if self.done:
            return False
        eid = _reasons.as_text(entry_id)
        claimed = _reasons.claimed(fields, "sha256")
        if self._newest is None:
            self._newest = Cursor(eid, claimed)
        stop_at = self._stop_at
        if stop_at is not None and (eid, claimed) == (stop_at.entry_id, stop_at.claimed_sha256):
            # Already decided before this pass (e.g. a resync after a reconnect that
            # changed nothing): everything older was handled then, and the state recorded
            # then (running, maybe with that entry rejected) still holds.
            self.reached_stop = self.done = True
            return False
        position = self._read
        self._read += 1
        self.examined += 1
        try:
            event = self._decode(eid, fields)
        except MalformedEntry as exc:
            if isinstance(exc, SignatureInvalid):
                self.untrusted += 1
            version = _reasons.claimed_version(fields)
            error = _reasons.bounded(str(exc))
            self._malformed.append(_Malformed(position, eid, version, claimed, error))
            self._read_on(f"entry {eid} is unreadable (reported as a rejection)")
            return self._more()
        if not event.is_for(self._core.worker):
            self.examined -= 1  # a canary for other workers: as if it were not there
            self.invisible += 1
            return self._more()
        if self._previous is not None and event.version >= self._previous:
            self._reordered(event)
        self._previous = event.version
        self._events.append((position, event))
        if not self._suspect:
            lateness = _late_by(event)
            if lateness > REPLAY_TOLERANCE_MS:
                self._read_on(
                    f"version {event.version} (entry {eid}) was appended {lateness} ms after "
                    "it was published (an old entry appended again, or the publisher's clock "
                    "is behind Redis's)"
                )
            elif self._on_time(position, event):
                self.done = True
                return False
        return self._more()

    def finish(self) -> None:
        """Decide: apply the highest acceptable version above ``seen``, report what must be
        reported, record where the subscriber now is and whether it holds."""
        core = self._core
        # No entry at all means an empty (or deleted) stream: read it from the start, so a
        # re-created stream is followed whatever ids it gets.
        core.cursor = self._newest if self._newest is not None else Cursor()
        self._decide()
        decided, settled = self._decided, self._settled_at
        self._report_replays(decided, settled)
        self._report_malformed(settled)
        self._reports.sort(key=lambda report: report[0])
        self.acks = [ack for _, ack in self._reports]
        self._reasons.sort(key=lambda reason: reason[0])
        self.reasons = [reason for _, reason in self._reasons]
        if self._rejection is not None:
            core._set_rejection(self._rejection[1])
        elif self.settled:
            core._set_rejection(None)
        self._hold_or_release(decided_above=bool(decided))
        self.done = True

    # -- reading -----------------------------------------------------------------------

    def _more(self) -> bool:
        # entries for other workers do not count toward the limit, only toward the hard cap
        if self.examined >= self._limit or self._read >= max(self._limit, HISTORY_READ_CAP):
            self.done = True
        return not self.done

    def _decode(self, eid: str, fields: object) -> Event:
        # decode_event checks the shape itself: a non-dict entry is a MalformedEntry
        event = decode_event(eid, fields)  # type: ignore[arg-type]
        if event.key != self._core.key:
            raise MalformedEntry(
                eid, f"entry is for config key {event.key[:300]!r}, not {self._core.key!r}"
            )
        if self._core.signing_keys:
            self._core.verify_signature(event)
        return event

    def _on_time(self, position: int, event: Event) -> bool:
        """The pass has read nothing suspect, and ``event`` was appended when it was
        published: it is the newest legitimate entry. True once the pass has its answer: the
        entry now runs, or it is not above ``seen`` (then neither is anything older)."""
        if event.version <= self._floor:
            return True
        return self._try(position, event)

    def _read_on(self, why: str) -> None:
        """No entry read so far can be trusted to be the newest legitimate one: read the
        pass to its end and decide in version order."""
        if self._suspect:
            return
        self._suspect = True
        self._core._log.info("%s: %s; reading on for the highest version", self._core.key, why)

    def _reordered(self, event: Event) -> None:
        """Versions do not strictly decrease newest first: old entries were appended
        again. Read on (bounded) so the highest version is found wherever it is."""
        if self.reordered:
            return
        self.reordered = True
        self._suspect = True
        self._limit = max(self._limit, HISTORY_READ_CAP)
        self._core._log.info(
            "%s: version %d (entry %s) is not below the newer entry's %d: old entries were "
            "appended again; reading up to %d entries for the highest version",
            self._core.key,
            event.version,
            event.id,
            self._previous,
            self._limit,
        )

    # -- deciding ----------------------------------------------------------------------

    def _decide(self) -> None:
        """Unless an entry already runs (tried while reading), try the entries above
        ``seen`` not tried yet, highest version first (equal versions: the one appended
        first), until one runs."""
        if self._settled_at is not None:
            return
        above = [
            (pos, ev)
            for pos, ev in self._events
            if ev.version > self._floor and pos not in self._decided
        ]
        above.sort(key=lambda item: (-item[1].version, -item[0]))
        for position, event in above:
            if self._try(position, event):
                return

    def _try(self, position: int, event: Event) -> bool:
        """Run ``event`` (adopt it when its content runs already); False: rejected."""
        core = self._core
        self._decided.add(position)
        running = core.state.running
        if running is not None and event.sha256 == running.sha256:
            self._adopt(position, event, running)
            self._settled_at = position
            return True
        try:
            apply_ms = core.apply(event.content)
        except BaseException as exc:  # SystemExit too: see Subscriber
            if core.propagates(exc):  # KeyboardInterrupt on the main thread: stop
                raise
            error = _reasons.describe(exc)
            if event.sensitive:
                error = _reasons.redact(error, event.content)
            self._reject(position, event.id, event.version, event.sha256, error,
                         published_at=event.published_at, seen=event.version)  # fmt: skip
            return False
        self._accept(position, event, apply_ms)
        self._settled_at = position
        return True

    def _report_replays(self, decided: set[int], settled: int | None) -> None:
        """Refuse and report the entries at or below ``seen`` that are newer in the stream
        than the entry that runs (or, when none settled, than the highest version read);
        older ones are history, superseded without a report."""
        if not self._events:
            return
        core = self._core
        if settled is not None:
            anchor = settled
        else:
            anchor = max(self._events, key=lambda item: (item[1].version, item[0]))[0]
        running = core.state.running
        for position, event in self._events:
            if position in decided or position > anchor or self._quiet(event.id):
                continue
            if position == anchor and (settled is not None or _runs(event, running)):
                continue
            self.replays += 1
            version = running.version if running else 0
            error = _reasons.replay(event.version, core.state.seen, version)
            self._reject(position, event.id, event.version, event.sha256, error,
                         published_at=event.published_at, replay=True)  # fmt: skip

    def _report_malformed(self, settled: int | None) -> None:
        """Refuse the malformed entries newer than the entry that runs (all of them when
        none settled): each is counted, but one ack and at most one log line tell about
        them all (see ``_junk``). In unsigned mode what one claims counts toward ``seen``;
        with signing keys nothing unverified does."""
        core = self._core
        bad = [
            entry
            for entry in self._malformed
            if not (settled is not None and entry.position > settled)
            and not self._quiet(entry.entry_id)
        ]
        if not bad:
            return
        trust_claims = not core.signing_keys
        core._count_error(max(e.version for e in bad) if trust_claims else 0, count=len(bad))
        if core.metrics is not None:
            core.metrics.record_rejected(core.key, len(bad))
        for entry in bad:
            self._reasons.append(
                (entry.position, _reason(entry.version, entry.entry_id, entry.error))
            )
        told = core.malformed_log.one_by_one(len(bad))
        for entry in bad[:told]:
            core.malformed_log.rejected(entry.version, entry.entry_id, entry.error)
            self._malformed_ack(entry, entry.error)
        if told < len(bad):
            rest = bad[told]
            self._malformed_ack(rest, _junk.summary(rest.error, len(bad) - told - 1))

    def _malformed_ack(self, entry: _Malformed, error: str) -> None:
        if self._rejection is None or entry.position < self._rejection[0]:
            rejection = Rejection(version=entry.version, entry_id=entry.entry_id, error=error)
            self._rejection = (entry.position, rejection)
        ack = self._rejected_ack(entry.entry_id, entry.version, entry.sha256, error, published_at=0)
        self._reports.append((entry.position, ack))

    def _quiet(self, entry_id: str) -> bool:
        limit = self._decided_up_to
        return limit is not None and compare_ids(entry_id, limit) <= 0

    def _hold_or_release(self, *, decided_above: bool) -> None:
        """A version above ``seen`` decided ends holding. A history pass that read the
        stream's newest entries shows whether the stream is behind the worker, or numbered
        another content as the one that runs; a batch of nothing but replays asks the
        transport for such a pass (``survey_due``)."""
        core = self._core
        if decided_above:
            core._set_holding(None)
            return
        if self._batch:
            if self.replays:  # is the stream behind? (and the holding reason up to date)
                core.survey_due = True
            return
        state, running = core.state, core.state.running
        if self.reached_stop or running is None:
            return
        if running.version == state.seen and any(  # Redis lost what runs, v=seen is another
            ev.version == state.seen and ev.sha256 != running.sha256 for _, ev in self._events
        ):
            core._set_holding(_reasons.renumbered(state.seen, running.sha256))
            return
        highest = max((event.version for _, event in self._events), default=0)
        if highest >= state.seen:
            core._set_holding(None)
            return
        core._set_holding(
            _reasons.holding(running.version, highest, empty=not self.examined, seen=state.seen)
        )

    # -- outcomes ----------------------------------------------------------------------

    def _adopt(self, position: int, event: Event, running: Running) -> None:
        """The entry carries the content already running: acknowledge, no callback."""
        core = self._core
        core._set_running(
            Running(
                content=running.content,
                sha256=running.sha256,
                version=event.version,
                entry_id=event.id,
                source="redis",
            ),
            counted=False,
        )
        if core.metrics is not None:
            core.metrics.record_version(core.key, event.version)
        self._reports.append((position, self._ack(event, unchanged=True)))
        self.settled = True

    def _accept(self, position: int, event: Event, apply_ms: float) -> None:
        core = self._core
        running = Running(
            content=event.content,
            sha256=event.sha256,
            version=event.version,
            entry_id=event.id,
            source="redis",
        )
        core._set_running(running, counted=True)
        if core.metrics is not None:
            core.metrics.record_applied(core.key, event.version, apply_ms)
        self._reports.append((position, self._ack(event, apply_ms=apply_ms)))
        self.settled = True
        core._log.info(
            "%s: applied version %d (%d bytes, %.1f ms in the callback)",
            core.key,
            event.version,
            len(event.content),
            apply_ms,
        )

    def _reject(
        self,
        position: int,
        eid: str,
        version: int,
        sha256: str,
        error: str,
        *,
        published_at: int,
        seen: int = 0,
        replay: bool = False,
    ) -> None:
        """Report a refused entry; a replay changes neither what runs nor the status."""
        core = self._core
        core._count_error(seen)
        if core.metrics is not None:
            core.metrics.record_rejected(core.key)
        core._log.warning(
            "%s: rejected version %s (entry %s), keeping the running config: %s",
            core.key,
            version or "?",
            eid,
            error,
        )
        if not replay and (self._rejection is None or position < self._rejection[0]):
            self._rejection = (position, Rejection(version=version, entry_id=eid, error=error))
        self._reasons.append((position, _reason(version, eid, error)))
        ack = self._rejected_ack(eid, version, sha256, error, published_at=published_at)
        self._reports.append((position, ack))

    def _rejected_ack(
        self, eid: str, version: int, sha256: str, error: str, *, published_at: int
    ) -> Ack:
        return Ack(
            worker=self._core.worker,
            version=version,
            sha256=sha256,
            status="rejected",
            error=error,
            entry_id=eid,
            at=now_ms(),
            published_at=published_at,
        )

    def _ack(self, event: Event, *, apply_ms: float = 0.0, unchanged: bool = False) -> Ack:
        return Ack(
            worker=self._core.worker,
            version=event.version,
            sha256=event.sha256,
            status="applied",
            entry_id=event.id,
            at=now_ms(),
            apply_ms=apply_ms,
            published_at=event.published_at,
            unchanged=unchanged,
        )


def _late_by(event: Event) -> int:
    """How long (ms) after its ``published_at`` the entry was appended, by its stream id."""
    millis, _, _ = event.id.partition("-")
    if not (millis.isascii() and millis.isdigit()):  # no id Redis assigns: no time vouched
        return REPLAY_TOLERANCE_MS + 1
    return int(millis) - event.published_at


def _reason(version: int, eid: str, error: str) -> str:
    return f"version {version or '?'} ({eid}): {error}"


def _runs(event: Event, running: Running | None) -> bool:
    """Whether ``event`` is the very entry that runs (a pass may read it again)."""
    return running is not None and (event.id, event.sha256) == (running.entry_id, running.sha256)
