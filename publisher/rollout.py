"""Rollout control in the daemon: canary, promotion, halt and rollback, carried out through
``publish.lua`` so that racing daemons write exactly one entry for each decision.

``Rollout`` is the daemon's ``Release`` (``publisher.release``) and its periodic work:

- **publish** (a mount's new content): without ``--canary``, plain compare-and-publish (the
  script still refuses a content pinned by a rollback or a halt). With it, the content goes
  first to a canary audience: N (or P % of the live workers, at least one) of the live
  workers that honour audiences (``WorkerState.audience``), chosen by a hash of worker id and
  content so racing daemons usually agree (they write one canary either way: the script
  compares contents, not audiences). The first version of a key, or no such live worker:
  everyone at once (nobody to protect). A new content while a canary runs halts that canary
  first (the stable content again, its canary content pinned), then canaries the new one.
- **due** (every check, beside ``Upkeep``): each key whose newest entry is a canary is judged
  by ``inspect.rollout.canary_progress`` from the stream, ``:workers`` and ``:acks``; promote
  or halt when it says so. Nothing is kept in memory but the first time this daemon saw each
  canary worker run the canary (for a worker whose applied ack was trimmed away): a restarted
  daemon, or another pod's, picks the canary up from Redis and says whether it resumes the
  hold or halts. Only daemons given ``--canary`` judge canaries (their ``--canary-hold``).
- **operations** (``publisher.control``: rollback, promote, halt requests; also the automatic
  decisions): each is one ``publish.lua`` call with ``expect`` = the version of the newest
  entry it was decided on; a daemon that lost the race finds the entry written (same request
  or same decision) or is told the key moved on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

from publisher._floor import read_workers, read_workers_seen
from publisher._marks import RolloutMark
from publisher._pins import Pin, Pins
from publisher._rolloutwire import CanaryPolicy
from publisher.ackwatch import AckCache
from publisher.inspect._liveness import liveness, server_now_ms
from publisher.inspect.rollout import (
    MARKS_SCRIPT,
    Marks,
    canary_progress,
    decode_state,
    read_marks,
    view_of,
)
from publisher.publish import Publisher, PublishResult
from subscriber.keys import stream_keys
from subscriber.protocol import sha256_hex

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["OpResult", "Rollout"]

logger = logging.getLogger(__name__)

Event = Callable[[str, str], None]  # (key, event: canary|promoted|halted|rolled_back|refused)


@dataclass(frozen=True, slots=True)
class OpResult:
    """What an operation did: ``ok`` (written, or found done by another daemon), the
    version of the entry, and a one-line message."""

    ok: bool
    version: int
    message: str
    written: bool = False


class Rollout:
    """The daemon's ``Release`` with rollout control (see the module docstring)."""

    def __init__(
        self,
        *,
        prefix: str,
        policy: CanaryPolicy | None,
        on_event: Event | None = None,
    ) -> None:
        self.prefix = prefix
        self.policy = policy
        self._on_event = on_event
        self._scripts: dict[int, Any] = {}  # id(client) -> MARKS_SCRIPT registered on it
        # (key, canary version) -> worker -> when this daemon first saw it run the canary
        self._first_seen: dict[tuple[str, int], dict[str, int]] = {}
        self._told: dict[str, str] = {}  # key -> the last canary situation logged
        self._acks = AckCache()  # only what is new is read every second
        self._written: set[tuple[str, int]] = set()  # (key, version) of canaries written here
        self._pins = Pins()  # for a Redis that lost them (publisher._pins)

    # ------------------------------------------------------------------ reading
    def marks(self, client: AnyRedis, key: str, count: int = 16) -> list[Marks]:
        script = self._scripts.get(id(client))
        if script is None:
            script = self._scripts[id(client)] = client.register_script(MARKS_SCRIPT)
        return read_marks(client, stream_keys(key, self.prefix).events, count=count, script=script)

    def content_of(self, client: AnyRedis, key: str, entry_id: str) -> bytes | None:
        """The content of entry ``entry_id`` if it is there and hashes to its sha256."""
        events = stream_keys(key, self.prefix).events
        raw = cast(list[Any], client.xrange(events, min=entry_id, max=entry_id, count=1))
        if not raw:
            return None
        fields = raw[0][1]
        content, digest = fields.get(b"content"), fields.get(b"sha256", b"").decode()
        if not isinstance(content, bytes) or sha256_hex(content) != digest:
            return None
        return content

    def _above(self, client: AnyRedis, publisher: Publisher, key: str) -> int:
        seen = read_workers_seen(client, stream_keys(key, self.prefix).workers)
        return max(seen.floor, publisher.highest_version.get(key, 0))

    # ------------------------------------------------------------------ Release
    def publish(
        self,
        publisher: Publisher,
        key: str,
        content: bytes,
        *,
        sensitive: bool,
        sha256: str,
        above: int,
        seen: str = "",
    ) -> PublishResult:
        client = cast("AnyRedis", publisher.client)
        publish = partial(publisher.publish, key, content, sensitive=sensitive, sha256=sha256)
        if self.policy is None and self._pins.get(key) is None:
            # no canary to judge, no pin of this daemon's to write again: nothing to read first
            # (a script call less; pins and halts are decided in publish.lua, refusals after)
            plain = publish(above=above, seen=seen)
            if plain.refused:
                self._refused(client, key, plain, self.marks(client, key))
            return plain
        marks = self.marks(client, key)
        pin = self._pins.lost(key, sha256, marks)
        if pin is not None:
            return self._restore(client, publisher, key, pin, marks, above=above)
        if self.policy is None:
            plain = publish(above=above, seen=seen)
            self._refused(client, key, plain, marks)
            return plain
        view = view_of(marks)
        known = {m.sha256 for m in marks}  # an older content: a lagging mount, or a revert
        if view.state == "canary" and view.newest is not None and sha256 not in known:
            # a new content while a canary runs: that canary ends first (halted, pinned); the
            # halt, newer than seen, is ours: the content is decided without seen
            self.halt(client, publisher, key, reason="replaced by a new content", by="")
            above, seen = max(above, self._above(client, publisher, key)), ""
            marks = self.marks(client, key)
        newest = marks[0] if marks else None
        audience = self._audience(client, key, sha256) if newest is not None else ()
        if not audience or (newest is not None and newest.sha256 == sha256):
            if newest is not None and not audience and newest.sha256 != sha256:
                logger.info("%s: no live canary-capable worker; publishing to everyone", key)
            plain = publish(above=above, seen=seen)
            self._refused(client, key, plain, marks)
            return plain
        hold = f"hold {self.policy.hold_s:g} s"
        mark = RolloutMark(rollout="canary", audience=audience, reason=hold)
        result = publish(above=above, mark=mark, seen=seen)
        self._refused(client, key, result, marks)
        stable = next((m for m in marks if m.audience is None and m.version), None)
        if result.written and stable is not None:
            stable_content = self.content_of(client, key, stable.entry_id)
            if stable_content is not None:  # what a halt would write, should Redis lose this
                self._pins.remember(
                    key,
                    Pin(
                        sha256, result.version, stable_content, stable.sha256, stable.sensitive,
                        "halt", result.version,
                        f"Redis lost canary v{result.version} before it was proven",
                    ),
                )  # fmt: skip
        if result.written:
            logger.info(
                "%s: canary v%d for %d worker(s) (%s), hold %g s",
                key,
                result.version,
                len(audience),
                ", ".join(audience[:5]) + (", ..." if len(audience) > 5 else ""),
                self.policy.hold_s,
            )
            self._event(key, "canary")
            self._written.add((key, result.version))
        return result

    def _refused(
        self, client: AnyRedis, key: str, result: PublishResult, marks: list[Marks]
    ) -> None:
        """Refused by a pin: remember it (for a Redis that loses it)."""
        newest = marks[0] if marks else None
        if not result.refused or result.refused == "moved" or newest is None:
            return
        known = self._pins.get(key)
        if known is not None and known.version == newest.version:
            return
        content = self.content_of(client, key, newest.entry_id)
        if content is not None and newest.version == result.version:
            self._pins.remember(
                key,
                Pin(
                    result.sha256, newest.version, content, newest.sha256, newest.sensitive,
                    newest.rollout, newest.rollout_of, newest.reason,
                ),
            )  # fmt: skip

    def _restore(
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        pin: Pin,
        marks: list[Marks],
        *,
        above: int,
    ) -> PublishResult:
        """Write ``pin`` again: the stream lost it (see ``publisher._pins``)."""
        mark = RolloutMark(
            rollout=pin.rollout,
            rollout_of=pin.rollout_of,
            rollout_sha256=pin.sha256,
            expect=marks[0].version if marks else 0,
            reason=pin.reason,
        )
        result = publisher.publish(
            key, pin.content, sensitive=pin.sensitive, sha256=pin.content_sha256, above=above,
            mark=mark,
        )  # fmt: skip
        if result.written:
            logger.warning(
                "%s: the stream lost its %s of v%d (Redis restarted empty or older): written "
                "again as v%d, so the mount's content stays %s",
                key,
                pin.rollout,
                pin.rollout_of,
                result.version,
                "rolled back" if pin.rollout == "rollback" else "halted",
            )
            self._pins.remember(key, dataclasses.replace(pin, version=result.version))
        return result

    def _audience(self, client: AnyRedis, key: str, sha256: str) -> tuple[str, ...]:
        """The canary workers for a content: live workers honouring audiences, the policy's
        share of all live workers, picked by a hash of (worker, content)."""
        assert self.policy is not None
        now = server_now_ms(client)
        live, capable = 0, []
        for raw_field, raw_value in read_workers(client, stream_keys(key, self.prefix).workers):
            state = decode_state(raw_value)
            if state is None or liveness(state, now) != "live":
                continue
            live += 1
            if state.audience:
                # a worker whose last heartbeat is late (SIGKILLed a moment ago, still "live"
                # for 3 beats) is chosen last: it would halt the canary by going stale
                late = now - state.heartbeat > 1500 * max(state.heartbeat_interval, 1.0)
                capable.append((late, raw_field.decode("utf-8", "replace")))
        size = min(self.policy.size(live), len(capable))
        ranked = [
            worker
            for _, worker in sorted(
                capable, key=lambda c: (c[0], hashlib.sha256(f"{c[1]}\n{sha256}".encode()).digest())
            )
        ]
        return tuple(sorted(ranked[:size]))

    # ------------------------------------------------------------------ periodic
    def due(self, client: AnyRedis, publisher: Publisher, names: list[str]) -> bool:
        """Judge every key's running canary (daemons with ``--canary`` only); whether one is
        still running."""
        if self.policy is None:
            return False
        running = False
        for key in names:
            marks = self.marks(client, key, count=1)  # the newest says whether a canary runs
            view = view_of(marks)
            if view.state != "canary" or view.newest is None:
                self._told.pop(key, None)
                for done in [k for k in self._first_seen if k[0] == key]:
                    del self._first_seen[done]  # decided (by this daemon or another)
                self._written = {k for k in self._written if k[0] != key}
                continue
            canary = view.newest
            keys = stream_keys(key, self.prefix)
            states = dict(read_workers(client, keys.workers))
            now = server_now_ms(client)
            first = self._first_seen.setdefault((key, canary.version), {})
            for worker in canary.audience or ():
                state = decode_state(states.get(worker.encode()))
                if state is not None and state.version == canary.version:
                    first.setdefault(worker, now)
            acks = self._acks.read(client, keys.acks)
            progress = canary_progress(
                canary,
                {w: states.get(w.encode()) for w in canary.audience or ()},
                acks,
                now_ms=now,
                hold_ms=round(self.policy.hold_s * 1000),
                first_seen=first,
            )
            if progress.decision == "wait":
                running = True
                situation = f"v{canary.version}"
                if self._told.get(key) != situation:
                    self._told[key] = situation
                    mine = (key, canary.version) in self._written
                    logger.info(
                        "%s: canary v%d (hold %g s): %s; %s",
                        key,
                        canary.version,
                        self.policy.hold_s,
                        progress.reason,
                        "holding" if mine else "resuming its hold (picked up from Redis)",
                    )
                continue
            decide = self.promote if progress.decision == "promote" else self.halt
            outcome = decide(client, publisher, key, reason=progress.reason, by="")
            situation = f"v{canary.version} {outcome.message}"
            if not outcome.ok and self._told.get(key) != situation:
                self._told[key] = situation  # said once; tried again every check
                logger.warning("%s: cannot %s canary v%d: %s", key, progress.decision,
                               canary.version, outcome.message)  # fmt: skip
        return running

    # ------------------------------------------------------------------ operations
    def promote(
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        *,
        reason: str,
        by: str,
        request: str = "",
    ) -> OpResult:
        return self._end_canary(
            client, publisher, key, "promote", reason=reason, by=by, request=request
        )

    def halt(
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        *,
        reason: str,
        by: str,
        request: str = "",
    ) -> OpResult:
        return self._end_canary(
            client, publisher, key, "halt", reason=reason, by=by, request=request
        )

    def _end_canary(
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        op: Literal["promote", "halt"],
        *,
        reason: str,
        by: str,
        request: str,
    ) -> OpResult:
        marks = self.marks(client, key)
        if (done := _done(key, marks, request)) is not None:
            return done
        view = view_of(marks)
        canary = view.newest
        if view.state != "canary" or canary is None:
            return OpResult(False, view.version, f"{key} has no canary to {op} ({view.state})")
        target = canary if op == "promote" else view.stable
        if target is None:
            return OpResult(False, canary.version, f"{key}: no stable version before the canary")
        content = self.content_of(client, key, target.entry_id)
        if content is None:
            return OpResult(False, canary.version, f"{key} v{target.version} cannot be read")
        mark = RolloutMark(
            rollout=op,
            rollout_of=canary.version,
            rollout_sha256=canary.sha256,
            request=request,
            expect=canary.version,
            reason=reason + (f" (by {by})" if by else ""),
        )
        done_as = "promoted" if op == "promote" else "halted"
        return self._carry_out(client, publisher, key, content, target, mark, done_as)

    def rollback(
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        *,
        to: int = 0,
        by: str = "",
        request: str = "",
    ) -> OpResult:
        marks = self.marks(client, key, count=publisher.history + 100)
        if (done := _done(key, marks, request)) is not None:
            return done
        if not marks:
            return OpResult(False, 0, f"{key} has no published version to roll back from")
        current = marks[0]
        if to:
            target = next((m for m in marks if m.version == to), None)
            if target is None:
                return OpResult(False, current.version, f"{key} has no version {to} in its history")
        else:
            target = next(
                (m for m in marks[1:] if m.audience is None and m.sha256 != current.sha256), None
            )
            if target is None:
                return OpResult(
                    False, current.version, f"{key} has no earlier content to roll back to"
                )
        if target.sha256 == current.sha256:
            return OpResult(
                False, current.version, f"{key} v{target.version} is the content running now"
            )
        content = self.content_of(client, key, target.entry_id)
        if content is None:
            return OpResult(False, current.version, f"{key} v{target.version} cannot be read")
        mark = RolloutMark(
            rollout="rollback",
            rollout_of=current.version,
            rollout_sha256=current.sha256,
            request=request,
            expect=current.version,
            reason=f"rolled back to v{target.version}'s content" + (f" by {by}" if by else ""),
        )
        return self._carry_out(client, publisher, key, content, target, mark, "rolled_back")

    def _carry_out(  # noqa: PLR0917
        self,
        client: AnyRedis,
        publisher: Publisher,
        key: str,
        content: bytes,
        source: Marks,
        mark: RolloutMark,
        event: str,
    ) -> OpResult:
        result = publisher.publish(
            key,
            content,
            sensitive=source.sensitive,
            sha256=source.sha256,
            above=self._above(client, publisher, key),
            mark=mark,
        )
        what = {"promoted": "promoted", "halted": "halted", "rolled_back": "rolled back"}[event]
        if result.refused != "moved" and mark.rollout in ("rollback", "halt"):
            self._pins.remember(
                key,
                Pin(
                    mark.rollout_sha256, result.version, content, source.sha256,
                    source.sensitive, mark.rollout, mark.rollout_of, mark.reason,
                ),
            )  # fmt: skip
        elif result.refused != "moved":
            self._pins.forget(key)  # promoted
        if result.refused == "moved":
            self._event(key, "refused")
            return OpResult(
                False, result.version, f"{key} moved on to v{result.version} meanwhile; not {what}"
            )
        if result.written:
            level = logging.INFO if event == "promoted" else logging.WARNING
            logger.log(
                level,
                "%s: %s v%d as v%d (%s)",
                key,
                what,
                mark.rollout_of,
                result.version,
                mark.reason,
            )
            self._event(key, event)
        return OpResult(True, result.version, f"{key} {what}: v{result.version}", result.written)

    def _event(self, key: str, event: str) -> None:
        if self._on_event is not None:
            self._on_event(key, event)


def _done(key: str, marks: list[Marks], request: str) -> OpResult | None:
    """The request carried out already (by another daemon sharing the Redis): its entry is
    the newest. Checked before deciding anew, which could refuse what is done."""
    if request and marks and marks[0].request == request:
        what = {"rollback": "rolled back", "promote": "promoted", "halt": "halted"}
        done = what.get(marks[0].rollout, marks[0].rollout)
        return OpResult(True, marks[0].version, f"{key} {done}: v{marks[0].version}")
    return None
