"""What a subscriber decides, independent of how it talks to Redis.

The transports (the threaded ``Subscriber`` in ``client.py``, the asyncio ``AsyncSubscriber``
in ``aio.py``) fetch entries and write reports; everything they decide about entries lives
here, free of I/O, so both behave the same: verify each entry through the wire contract,
dedupe by content hash, walk back from the newest entry to the newest one the callback
accepts, and build the ``Ack`` and ``WorkerState`` records. What the decisions produce is
held in the immutable values of ``_state`` (the running config, the cursor, the
introspection :class:`~subscriber._state.State`); the texts of rejections are ``_reasons``'.

Every pass over entries is a :class:`Walk`, newest entry first:

- ``start()`` replays the history: walk from the newest entry until one is accepted.
- after a reconnect, a resync: the same walk, which also stops at the entry the subscriber
  had already reached (its :class:`Cursor`), so nothing is decided twice.
- each ``XREAD`` batch: a walk over just that batch. Applying the newest acceptable entry of a
  batch ends in the same state as applying the entries one by one would (the newest accepted
  one runs), with one callback instead of several. Rejected entries newer than it are each
  reported; older entries of the batch are superseded, never called back, and get no ack
  (no decision was made about them; the worker's state shows what runs).

A walk stops at the first entry whose content hash equals the running config's: it is
acknowledged as ``unchanged`` without calling back. Hashes, not ids or versions, decide
sameness, because a reset stream reuses ids and restarts versions.

With signing keys, an entry must also carry a signature that verifies (in constant time) with
the key its ``kid`` names before anything else happens to it; an unsigned, forged or
wrong-key entry is a rejection like a malformed one (reported, never applied, walked past).
A callback's rejection text about a ``sensitive`` entry is scrubbed of the content's text
before it is logged or reported.

A snapshot subscriber (``snapshot=True``) hands the callback the entry's whole key -> value
map (``protocol.decode_snapshot``; values UTF-8 decoded unless ``decode=False``); content that
is not a snapshot, or a value that is not UTF-8, is a rejection saying so. A per-key
subscriber rejects a snapshot entry the same way. Everything else (hashes, walks, acks) is
the same: the encoded snapshot is the content.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, cast

from subscriber import _reasons
from subscriber._state import ZERO_ID, Cursor, Rejection, Running, State, Status, compare_ids
from subscriber.errors import MalformedEntry, SignatureInvalid
from subscriber.protocol import (
    Ack,
    Event,
    WorkerState,
    decode_event,
    decode_snapshot,
    is_snapshot,
    key_id,
    now_ms,
    sha256_hex,
    sign,
)

if TYPE_CHECKING:
    from subscriber.metrics import SubscriberMetrics

__all__ = ["Callback", "SubscriberCore", "Walk"]

Callback = (
    Callable[[str], object]
    | Callable[[bytes], object]
    | Callable[[dict[str, str]], object]
    | Callable[[dict[str, bytes]], object]
)


def _texts(files: dict[str, bytes]) -> dict[str, str]:
    """A snapshot's values as text; ``ValueError`` naming the first key that is not UTF-8."""
    texts: dict[str, str] = {}
    for name, raw in files.items():
        try:
            texts[name] = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"snapshot key {name!r} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "create the Subscriber with decode=False to receive bytes"
            ) from None
    return texts


