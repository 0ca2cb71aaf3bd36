"""What a subscriber decides, independent of how it talks to Redis.

The transports (the threaded ``Subscriber`` in ``client.py``, the asyncio ``AsyncSubscriber``
in ``aio.py``) fetch entries and write reports; everything they decide about entries lives
here, free of I/O, so both behave the same: verify each entry through the wire contract,
dedupe by content hash, walk back from the newest entry to the newest one the callback
accepts, and build the ``Ack`` and ``WorkerState`` records. What the decisions produce is
held in the immutable values of ``_state`` (the running config, the cursor, the
introspection :class:`~subscriber._state.State`); the texts of rejections are ``_reasons``'.

Every pass over entries is a :class:`~subscriber._walk.Walk`, read newest entry first and
decided in version order (``_walk`` says why: versions only go up):

- ``start()`` replays the history: the highest version the callback accepts runs.
- after a reconnect, a resync: the same pass, which also stops at the entry the subscriber
  had already reached (its :class:`Cursor`), so nothing is decided twice.
- each ``XREAD`` batch: a pass over just that batch. Applying the highest acceptable entry
  of a batch ends in the same state as applying the entries one by one would, with one
  callback instead of several. Rejected entries above it are each reported; lower ones are
  superseded, never called back, and get no ack (the worker's state shows what runs).
- a survey: after a batch of nothing but replays, the history is read again from its newest
  entry (reporting nothing twice) to tell whether the stream is behind the worker.

The subscriber keeps ``seen``, the highest version it decided: an entry at or below it is a
replay, refused and reported, and a stream whose versions all are below it leaves the worker
on its config with the status ``holding`` until a higher version arrives.

A pass settles on an entry whose content hash equals the running config's by acknowledging
it as ``unchanged`` without calling back: hashes, not ids, decide sameness, because a reset
stream reuses ids.

With signing keys, an entry must also carry a signature that verifies (in constant time) with
the key its ``kid`` names before anything else happens to it; an unsigned, forged or
wrong-key entry is a rejection like a malformed one (reported, never applied, walked past).
An entry with an ``audience`` (a canary, rollout control) is signed over the v2 message that
covers the audience: an audience stripped or changed in Redis does not verify.

An entry whose ``audience`` does not name this worker is not for it: the walk reads past it
without a callback, an ack or a change to ``seen`` (see ``_walk``); the worker's state stays
what it was, and it reports ``audience=True`` in ``:workers`` so a publisher may choose it.
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
from typing import TYPE_CHECKING, cast

from subscriber import _reasons
from subscriber._junk import MalformedLog
from subscriber._state import (
    ZERO_ID,
    Cursor,
    LiveStatus,
    Rejection,
    Running,
    State,
    Status,
    compare_ids,
)
from subscriber._walk import Walk
from subscriber.errors import SignatureInvalid
from subscriber.protocol import (
    Event,
    WorkerState,
    decode_snapshot,
    is_snapshot,
    key_id,
    now_ms,
    sha256_hex,
    sign,
)

if TYPE_CHECKING:
    from subscriber.metrics import SubscriberMetrics

__all__ = ["Callback", "SubscriberCore", "callback_name"]

Callback = (
    Callable[[str], object]
    | Callable[[bytes], object]
    | Callable[[dict[str, str]], object]
    | Callable[[dict[str, bytes]], object]
)


def callback_name(callback: object) -> str:
    """How a log line names a callback: ``module.qualname`` (its class's for an object)."""
    named = callback if hasattr(callback, "__qualname__") else type(callback)
    module = getattr(named, "__module__", None)
    qualname = getattr(named, "__qualname__", repr(callback))
    return f"{module}.{qualname}" if module else str(qualname)


def _never(exc: BaseException) -> bool:
    return False


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
        propagates: Callable[[BaseException], bool] = _never,
    ) -> None:
        self.key = key
        # Which of a callback's exceptions stop the process rather than reject the content
        # (the transport's rule, see ``Subscriber``): they pass through every decision.
        self.propagates = propagates
        self.callback_name = callback_name(callback)  # the transport names the user's
        # time.monotonic() when the callback now running began; None while none runs. Read
        # from other threads (one float or None, swapped in one assignment).
        self.calling_since: float | None = None
        # Why the subscriber stopped when it did not stop cleanly (the follower died, or
        # stop() gave up waiting for a callback): the error of its "stopped" state.
        self.stop_reason: str | None = None
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
        self.malformed_log = MalformedLog(logger, key)
        # A batch was nothing but replays: read the history from its newest entry next, to
        # tell whether the stream is behind this worker (see resync_walk).
        self.survey_due = False

    def walk(self, *, limit: int, stop_at: Cursor | None = None, batch: bool = False) -> Walk:
        """Start a newest-first pass of at most ``limit`` entries (see the module docstring);
        ``batch``: the entries of one ``XREAD`` reply rather than the stream's history."""
        return Walk(self, limit=limit, stop_at=stop_at, batch=batch)

    def resync_walk(self, *, limit: int) -> Walk:
        """The pass after a (re)connect, down to the cursor; or a survey when one is due:
        the whole history (bounded), reporting nothing at or before the cursor again."""
        if self.survey_due:
            self.survey_due = False
            return Walk(self, limit=limit, stop_at=None, decided_up_to=self.cursor.entry_id)
        return Walk(self, limit=limit, stop_at=self.cursor)

    def apply(self, content: bytes) -> float:
        """Run the callback on ``content``; returns its duration in ms, raises its rejection."""
        self.calling_since = time.monotonic()
        try:
            return self._apply(content)
        finally:
            self.calling_since = None

    def callback_seconds(self) -> float:
        """How long the callback now running has run (0.0: none runs); any thread."""
        since = self.calling_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def _apply(self, content: bytes) -> float:
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
        # an entry with an audience is signed over the v2 message, which covers the audience
        audience = event.audience_json if event.audience is not None else None
        for secret in candidates:
            try:
                expected = sign(
                    secret,
                    self.key,
                    event.version,
                    event.sha256,
                    event.published_at,
                    audience_json=audience,
                    rollout=event.rollout,
                )
            except ValueError:  # a newline in the audience or rollout: no publisher signs that
                break
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
        """What the operator sees: a stream behind the worker, then a rejected newest
        version, outrank where the config came from, because they need attention."""
        snap = self.state
        if stopped:
            return "stopped"
        if snap.holding is not None:
            return "holding"
        if snap.rejection is not None:
            return "rejected"
        if snap.running is None:
            return "starting"
        return "fallback" if snap.running.source == "fallback" else "applied"

    def live_status(self, *, stopped: bool, slow_callback: float) -> LiveStatus:
        """:meth:`status` as the process itself sees it: also ``stalled`` while a callback
        has run for over ``slow_callback`` seconds (no report says that: the follower is
        inside the callback)."""
        if not stopped and self.callback_seconds() > slow_callback:
            return "stalled"
        return self.status(stopped=stopped)

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
            running, seen = self.state.running, self.state.seen
            if running is not None and seen > 0:
                self._set_holding(_reasons.holding(running.version, 0, empty=True, seen=seen))
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
        status = self.status(stopped=stopped)
        if status == "holding" and snap.holding is not None:
            error = snap.holding
        elif status == "stopped" and self.stop_reason is not None:
            error = self.stop_reason
        else:
            error = rejection.error if rejection else ""
        return WorkerState(
            worker=self.worker,
            status=status,
            version=running.version if running else 0,
            sha256=running.sha256 if running else "",
            error=error,
            rejected_version=rejection.version if rejection else 0,
            heartbeat=now_ms(),
            heartbeat_interval=heartbeat_interval,
            started_at=started_at,
            pid=pid,
            host=host,
            seen=snap.seen,
            audience=True,  # honours audience entries: may be chosen as a canary
            floor=True,  # its seen goes to :floor too (subscriber/_transport.py)
        )

    # -- state changes, called by Walk ---------------------------------------------------

    def _set_running(self, running: Running, *, counted: bool) -> None:
        # Only a version above seen is applied (the fallback file runs as version 0): seen
        # follows it up, and holding ends in the same swap (no reader sees the new config
        # with the old status).
        seen, holding = self._raised(running.version)
        if counted:
            self.state = replace(
                self.state,
                running=running,
                seen=seen,
                holding=holding,
                reload_count=self.state.reload_count + 1,
                last_reload_time=time.time(),
            )
        else:
            self.state = replace(self.state, running=running, seen=seen, holding=holding)

    def _count_error(self, version: int = 0, *, count: int = 1) -> None:
        """``count`` more rejections; ``version``: what they decided counts toward seen."""
        seen, holding = self._raised(version)
        self.state = replace(
            self.state, error_count=self.state.error_count + count, seen=seen, holding=holding
        )

    def _raised(self, version: int) -> tuple[int, str | None]:
        """``seen`` and the holding reason once ``version`` is decided: a version above
        seen ends holding."""
        state = self.state
        if version <= state.seen:
            return state.seen, state.holding
        if state.holding is not None:
            self._log.info("%s: no longer holding: version %d arrived", self.key, version)
        return version, None

    def _set_holding(self, reason: str | None) -> None:
        if reason == self.state.holding:
            return
        if reason is not None:
            self._log.warning("%s: %s", self.key, reason)
        elif self.state.holding is not None:
            self._log.info(
                "%s: no longer holding: the stream reached version %d again",
                self.key,
                self.state.seen,
            )
        self.state = replace(self.state, holding=reason)

    def _set_rejection(self, rejection: Rejection | None) -> None:
        if rejection != self.state.rejection:  # most passes settle with none, as before
            self.state = replace(self.state, rejection=rejection)
