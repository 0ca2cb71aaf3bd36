"""``hotreload wait``: poll a key until every live worker runs a version, or one rejects it.

The target may not exist yet (right after ``kubectl apply`` kubelet and the publisher have
not caught up), so it is first looked up until it appears (:class:`_Awaited`), then the
workers are assessed on every poll with the acks read so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from publisher.inspect.convergence import (
    Convergence,
    Expected,
    ack_rejections,
    assess,
    server_now_ms,
    worker_rows,
)
from publisher.inspect.events import (
    SCAN_CAP,
    MalformedVersion,
    NotFound,
    RawEntry,
    acks_after,
    find_event,
    highest,
    newest_first,
    verified,
)
from publisher.inspect.rollout import Marks, read_marks
from subscriber.keys import stream_keys
from subscriber.protocol import Event

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["WaitResult", "wait_for"]


@dataclass(frozen=True, slots=True)
class WaitResult:
    convergence: Convergence  # as last seen
    timed_out: bool
    elapsed_s: float
    # what was never published within the timeout ("v9", "content 3f2a...") and the newest
    # version then (0: none); "" when the target was published
    unpublished: str = ""
    newest: int = 0
    # rollout control: the awaited canary was halted (the reason); wait exits as rejected
    halted: str = ""


def wait_for(
    client: AnyRedis,
    key: str,
    version: int | None = None,
    *,
    sha256: str | None = None,
    prefix: str,
    timeout: float,
    poll_interval: float = 0.15,
    signing_key: bytes | None = None,
) -> WaitResult:
    """Poll until every live worker runs the target or one rejects it.

    The target is ``version``, or the newest version whose content has the hex ``sha256``
    (the file a deploy just applied), or else the newest version now. A version newer than
    the newest, or a content not published yet, is first waited for within the same
    ``timeout``: right after ``kubectl apply``, kubelet and the publisher have not caught up.
    With ``sha256``, a newer entry of the same content (a revert published again) becomes
    the target as soon as it appears.

    Returns as soon as convergence or a rejection is seen, or a worker that stopped with an
    error without running the target (``Convergence.failed``), else after ``timeout`` seconds
    with ``timed_out`` (and ``unpublished`` when the target never appeared). With no live
    worker at all it keeps waiting: workers may be starting (a new pod, a gunicorn restart),
    and they replay the newest version before serving. Raises ``NotFound`` before waiting if
    the key does not exist (unless waiting for a content) or the version can never appear
    (older than the newest, yet not in the history). The newest is the highest version; with
    ``signing_key``, entries whose signature does not verify with it are ignored.
    """
    keys = stream_keys(key, prefix)
    started = time.monotonic()
    awaited = _Awaited(
        client, key, version=version, sha256=sha256, prefix=prefix, signing_key=signing_key
    )
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
    canary = _canary(client, keys.events, target)
    while True:
        if sha256 is not None:
            newer = awaited.newer_copy(target)
            if newer is not None:  # the same content published again: that is the one now
                target, rejected_by_ack = newer, {}
                canary = _canary(client, keys.events, target)
        new_acks, last_ack = acks_after(client, keys.acks, after=last_ack)
        rejected_by_ack.update(ack_rejections(new_acks, target))
        workers = worker_rows(client, key, keys, server_now_ms(client))
        if canary is not None:  # a canary's expected workers are its audience
            workers = [w for w in workers if w.worker in (canary.audience or ())]
        seen = assess(key, target, workers, rejected_by_ack)
        elapsed = time.monotonic() - started
        halt = _halt_of(client, keys.events, canary) if canary is not None else None
        if halt is not None:
            return WaitResult(seen, timed_out=False, elapsed_s=elapsed, halted=halt)
        # waiting for a content: a canary of it is not the end, its promotion is
        final = canary is None or sha256 is None
        # a worker stopped with an error never gets there: as final as a rejection
        if seen.state == "rejected" or seen.failed or (seen.state == "converged" and final):
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
        signing_key: bytes | None,
    ) -> None:
        self.client, self.key, self.keys = client, key, stream_keys(key, prefix)
        self.version, self.sha256, self.prefix = version, sha256, prefix
        self.signing_key = signing_key
        self.newest = 0
        self._scanned = ""  # entries up to this id were looked through for the content

    def describe(self) -> str:
        return f"content {self.sha256[:12]}" if self.sha256 is not None else f"v{self.version}"

    def target(self) -> Expected | None:
        """The target if published, ``None`` while it may still be; or raise ``NotFound``."""
        if self.sha256 is not None:
            return self._content()
        try:
            return Expected.of(
                find_event(
                    self.client,
                    self.key,
                    self.version,
                    prefix=self.prefix,
                    signing_key=self.signing_key,
                )
            )
        except MalformedVersion:
            raise  # published, and unusable: it will not get better
        except NotFound:
            if self.version is None or not self.client.exists(self.keys.events):
                raise  # unknown key: say so now
            self.newest = self._newest_version()
            if self.version <= self.newest:
                # published meanwhile, or trimmed from the history / malformed: ask again,
                # so only a version that is still missing is an error
                return Expected.of(
                    find_event(
                        self.client,
                        self.key,
                        self.version,
                        prefix=self.prefix,
                        signing_key=self.signing_key,
                    )
                )
            return None

    def _counts(self, entry: object) -> bool:
        if isinstance(entry, RawEntry) or not isinstance(entry, Event):
            return False
        return self.signing_key is None or verified(entry, self.signing_key)

    def newer_copy(self, target: Expected) -> Expected | None:
        """The newest (highest) entry, if it carries the awaited content under a newer
        version."""
        entry = highest(self.client, self.keys.events, self.signing_key)
        if entry is not None and entry.sha256 == self.sha256 and entry.version > target.version:
            return Expected.of(entry)
        return None

    def _content(self) -> Expected | None:
        """The highest entry with the awaited content, looking only at entries not yet seen
        (at most ``SCAN_CAP``: a replayed copy may sit after the real one)."""
        top, found = "", None
        for read, entry in enumerate(newest_first(self.client, self.keys.events)):
            entry_id = entry.entry_id if isinstance(entry, RawEntry) else entry.id
            if read >= SCAN_CAP or (self._scanned and _id_key(entry_id) <= _id_key(self._scanned)):
                break
            top = top or entry_id
            if isinstance(entry, RawEntry) or not self._counts(entry):
                continue
            self.newest = max(self.newest, entry.version)
            if entry.sha256 == self.sha256 and (found is None or entry.version > found.version):
                found = entry
        if found is not None:
            return Expected.of(found)
        self._scanned = top or self._scanned
        return None

    def _newest_version(self) -> int:
        entry = highest(self.client, self.keys.events, self.signing_key)
        return entry.version if entry is not None else 0


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def _canary(client: AnyRedis, events_key: str, target: Expected) -> Marks | None:
    """The target's entry if it is a canary (it has an audience), among the newest."""
    for marks in read_marks(client, events_key, count=32):
        if marks.version == target.version and marks.sha256 == target.sha256:
            return marks if marks.audience is not None else None
    return None


def _halt_of(client: AnyRedis, events_key: str, canary: Marks) -> str | None:
    """Why ``canary`` was halted, if the newest entry halts it."""
    newest = read_marks(client, events_key, count=1)
    if newest and newest[0].rollout == "halt" and newest[0].rollout_of == canary.version:
        return newest[0].reason or f"canary v{canary.version} halted"
    return None