class SubscriberCore:
    """The state and decisions of one subscriber; the transport owns it and all I/O.

    Not thread-safe for writers: one thread (the transport's) walks and applies. Readers on
    any thread use :attr:`state`, an immutable value swapped in one assignment.
    """

    def __init__(
        self,
        key: str,
        callback: Callback,
        *,
        decode: bool,
        logger: logging.Logger,
        signing_keys: Sequence[bytes] = (),
        snapshot: bool = False,
    ) -> None:
        self.key = key
        self.is_snapshot = snapshot  # the callback takes a whole ConfigMap: a dict
        self.worker = ""  # the transport sets it when it starts (after any fork)
        self._callback = callback
        self._decode = decode
        self._log = logger
        # key id -> key; empty: signatures are not checked (unsigned mode)
        self.signing_keys: dict[str, bytes] = {key_id(k): k for k in signing_keys}
        self.state = State()
        self.cursor = Cursor()
        self.metrics: SubscriberMetrics | None = None  # the transport sets it when enabled

    def walk(self, *, limit: int, stop_at: Cursor | None = None) -> Walk:
        """Start a newest-first pass of at most ``limit`` entries (see the module docstring)."""
        return Walk(self, limit=limit, stop_at=stop_at)

    def apply(self, content: bytes) -> float:
        """Run the callback on ``content``; returns its duration in ms, raises its rejection."""
        started = time.perf_counter()
        if self.is_snapshot:
            files = decode_snapshot(content)  # ValueError: not a snapshot, or malformed
            if self._decode:
                cast("Callable[[dict[str, str]], object]", self._callback)(_texts(files))
            else:
                cast("Callable[[dict[str, bytes]], object]", self._callback)(files)
            return (time.perf_counter() - started) * 1000.0
        if is_snapshot(content):
            raise ValueError(
                "the entry is a snapshot (a whole ConfigMap published with `hotreload watch "
                "--snapshot`), not a single config file; subscribe to it with snapshot=True"
            )
        if self._decode:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"content is not valid UTF-8 ({exc.reason} at byte {exc.start}); publish "
                    "UTF-8 text, or create the Subscriber with decode=False to receive bytes"
                ) from None
            cast("Callable[[str], object]", self._callback)(text)
        else:
            cast("Callable[[bytes], object]", self._callback)(content)
        return (time.perf_counter() - started) * 1000.0

    def verify_signature(self, event: Event) -> None:
        """Raise ``SignatureInvalid`` unless ``event`` is signed with one of our keys.

        The key is the one ``kid`` names (every key is tried when an entry has none); the
        comparison is constant-time, so timing tells a forger nothing about the signature.
        """
        eid = event.id
        if not event.sig:
            raise SignatureInvalid(
                eid,
                "not signed, and this subscriber accepts only signed events; is the "
                "publisher running with --signing-key-file ($HOTRELOAD_SIGNING_KEY_FILE)?",
            )
        if event.kid:
            secret = self.signing_keys.get(event.kid)
            if secret is None:
                raise SignatureInvalid(
                    eid,
                    f"signed with key id {event.kid[:32]!r}, not with this subscriber's "
                    f"({', '.join(self.signing_keys)}); give the subscriber the publisher's "
                    "current signing key (during a rotation: the old and the new one)",
                )
            candidates = [secret]
        else:
            candidates = list(self.signing_keys.values())
        claimed = event.sig.encode()
        for secret in candidates:
            expected = sign(secret, self.key, event.version, event.sha256, event.published_at)
            if hmac.compare_digest(expected.encode(), claimed):
                return
        raise SignatureInvalid(
            eid,
            "the signature does not verify: the entry was forged or altered after it was signed",
        )

    def use_fallback(self, content: bytes) -> None:
        """Apply the fallback file's content (raises what the callback raised)."""
        self.apply(content)
        running = Running(
            content=content, sha256=sha256_hex(content), version=0, entry_id="", source="fallback"
        )
        self._set_running(running, counted=True)

    def status(self, *, stopped: bool = False) -> Status:
        """What the operator sees: a rejected newest version outranks where the config came
        from, because it is what needs attention."""
        snap = self.state
        if stopped:
            return "stopped"
        if snap.rejection is not None:
            return "rejected"
        if snap.running is None:
            return "starting"
        return "fallback" if snap.running.source == "fallback" else "applied"

    def reconcile_newest(self, newest: tuple[object, object] | None) -> bool:
        """Check the stream's newest entry (``None``: the stream is empty) against the cursor.

        A stream deleted and re-created while the subscriber stayed connected can hide new
        entries behind the cursor: their ids may be lower (another clock) or even equal (same
        millisecond) to the cursor's. An empty stream resets the cursor to the start; a newest
        entry behind the cursor, or at it with other content, returns True: resync.
        """
        if newest is None:
            if self.cursor.entry_id != ZERO_ID:
                self._log.info("%s: the stream is empty; following it from its start", self.key)
                self.cursor = Cursor()
            return False
        entry_id, claimed = _reasons.as_text(newest[0]), _reasons.claimed(newest[1], "sha256")
        order = compare_ids(entry_id, self.cursor.entry_id)
        if order < 0 or (order == 0 and claimed != self.cursor.claimed_sha256):
            self._log.warning(
                "%s: the stream was reset behind the subscriber (newest entry %s, position %s); "
                "resyncing",
                self.key,
                entry_id,
                self.cursor.entry_id,
            )
            return True
        return False

    def worker_state(
        self,
        *,
        stopped: bool = False,
        heartbeat_interval: float,
        started_at: int,
        pid: int,
        host: str,
    ) -> WorkerState:
        snap = self.state
        running, rejection = snap.running, snap.rejection
        return WorkerState(
            worker=self.worker,
            status=self.status(stopped=stopped),
            version=running.version if running else 0,
            sha256=running.sha256 if running else "",
            error=rejection.error if rejection else "",
            rejected_version=rejection.version if rejection else 0,
            heartbeat=now_ms(),
            heartbeat_interval=heartbeat_interval,
            started_at=started_at,
            pid=pid,
            host=host,
        )

    # -- state changes, called by Walk ---------------------------------------------------

    def _set_running(self, running: Running, *, counted: bool) -> None:
        previous = self.state.running
        if previous is not None and 0 < running.version < previous.version:
            # Versions only go backwards when the stream was reset (the publisher restarts
            # at 1) or a walk-back landed on an older version; worth a line in the log.
            self._log.info(
                "%s: version went back from %d to %d (stream reset or walk-back)",
                self.key,
                previous.version,
                running.version,
            )
        if counted:
            self.state = replace(
                self.state,
                running=running,
                reload_count=self.state.reload_count + 1,
                last_reload_time=time.time(),
            )
        else:
            self.state = replace(self.state, running=running)

    def _count_error(self) -> None:
        self.state = replace(self.state, error_count=self.state.error_count + 1)

    def _set_rejection(self, rejection: Rejection | None) -> None:
        self.state = replace(self.state, rejection=rejection)


