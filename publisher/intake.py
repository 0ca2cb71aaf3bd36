"""The daemon's mailbox: the newest content of every key, and which keys still need publishing.

Watchers report from their own threads and must never wait for Redis; the publishing loop runs
on the caller's thread and may be stuck in backoff for minutes. Between them sits this one
object: a watcher's report only records the newest content per key, marks the key pending
and wakes the loop; the loop takes the pending keys, publishes, and clears each key whose
content did not change meanwhile. So while Redis is away only the newest content per key is
kept, and the first publish after Redis returns is the current config, not every
intermediate one. Anything else that needs keys published again (a new connection, a new
signing key, a stream found missing) marks them here too.

Snapshots (``--snapshot NAME[=DIR]``): a directory is also recorded as ONE key ``NAME`` whose
content is every key of the directory, all read from the same resolved ``..data`` target,
encoded by ``subscriber.protocol.encode_snapshot`` (deterministic, so an unchanged ConfigMap
is skipped by compare-and-publish). One kubelet swap is one snapshot event: a worker never
sees half of an update. A swap that leaves some file unreadable records nothing (the previous
snapshot stays; logged). From here on a snapshot key is a key like any other.

Keys that cannot be read (a permission, a symlink loop, a file over the size limit; the watcher
logs each once) are tracked here too: each time a key becomes unreadable it is counted
(``on_unreadable(key, reason)``, reason ``unreadable`` or ``too_large``: the daemon's metrics),
and ``blocked`` names those that never had a content to publish, so ``/readyz`` does not claim
a config is published that no worker can get. One that had a content keeps its last version in
Redis, which is what the workers run; it is counted and logged, not a reason to be unready.

Content is never logged here, sensitive or not: only names and directories.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from publisher._mount import ConcurrentSwaps, read_mount, resolve_target
from publisher.plan import Plan
from publisher.watcher import MountContent
from subscriber.errors import ConfigurationError
from subscriber.keys import validate_key
from subscriber.protocol import encode_snapshot, sha256_hex

__all__ = ["Intake", "KeyState", "Newest"]

logger = logging.getLogger(__name__)


@dataclass
class KeyState:
    """What the daemon knows about one key (changed only under the intake's lock)."""

    content: bytes
    sha256: str
    directory: str
    refused_sha256: str = ""  # too large: reported once, not retried until it changes
    version: int = 0  # the version Redis holds this key's content as, as of the last publish
    snapshot: bool = False  # a whole directory as one key (``--snapshot``)
    target: str | None = None  # the ``..data`` target the content was read from (kubelet)
    # ... as of its directory's report number ``reports`` (``Intake.target_of``): a key's
    # own target is set when it is read alone; one report of 1,000 keys sets none of them
    reports: int = 0
    # the content ``seen_for`` (a sha256) and what the daemon knew of the stream before it
    # read it (``Intake.seen``), until a publish of it went through
    seen_for: str = ""
    seen: str = ""


class _Unreadable(NamedTuple):
    """Why a key cannot be read now."""

    directory: str
    reason: str  # the metric's label: "too_large" or "unreadable"
    why: str  # for people: the error, without the path

    @classmethod
    def of(cls, directory: str, exc: OSError) -> _Unreadable:
        reason = "too_large" if exc.errno == errno.EFBIG else "unreadable"
        return cls(directory, reason, f"cannot be read ({exc.strerror or exc})")


def _is_key(name: str) -> bool:
    try:
        validate_key(name)
    except ConfigurationError:
        return False  # never published anyway (the intake says so when it shows up readable)
    return True


@dataclass(frozen=True, slots=True)
class Newest:
    """One pending key's content to publish now."""

    content: bytes
    sha256: str
    directory: str
    version: int  # the last version published or found (0: none yet)


class Intake:
    """The newest content per key and the pending set (see the module docstring).

    ``accept`` and ``mark`` may be called from any thread; the rest is the loop's side.
    """

    def __init__(
        self, plan: Plan, on_unreadable: Callable[[str, str], None] = lambda _key, _why: None
    ) -> None:
        self._plan = plan
        self._on_unreadable = on_unreadable
        self.keys: dict[str, KeyState] = {}  # read without the lock: the loop and tests only
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._wake = threading.Event()
        self._unreadable: dict[str, _Unreadable] = {}
        self._names: tuple[str, ...] = ()  # sorted(self.keys), redone when a key is added
        self._coming: set[str] = set()  # directories whose floors the loop reads early
        # directory -> (reports accepted, the ``..data`` target of the last): the target of
        # every key of it not read alone since (``target_of``)
        self._reports: dict[str, tuple[int, str | None]] = {}

    # ------------------------------------------------------------------ any thread
    def accept(self, directory: str, mount: MountContent, *, wake: bool = True) -> None:
        """Record the newest content of each changed key of ``directory`` (watcher threads);
        ``wake=False``: the caller publishes it now (``Daemon._delivered``), not the loop."""
        per_key = self._plan.per_key
        wanted = per_key.get(directory)
        with self._lock:
            self._track_unreadable(directory, mount)
            for name in self._plan.snapshots_of.get(directory, ()):
                self._accept_snapshot(name, directory, mount)
            count = self._reports.get(directory, (0, None))[0] + 1
            self._reports[directory] = (count, mount.target)  # every key's, changed or not
            for name in mount.changed if directory in per_key else ():
                if wanted is not None and name not in wanted:
                    continue  # watched for a snapshot; only the named files per key
                content = mount.files.get(name)
                if content is None or not self._claim(name, directory):
                    continue
                state = self.keys.get(name)
                digest = sha256_hex(content)
                if state is None:
                    self.keys[name] = KeyState(content, digest, directory)
                    self._names = ()
                elif state.sha256 != digest:
                    state.content, state.sha256 = content, digest
                else:
                    continue
                self._pending.add(name)
        for name in mount.removed if directory in per_key else ():
            logger.info("%s disappeared from %s; its last version stays in Redis", name, directory)
        if wake:
            self._wake.set()

    def mark(self, names: Iterable[str] | None = None) -> None:
        """Publish ``names`` (None: every key) again, changed or not; wakes the loop."""
        with self._lock:
            self._pending.update(self.keys if names is None else names)
        self._wake.set()

    def names_in(self, directory: str) -> list[str]:
        """The keys read from ``directory`` (kubelet writes a new version of it: the daemon
        asks for their workers' floors before the swap, ``publisher._earlyfloor``)."""
        with self._lock:
            return [name for name, state in self.keys.items() if state.directory == directory]

    def coming(self, directory: str) -> None:
        """Kubelet writes a new version of ``directory`` and its floors could not be asked for
        on watchdog's thread (``publisher._earlyfloor``: a cluster, many workers): wakes the
        loop, which reads what the workers of its keys have seen before the swap."""
        with self._lock:
            self._coming.add(directory)
        self._wake.set()

    def take_coming(self) -> list[str]:
        """The keys of the directories said ``coming`` since the last call."""
        with self._lock:
            if not self._coming:
                return []
            coming, self._coming = self._coming, set()
            return [name for name, state in self.keys.items() if state.directory in coming]

    def wake(self) -> None:
        """End the loop's current ``wait`` (e.g. to stop)."""
        self._wake.set()

    def unreadable(self) -> dict[str, str]:
        """Keys that cannot be read now: key -> ``unreadable`` or ``too_large``."""
        with self._lock:
            return {name: problem.reason for name, problem in sorted(self._unreadable.items())}

    def blocked(self) -> dict[str, str]:
        """Keys that cannot be read and never had a content to publish: key -> why."""
        with self._lock:
            return {
                name: f"{problem.why} in {problem.directory}"
                for name, problem in sorted(self._unreadable.items())
                if name not in self.keys
            }

    # ------------------------------------------------------------------ the loop
    def names(self) -> list[str]:
        """Every key known so far, sorted (a new list: the caller may keep or change it).

        Keys are only ever added, so the sorted order is kept and redone only when one is:
        the loop, the ack follower and the ``:control`` reader ask several times a second, and
        sorting 1,000 names each time was a visible part of an idle daemon's CPU."""
        with self._lock:
            if len(self._names) != len(self.keys):
                self._names = tuple(sorted(self.keys))
            return list(self._names)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def wait(self, timeout: float) -> None:
        """Sleep until something arrives (``accept``, ``mark``, ``wake``) or ``timeout``."""
        self._wake.wait(timeout)
        self._wake.clear()

    def newest(self, name: str) -> Newest | None:
        """What to publish for pending ``name`` now; None (and no longer pending) when this
        content was refused as too large before.

        When kubelet swapped ``..data`` since the content was read and the watcher has not
        reported it yet, the mount is read again: publishing what the mount held a moment ago
        could put an older content over a newer one, which a second daemon on the same mount
        (or a pod of the same Deployment sharing the Redis) may already have published, and
        workers would briefly go back. One readlink per publish; a re-read only when a swap
        raced the publish.
        """
        with self._lock:
            state = self.keys[name]
            content, digest = state.content, state.sha256
        if digest == state.refused_sha256:
            self.done(name, digest)
            return None
        fresh = self._reread_if_stale(name, state)
        if fresh is not None:
            content, digest = fresh
        return Newest(content, digest, state.directory, state.version)

    def published(self, name: str, version: int, digest: str = "", behind: bool = False) -> None:
        """Redis holds ``name``'s content as ``version`` (written or found), or the publish
        of ``digest`` went through (answered: written, found, superseded; ``behind``: its
        seen is kept, so its resyncs are answered behind again, the base unmoved)."""
        with self._lock:
            state = self.keys[name]
            state.version = version
            if state.seen_for == digest and not behind:
                state.seen = ""  # decided: from now on as any publish of a known content

    def seen(self, name: str, digest: str, early: Callable[[str], str]) -> str:
        """What the daemon knew of ``name``'s stream before it read the content ``digest``
        (``Publisher.publish``'s ``seen``): ``early(name)``, the stream's newest entry asked
        for while kubelet wrote it, for a content met first now (asked only then: another
        publish of a known content leaves it to the swap under way); kept for the retries of
        its publish (a lost connection, a backoff) until one is answered other than behind,
        so a retry never passes what was learnt after the read."""
        with self._lock:
            state = self.keys[name]
            if state.seen_for == digest:
                return state.seen
        asked = early(name)  # outside the lock: may wait for Redis's answer
        with self._lock:
            if state.seen_for != digest:
                state.seen_for, state.seen = digest, asked
            return state.seen

    def refused(self, name: str, digest: str) -> None:
        """Too large: not pending again until the content changes."""
        with self._lock:
            self.keys[name].refused_sha256 = digest
        self.done(name, digest)

    def done(self, name: str, digest: str) -> None:
        """The content ``digest`` of ``name`` is dealt with: no longer pending, unless a newer
        content arrived while it was published."""
        with self._lock:
            if self.keys[name].sha256 == digest:
                self._pending.discard(name)

    # ------------------------------------------------------------------ internals
    def _track_unreadable(self, directory: str, mount: MountContent) -> None:
        """Note which keys of ``directory`` cannot be read now; count each that just became
        so, or unreadable for another reason (with ``self._lock`` held)."""
        now: dict[str, _Unreadable] = {}
        wanted = self._plan.per_key.get(directory, frozenset())
        for name, exc in sorted(mount.unreadable.items()):
            problem = _Unreadable.of(directory, exc)
            if (wanted is None or name in wanted) and _is_key(name):
                now[name] = problem
            for snapshot in self._plan.snapshots_of.get(directory, ()):
                now.setdefault(snapshot, problem._replace(why=f"{name}: {problem.why}"))
        for name, problem in now.items():
            before = self._unreadable.get(name)
            if before is None or before.reason != problem.reason:
                self._on_unreadable(name, problem.reason)
        self._unreadable = {
            **{n: p for n, p in self._unreadable.items() if p.directory != directory},
            **now,
        }

    def _accept_snapshot(self, name: str, directory: str, mount: MountContent) -> None:
        """Record the whole directory as snapshot ``name`` (with ``self._lock`` held)."""
        if mount.unreadable:
            # files then holds the previous content of those keys: a mix, never published
            logger.error(
                "snapshot %s: %s in %s could not be read (%s); the previous snapshot stays",
                name,
                ", ".join(sorted(mount.unreadable)),
                directory,
                "; ".join(str(e.strerror or e) for e in mount.unreadable.values()),
            )
            return
        content = encode_snapshot(mount.files)
        digest = sha256_hex(content)
        state = self.keys.get(name)
        if state is None:
            self.keys[name] = KeyState(
                content, digest, directory, snapshot=True, target=mount.target
            )
            self._names = ()
            self._pending.add(name)
            return
        state.target = mount.target
        if state.sha256 != digest:
            state.content, state.sha256 = content, digest
        else:
            return
        self._pending.add(name)

    def _claim(self, name: str, directory: str) -> bool:
        """Whether ``name``, found in ``directory``, may be published from there."""
        if name in self._plan.snapshots:
            logger.error(
                "%s appeared in %s but is the name of a snapshot (--snapshot); ignored",
                name,
                directory,
            )
            return False
        state = self.keys.get(name)
        if state is not None and state.directory != directory:
            logger.error(
                "%s appeared in %s but is already published from %s; ignored",
                name,
                directory,
                state.directory,
            )
            return False
        try:
            validate_key(name)
        except ConfigurationError as exc:
            logger.warning("%s: not published: %s", directory, exc)
            return False
        return True

    def target_of(self, state: KeyState) -> str | None:
        """The ``..data`` target ``state``'s content was read from (None: not a kubelet
        volume): its own if read alone since its directory's last report, else that report's
        (with ``self._lock`` held, or on the loop's thread)."""
        if state.snapshot:
            return state.target
        count, target = self._reports.get(state.directory, (0, None))
        return state.target if state.reports == count else target

    def _reread_if_stale(self, name: str, state: KeyState) -> tuple[bytes, str] | None:
        """The content the mount holds now if it moved on from its target, else None."""
        with self._lock:
            target = self.target_of(state)
        if target is None:
            return None
        try:
            current = resolve_target(state.directory)
            if current is None or current == target:
                return None
            read = read_mount(state.directory, None if state.snapshot else [name], ())
        except (OSError, ConcurrentSwaps):
            return None  # the watcher will report whatever happened
        if state.snapshot:
            if read.unreadable:
                return None
            content: bytes | None = encode_snapshot(read.files)
        else:
            content = read.files.get(name)
        if content is None:
            return None
        digest = sha256_hex(content)
        with self._lock:
            state.content, state.sha256, state.target = content, digest, read.target
            state.reports = self._reports.get(state.directory, (0, None))[0]
        logger.debug("%s: the mount moved on to %s before publishing; read again", name, current)
        return content, digest
