"""Watch a Kubernetes ConfigMap volume (or any directory) and report changes of its keys.

``MountWatcher`` reports content changes of the keys in one directory; ``FileWatcher`` is the
Python form of the Go ``FileWatcher`` built on it: one file, a ``callback(content)`` that may
reject, and counters.

Detection strategy; each rule answers a failure measured before (DESIGN.md, "Measured facts"):

* Watch the directory, non-recursively, with a watchdog observer of our own. Never the file or
  ``..data``: kubelet renames a new ``..data`` symlink over the old one, and watches on the file
  path or on ``..data`` missed 999 of 1000 updates.
* watchdog's thread only records which name had what kind of event and wakes our one worker
  thread, which does all the reading. Reads must never feed back as events (reading on every
  event once turned one change into 38,000 events in 2 s): the kernel is asked only for create,
  delete, move, modify and close-after-write, never for open or close-after-read.
* Kubelet's ``..data`` swap is atomic and is read at once, with no settle delay. Keys of a
  kubelet volume are read through the resolved ``..data`` target so that one snapshot never mixes
  two versions, and a target never changes once ``..data`` points at it (see ``publisher._mount``).
  A deleted key is reported as removed at once (``FileWatcher`` keeps its content meanwhile).
* Nothing makes a plain directory's files atomic: a reader can catch an in-place rewrite
  (truncate + write) half done. So a file is not read while a writer has it open (modify or
  create seen, no IN_CLOSE_WRITE yet), and its new content counts only once two reads at least
  ``settle`` apart agree (same bytes, inode, size, mtime and ctime). A quiet window alone handed
  out torn files when the writer paused mid-write; the close alone did when rewrites came back
  to back or a re-create raced a delete, and trusting a rename (an editor's save) did when an
  in-place write followed it: the event of the next write can still be on its way when the
  reader runs (10-30 ms here with one busy thread), and ext4 shows a file being truncated as
  empty before it updates its timestamps. Polling has no close events, so it relies on the
  double read alone; with inotify a write that never reports its close (a writer keeping the
  file open, a lost event) is read after ``resync_interval`` of quiet. The double read assumes
  a write's event reaches us within ``settle`` (here: p99 2 ms idle, 19 ms and at worst 103 ms
  with both CPUs saturated by other processes); a writer stalled mid-write while its event is
  later still can be seen torn, so ``settle`` must stay above the event delay the machine can
  have. Kubelet volumes do not depend on any of this.
* Content is compared byte for byte (the SHA-256 of equal bytes is equal), so events that
  change nothing report nothing. Reports come at most once per ``settle``: the first change
  after a quiet period is reported at once (a lone kubelet swap is never delayed), the rest of a
  burst is folded into one report per window, ending with the final state.
* Every ``resync_interval`` everything is read again (repairs any missed event, such as an
  inotify queue overflow) and the watch itself is checked: a directory replaced by another
  inode, an emitter that stopped because the directory was deleted, or a dead observer gets a
  new observer. A missing directory is looked for every half second, keeping the current content
  meanwhile. If no inotify instance or watch can be had (EMFILE: max_user_instances; ENOSPC:
  max_user_watches), watchdog's polling observer takes over, with a warning saying why.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType, TracebackType
from typing import Self

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import BaseObserver

from publisher._mount import (
    DATA_LINK,
    ConcurrentSwaps,
    FileVersion,
    MountRead,
    is_mount_point,
    is_regular_file,
    observer_healthy,
    read_mount,
    start_observer,
    stop_observer,
)
from subscriber.errors import ConfigurationError, InitialLoadError

__all__ = ["FileWatcher", "MountWatcher", "Snapshot"]

_logger = logging.getLogger(__name__)

_MOUNTINFO = "/proc/self/mountinfo"
"""Where mount points are listed; a test points this at a file of its own."""

_MISSING_DIRECTORY_POLL = 0.5
"""Seconds between two looks for a watched directory that disappeared."""

_ERROR_BACKOFF = 1.0
"""Seconds the worker waits after an unexpected error before trying again."""

_INITIAL_READ_ATTEMPTS = 5
"""How often ``start()`` re-reads a key that was being written while it was read."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The content of a watched directory's keys at one moment."""

    directory: str
    """The watched directory (absolute)."""
    target: str | None
    """The resolved ``..data`` target of a kubelet volume; None for a plain directory."""
    files: Mapping[str, bytes] = field(repr=False)  # config content stays out of logs
    """Key -> content for every selected key that exists now, all from one ``..data`` target."""
    changed: frozenset[str]
    """Keys whose content differs from the previous delivered snapshot (new keys included)."""
    removed: frozenset[str]
    """Keys present in the previous delivered snapshot but gone now."""
    unreadable: Mapping[str, OSError] = field(default_factory=lambda: MappingProxyType({}))
    """Keys that exist but could not be read, with the error; their previous content (if any)
    stays in ``files``, so a consumer that ignores this field sees them as unchanged."""