class Walk:
    """One newest-first pass over entries; feed it with :meth:`step`, then :meth:`finish`.

    ``acks`` collects the reports to write, ``reasons`` the rejection texts (for
    ``NoAcceptableConfig``), ``seen`` how many entries were examined.
    """

    def __init__(self, core: SubscriberCore, *, limit: int, stop_at: Cursor | None) -> None:
        self._core = core
        self._limit = limit
        self._stop_at = stop_at
        self._newest: Cursor | None = None
        self._rejection: Rejection | None = None  # the newest one rejected in this walk
        self.acks: list[Ack] = []
        self.reasons: list[str] = []
        self.seen = 0
        self.untrusted = 0  # entries rejected by the signature check
        self.settled = False  # ended on an entry that now runs (accepted or unchanged)
        self.done = False

    def step(self, entry_id: bytes | str, fields: object) -> bool:
        """Decide one entry (older than the previous one); False once the walk is over."""
        if self.done:
            return False
        eid = _reasons.as_text(entry_id)
        claimed = _reasons.claimed(fields, "sha256")
        if self._newest is None:
            self._newest = Cursor(eid, claimed)
        stop_at = self._stop_at
        if stop_at is not None and (eid, claimed) == (stop_at.entry_id, stop_at.claimed_sha256):
            # Already decided before this walk (e.g. a resync after a reconnect that
            # changed nothing): everything older was handled then, and the state recorded
            # then (running, maybe with that entry rejected) still holds.
            self.done = True
            return False
        self.seen += 1
        try:
            event = self._decode(eid, fields)
        except MalformedEntry as exc:
            if isinstance(exc, SignatureInvalid):
                self.untrusted += 1
            self._reject(eid, _reasons.claimed_version(fields), claimed, str(exc), published_at=0)
            return self._more()
        running = self._core.state.running
        if running is not None and event.sha256 == running.sha256:
            self._adopt(event, running)
            return self._more()
        try:
            apply_ms = self._core.apply(event.content)
        except Exception as exc:  # noqa: BLE001 -- any exception from the callback rejects
            error = _reasons.describe(exc)
            if event.sensitive:
                error = _reasons.redact(error, event.content)
            self._reject(eid, event.version, event.sha256, error, published_at=event.published_at)
            return self._more()
        self._accept(event, apply_ms)
        return self._more()

    def finish(self) -> None:
        """Record where the subscriber now is and whether the newest entry is rejected."""
        core = self._core
        # No entry at all means an empty (or deleted) stream: read it from the start, so a
        # re-created stream is followed whatever ids it gets.
        core.cursor = self._newest if self._newest is not None else Cursor()
        if self._rejection is not None:
            core._set_rejection(self._rejection)
        elif self.settled:
            core._set_rejection(None)
        self.done = True

    # -- internals -----------------------------------------------------------------------

    def _more(self) -> bool:
        if self.seen >= self._limit:
            self.done = True
        return not self.done

    def _decode(self, eid: str, fields: object) -> Event:
        # decode_event checks the shape itself: a non-dict entry is a MalformedEntry
        event = decode_event(eid, fields)  # type: ignore[arg-type]
        if event.key != self._core.key:
            raise MalformedEntry(
                eid, f"entry is for config key {event.key!r}, not {self._core.key!r}"
            )
        if self._core.signing_keys:
            self._core.verify_signature(event)
        return event

    def _adopt(self, event: Event, running: Running) -> None:
        """The entry carries the content already running: acknowledge, no callback."""
        self._core._set_running(
            Running(
                content=running.content,
                sha256=running.sha256,
                version=event.version,
                entry_id=event.id,
                source="redis",
            ),
            counted=False,
        )
        if self._core.metrics is not None:
            self._core.metrics.record_version(self._core.key, event.version)
        self.acks.append(self._ack(event, "applied", unchanged=True))
        self.settled = self.done = True

    def _accept(self, event: Event, apply_ms: float) -> None:
        running = Running(
            content=event.content,
            sha256=event.sha256,
            version=event.version,
            entry_id=event.id,
            source="redis",
        )
        self._core._set_running(running, counted=True)
        if self._core.metrics is not None:
            self._core.metrics.record_applied(self._core.key, event.version, apply_ms)
        self.acks.append(self._ack(event, "applied", apply_ms=apply_ms))
        self.settled = self.done = True
        self._core._log.info(
            "%s: applied version %d (%d bytes, %.1f ms in the callback)",
            self._core.key,
            event.version,
            len(event.content),
            apply_ms,
        )

    def _reject(
        self, eid: str, version: int, sha256: str, error: str, *, published_at: int
    ) -> None:
        core = self._core
        core._count_error()
        if core.metrics is not None:
            core.metrics.record_rejected(core.key)
        core._log.warning(
            "%s: rejected version %s (entry %s), keeping the running config: %s",
            core.key,
            version or "?",
            eid,
            error,
        )
        if self._rejection is None:
            self._rejection = Rejection(version=version, entry_id=eid, error=error)
        self.reasons.append(f"version {version or '?'} ({eid}): {error}")
        self.acks.append(
            Ack(
                worker=core.worker,
                version=version,
                sha256=sha256,
                status="rejected",
                error=error,
                entry_id=eid,
                at=now_ms(),
                published_at=published_at,
            )
        )

    def _ack(
        self,
        event: Event,
        status: Literal["applied", "rejected"],
        *,
        apply_ms: float = 0.0,
        unchanged: bool = False,
    ) -> Ack:
        return Ack(
            worker=self._core.worker,
            version=event.version,
            sha256=event.sha256,
            status=status,
            entry_id=event.id,
            at=now_ms(),
            apply_ms=apply_ms,
            published_at=event.published_at,
            unchanged=unchanged,
        )