class _Kind(Enum):
    """What an event means for the worker."""

    CHANGED = "changed"  # the name now holds complete content, or none: read it now
    WRITING = "writing"  # a writer has the file open (inotify): do not read until it closes


@dataclass(frozen=True, slots=True)
class _Candidate:
    """New content of a plain-directory file, seen once, waiting to be seen again unchanged."""

    data: bytes
    version: FileVersion
    since: float  # time.monotonic() of the first read


class MountWatcher:
    """Watches one directory (a ConfigMap mount or a plain directory) and reports content changes
    of its keys.

    ``keys=None`` selects every top-level name that does not start with '.', including names that
    appear later; otherwise only the given names. ``on_change`` runs on the watcher's own worker
    thread, one call at a time, only when a key changed, appeared, disappeared or became
    unreadable. If ``on_change`` raises, the error is logged and the snapshot does not count as
    delivered: the next scan (next event or periodic resync) reports the difference again.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        on_change: Callable[[Snapshot], None],
        *,
        keys: Collection[str] | None = None,
        settle: float = 0.1,
        resync_interval: float = 30.0,
        force_polling: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if keys is not None:
            for key in keys:
                if not key or "/" in key or key in {".", ".."}:
                    raise ConfigurationError(f"{key!r} is not a file name in the watched directory")
        if settle < 0:
            raise ConfigurationError(f"settle must be >= 0 seconds, got {settle}")
        if resync_interval <= 0:
            raise ConfigurationError(f"resync_interval must be > 0 seconds, got {resync_interval}")
        self._directory = os.path.abspath(os.fspath(directory))
        self._on_change = on_change
        self._keys = frozenset(keys) if keys is not None else None
        self._settle = settle
        self._resync_interval = resync_interval
        self._force_polling = force_polling
        self._log = logger or _logger

        # Shared by watchdog's thread, the worker and callers; guarded by _cond.
        self._cond = threading.Condition()
        self._started = False
        self._stopping = False
        self._scan_due = False
        self._watch_check_due = False  # watchdog saw the directory itself go away
        self._holds: dict[str, float] = {}  # key -> time.monotonic() until which it is not read

        # Owned by the worker thread (by start() before the worker exists). Other threads only
        # read single attributes (alive, the event filter), which is safe.
        self._observer: BaseObserver | None = None
        self._polling = False
        self._watched_identity: tuple[int, int] | None = None  # (st_dev, st_ino) being watched
        self._watch_lost = False  # the directory is missing; looked for every half second
        self._next_directory_check = 0.0
        self._kubelet_volume = False
        self._candidates: dict[str, _Candidate] = {}
        self._delivered: dict[str, bytes] = {}
        self._delivered_unreadable: frozenset[str] = frozenset()
        self._next_resync = 0.0
        self._last_resync = 0.0
        self._quiet_until = 0.0  # no delivery before this time.monotonic(): bursts coalesce
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ public API

    def start(self) -> Snapshot:
        """Read every key once and start watching; returns that first snapshot.

        ``on_change`` is not called for it. Raises ``FileNotFoundError`` or
        ``NotADirectoryError`` naming the directory if it cannot be watched.
        """
        with self._cond:
            if self._started or self._stopping:
                raise RuntimeError(f"watcher for {self._directory} was already started")
            self._started = True
        identity = self._directory_identity()
        if identity is None:
            os.stat(self._directory)  # raises FileNotFoundError naming the path
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self._directory)
        # A hint for the event filter until the first read tells for sure.
        self._kubelet_volume = os.path.lexists(os.path.join(self._directory, DATA_LINK))
        # The observer starts before the first read so that no change can fall in between.
        self._start_observer()
        try:
            self._watched_identity = identity
            snapshot = self._initial_snapshot()
            self._accept(snapshot)
            self._next_resync = time.monotonic() + self._resync_interval
            self._worker = threading.Thread(
                target=self._run, name=f"hotreload-watch {self._directory}", daemon=True
            )
            self._worker.start()
        except BaseException:
            self._stop_observer()
            raise
        return snapshot

    def stop(self) -> None:
        """Stop watching; idempotent. No ``on_change`` call runs once this returns (unless it is
        called from ``on_change`` itself, which cannot wait for its own return)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        worker = self._worker
        if worker is None:
            self._stop_observer()  # start() failed or never ran
        elif worker is not threading.current_thread():
            worker.join()  # the worker stops the observer on its way out

    def rescan(self) -> None:
        """Read every key again now (thread-safe); changes are reported as usual."""
        with self._cond:
            self._scan_due = True
            self._cond.notify_all()

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def alive(self) -> bool:
        """True while the worker runs and a working watch covers the directory."""
        worker = self._worker
        return worker is not None and worker.is_alive() and observer_healthy(self._observer)

    @property
    def last_resync(self) -> float:
        """``time.monotonic()`` of the last completed periodic resync (0.0 before the first)."""
        return self._last_resync

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ watchdog's thread

    def _on_event(self, event: FileSystemEvent) -> None:
        """Record an event and wake the worker; never reads a file (only ``lstat``)."""
        if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return  # not requested from the kernel; kept out should watchdog send them anyway
        src = os.fsdecode(event.src_path)
        if src == self._directory:
            if isinstance(event, DirDeletedEvent | DirMovedEvent):
                with self._cond:
                    self._watch_check_due = True
                    self._cond.notify_all()
            return
        names = [
            name
            for name in (self._name_of(src), self._name_of(os.fsdecode(event.dest_path)))
            if name is not None and self._is_relevant(name)
        ]
        if not names:
            return
        kind = self._classify(event, src, names)
        now = time.monotonic()
        with self._cond:
            for name in names:
                if kind is _Kind.WRITING:
                    # No close may ever come (a lost event, a writer keeping the file open):
                    # after a whole resync interval of quiet the file is read anyway.
                    self._holds[name] = now + self._resync_interval
                else:
                    self._holds.pop(name, None)
                    self._scan_due = True
            self._cond.notify_all()

    def _name_of(self, path: str) -> str | None:
        if not path:
            return None
        parent, name = os.path.split(path)
        return name if parent == self._directory else None

    def _is_relevant(self, name: str) -> bool:
        if name == DATA_LINK:
            return True
        if self._kubelet_volume:
            return False  # keys are read through ..data; only its swap changes them
        if self._keys is None:
            return not name.startswith(".")
        return name in self._keys

    def _classify(self, event: FileSystemEvent, src: str, names: list[str]) -> _Kind:
        if DATA_LINK in names or self._polling:
            # kubelet's swap; or a poll, which has no close events to wait for
            return _Kind.CHANGED
        if isinstance(event, FileModifiedEvent):
            return _Kind.WRITING
        if type(event) is FileCreatedEvent and is_regular_file(src):
            # open(O_CREAT): content is on its way, a close will follow. A symlink, or a file
            # moved in from another directory (a FileMovedEvent with full events), is complete.
            return _Kind.WRITING
        return _Kind.CHANGED  # closed after writing, renamed, deleted

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while self._work_once():
                pass
        finally:
            self._stop_observer()

    def _work_once(self) -> bool:
        """Wait for something to do and do it; False once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return False
                now = time.monotonic()
                for name, until in list(self._holds.items()):
                    if now >= until:
                        del self._holds[name]
                        self._scan_due = True
                check_watch = self._watch_check_due or (
                    self._watch_lost and now >= self._next_directory_check
                )
                # Nothing is read while the directory is missing: the content stays as it was.
                resync = not self._watch_lost and now >= self._next_resync
                scan = not self._watch_lost and self._scan_due and now >= self._quiet_until
                if check_watch or resync or scan:
                    break
                deadlines = [self._next_resync, *self._holds.values()]
                if self._scan_due:
                    deadlines.append(self._quiet_until)
                if self._watch_lost:
                    deadlines = [self._next_directory_check]
                self._cond.wait(min(deadlines) - now)
            self._watch_check_due = False
            self._scan_due = False
        try:
            self._check_and_scan(check_watch=check_watch or resync, resync=resync)
        except Exception:  # noqa: BLE001 - logged; the worker must outlive one bad scan
            self._log.exception("watching %s failed; retrying", self._directory)
            with self._cond:
                self._scan_due = True
                self._cond.wait_for(lambda: self._stopping, timeout=_ERROR_BACKOFF)
        return True

    def _check_and_scan(self, *, check_watch: bool, resync: bool) -> None:
        if check_watch and not self._ensure_watch():
            return
        if resync:
            self._next_resync = time.monotonic() + self._resync_interval
        snapshot = self._scan()
        if resync:
            self._last_resync = time.monotonic()
        if snapshot is None or self._stopping:
            return
        try:
            self._on_change(snapshot)
        except Exception:  # noqa: BLE001 - logged; the consumer's failure must not stop watching
            self._log.exception(
                "on_change for %s failed; the change will be reported again by the next scan",
                self._directory,
            )
            return
        self._accept(snapshot)
        # The first change after a quiet period is reported at once; the rest of a burst is
        # folded into one report per settle window, and the final state always gets one.
        self._quiet_until = time.monotonic() + self._settle

    def _scan(self) -> Snapshot | None:
        """Read the keys; a Snapshot if anything differs from the delivered one, else None."""
        identity = self._directory_identity()
        if identity != self._watched_identity and not self._ensure_watch():
            return None
        with self._cond:
            held = frozenset(self._holds)
        try:
            read = read_mount(self._directory, self._keys, held)
        except ConcurrentSwaps:
            self._log.debug("%s: ..data kept changing while read; reading again", self._directory)
            self.rescan()
            return None
        except (FileNotFoundError, NotADirectoryError):
            self._lose_watch()
            return None
        if self._directory_identity() != identity:
            self.rescan()  # replaced while being read: the read may mix two directories
            return None
        self._kubelet_volume = read.target is not None
        if read.target is not None:
            return self._compare(read, kept=())  # a kubelet target never changes once swapped in
        unconfirmed = self._unconfirmed(read, held)
        with self._cond:
            for name, until in unconfirmed.items():
                self._holds.setdefault(name, until)
        return self._compare(read, kept={*held, *unconfirmed})

    def _unconfirmed(self, read: MountRead, held: Collection[str]) -> dict[str, float]:
        """Plain-directory keys whose new content is not confirmed yet, and when to read again.

        Nothing makes a plain file's content atomic, and the event that would announce a write
        in progress can still be on its way when the file is read: new content counts once two
        reads at least ``settle`` apart agree on bytes and version. That includes a file renamed
        into place: an in-place write may follow the rename before its event arrives.
        """
        now = time.monotonic()
        # A candidate lives while its file is there: seen now, or not read because held.
        self._candidates = {
            n: c for n, c in self._candidates.items() if n in read.files or n in held
        }
        recheck: dict[str, float] = {}
        for name, data in read.files.items():
            if data == self._delivered.get(name):
                self._candidates.pop(name, None)
                continue
            version = read.versions[name]
            candidate = self._candidates.get(name)
            if candidate is None or candidate.data != data or candidate.version != version:
                candidate = self._candidates[name] = _Candidate(data, version, now)
            elif now - candidate.since >= self._settle:
                del self._candidates[name]
                continue
            recheck[name] = candidate.since + self._settle
        return recheck

    def _compare(self, read: MountRead, kept: Collection[str]) -> Snapshot | None:
        files = {name: data for name, data in read.files.items() if name not in kept}
        for name in {*kept, *read.unreadable}:
            if name in self._delivered:
                files[name] = self._delivered[name]
        changed = frozenset(n for n, data in files.items() if self._delivered.get(n) != data)
        removed = frozenset(self._delivered.keys() - files.keys())
        if not changed and not removed and self._delivered_unreadable == read.unreadable.keys():
            return None
        return Snapshot(
            directory=self._directory,
            target=read.target,
            files=MappingProxyType(files),
            changed=changed,
            removed=removed,
            unreadable=MappingProxyType(dict(read.unreadable)),
        )

    def _accept(self, snapshot: Snapshot) -> None:
        self._delivered = dict(snapshot.files)
        self._delivered_unreadable = frozenset(snapshot.unreadable)

    def _initial_snapshot(self) -> Snapshot:
        """First read; plain-directory content is confirmed by a second read ``settle`` later.

        A key still unconfirmed after a few attempts (being rewritten all the time, or held open
        by a writer) is left out for now and reported once it settles.
        """
        for attempt in range(1, _INITIAL_READ_ATTEMPTS + 1):
            with self._cond:
                held = frozenset(self._holds)  # writes that began since the observer started
            try:
                read = read_mount(self._directory, self._keys, held)
            except ConcurrentSwaps:
                continue
            self._kubelet_volume = read.target is not None
            unconfirmed = (
                {}
                if read.target is not None
                else {
                    **dict.fromkeys(held, time.monotonic() + self._settle),
                    **self._unconfirmed(read, held),
                }
            )
            if not unconfirmed or attempt == _INITIAL_READ_ATTEMPTS:
                break
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping, timeout=max(unconfirmed.values()) - time.monotonic()
                )
        else:
            raise ConcurrentSwaps(self._directory)
        if unconfirmed:
            self._log.warning(
                "%s: %s kept changing during start; reporting them once they settle",
                self._directory,
                ", ".join(sorted(unconfirmed)),
            )
            with self._cond:
                for name, until in unconfirmed.items():
                    self._holds.setdefault(name, until)
        snapshot = self._compare(read, kept=unconfirmed)
        return snapshot or Snapshot(
            self._directory, read.target, MappingProxyType({}), frozenset(), frozenset()
        )

    # ------------------------------------------------------------------ the watch itself

    def _directory_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._directory)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _ensure_watch(self) -> bool:
        """Make sure a live observer watches the directory now at our path; False if missing."""
        identity = self._directory_identity()
        if identity is None:
            self._lose_watch()
            return False
        if identity == self._watched_identity and observer_healthy(self._observer):
            return True
        self._log.warning(
            "the watch on %s was lost (directory replaced, deleted or observer stopped); "
            "watching it again and re-reading every key",
            self._directory,
        )
        self._stop_observer()
        try:
            self._start_observer()
        except OSError:
            self._lose_watch()
            return False
        # Compare with a stat taken after the watch was added: a directory replaced in between
        # would otherwise stay unwatched.
        if self._directory_identity() != identity:
            self._lose_watch()
            return False
        self._watched_identity = identity
        self._watch_lost = False
        return True

    def _start_observer(self) -> None:
        self._observer, self._polling = start_observer(
            self._directory, self._on_event, force_polling=self._force_polling, log=self._log
        )

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            stop_observer(observer)

    def _lose_watch(self) -> None:
        """The directory is missing: drop the observer and look for it again soon."""
        if not self._watch_lost:
            self._log.warning(
                "%s is missing; keeping the current content and looking for it every %.1f s",
                self._directory,
                _MISSING_DIRECTORY_POLL,
            )
        self._watch_lost = True
        self._next_directory_check = time.monotonic() + _MISSING_DIRECTORY_POLL
        self._stop_observer()


class FileWatcher:
    """The Python form of the Go FileWatcher: reloads one file into ``callback(content)``.

    ``start()`` loads the file synchronously and raises ``InitialLoadError`` if it is missing,
    unreadable, not UTF-8, or rejected (``callback`` raised). Afterwards every content change is
    passed to ``callback`` on the watcher's thread; raising rejects it: the previous content stays
    active, ``error_count`` goes up by one, and the same content is not offered again until the
    file changes to something else. Unchanged content never calls back. A missing file is
    transient: the current content stays active until the file returns.

    ``reload_count`` counts successful reloads after ``start()`` (the initial load is not one);
    ``error_count`` counts rejected, undecodable and unreadable updates; ``last_reload_time`` is
    the ``time.time()`` of the latest successful load, the initial one included.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        callback: Callable[[str], None],
        logger: logging.Logger | None = None,
        *,
        settle: float = 0.1,
        resync_interval: float = 30.0,
        force_polling: bool = False,
    ) -> None:
        self._path = os.path.abspath(os.fspath(path))
        directory, self._key = os.path.split(self._path)
        self._callback = callback
        self._log = logger or _logger
        self._mount = MountWatcher(
            directory,
            self._on_change,
            keys={self._key},
            settle=settle,
            resync_interval=resync_interval,
            force_polling=force_polling,
            logger=self._log,
        )
        # Held while content goes to the callback: makes the initial load come first.
        self._delivery_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._rejected: str | None = None  # sha256 of the content rejected last
        self._unreadable = False
        self._state_lock = threading.Lock()
        self._content = ""
        self._hash = ""
        self._last_reload_time: float | None = None
        self._reload_count = 0
        self._error_count = 0

    def start(self) -> None:
        if self._started:
            raise RuntimeError(f"watcher for {self._path} was already started")
        self._started = True
        error: BaseException | None = None
        # Holding the lock keeps a change found right after the first read from reaching the
        # callback before the initial content does.
        with self._delivery_lock:
            try:
                self._load_initial(self._mount.start())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after cleanup
                self._stopped = True  # a delivery already waiting for the lock must do nothing
                error = exc
        if error is not None:
            self._mount.stop()  # outside the lock: the worker may be waiting for it
            if isinstance(error, InitialLoadError) or not isinstance(error, Exception):
                raise error
            raise InitialLoadError(self._path, error) from error
        self._warn_if_subpath_mount()

    def stop(self) -> None:
        """Stop watching; idempotent. No callback runs once this returns (called from the
        callback itself, it cannot wait for that call to end, but no further one starts)."""
        self._stopped = True
        self._mount.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def path(self) -> str:
        return self._path

    @property
    def content(self) -> str:
        with self._state_lock:
            return self._content

    @property
    def last_hash(self) -> str:
        with self._state_lock:
            return self._hash

    @property
    def last_reload_time(self) -> float | None:
        with self._state_lock:
            return self._last_reload_time

    @property
    def reload_count(self) -> int:
        with self._state_lock:
            return self._reload_count

    @property
    def error_count(self) -> int:
        with self._state_lock:
            return self._error_count

    def _load_initial(self, snapshot: Snapshot) -> None:
        if self._key in snapshot.unreadable:
            raise InitialLoadError(self._path, snapshot.unreadable[self._key])
        data = snapshot.files.get(self._key)
        if data is None:
            cause = (
                IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self._path)
                if os.path.isdir(self._path)
                else FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._path)
            )
            raise InitialLoadError(self._path, cause)
        content = data.decode("utf-8")
        self._callback(content)
        self._activate(content, hashlib.sha256(data).hexdigest())

    def _on_change(self, snapshot: Snapshot) -> None:
        with self._delivery_lock:
            if not self._stopped:
                self._apply(snapshot)

    def _apply(self, snapshot: Snapshot) -> None:
        error = snapshot.unreadable.get(self._key)
        if error is not None:
            if not self._unreadable:
                self._unreadable = True
                self._count_error()
                self._log.warning(
                    "cannot read %s (%s); keeping the current config", self._path, error
                )
            return
        self._unreadable = False
        data = snapshot.files.get(self._key)
        if data is None:
            self._log.info("%s is missing; keeping the current config until it returns", self._path)
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.last_hash:
            self._rejected = None  # back to the active content: a later change is new again
            return
        if digest == self._rejected:
            return
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._reject(digest, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        try:
            self._callback(content)
        except Exception as exc:  # noqa: BLE001 - any exception from the callback rejects
            self._reject(digest, f"{type(exc).__name__}: {exc}")
            return
        self._rejected = None
        self._activate(content, digest, reload=True)
        self._log.info("reloaded %s (sha256 %s)", self._path, digest[:12])

    def _activate(self, content: str, digest: str, *, reload: bool = False) -> None:
        with self._state_lock:
            self._content = content
            self._hash = digest
            self._last_reload_time = time.time()
            if reload:
                self._reload_count += 1

    def _reject(self, digest: str, reason: str) -> None:
        self._rejected = digest
        self._count_error()
        self._log.warning(
            "rejected new content of %s (sha256 %s): %s; keeping the current config",
            self._path,
            digest[:12],
            reason,
        )

    def _count_error(self) -> None:
        with self._state_lock:
            self._error_count += 1

    def _warn_if_subpath_mount(self) -> None:
        """A file bind-mounted on its own (a Kubernetes subPath mount) never changes."""
        try:
            mode = os.lstat(self._path).st_mode
        except OSError:
            return
        directory = os.path.dirname(self._path)
        if (
            stat.S_ISREG(mode)
            and not os.path.lexists(os.path.join(directory, DATA_LINK))
            and is_mount_point(self._path, _MOUNTINFO)
        ):
            self._log.warning(
                "%s is a file mounted on its own, as a Kubernetes subPath mount is: kubelet never "
                "updates subPath mounts, so this file will not change when the ConfigMap does; "
                "mount the whole ConfigMap volume as a directory and watch the file inside it",
                self._path,
            )
