"""Watch a Kubernetes ConfigMap volume (or any directory) and report changes of its keys.

``MountWatcher`` reports content changes of the keys in one directory as ``MountContent``
values; ``publisher.filewatcher.FileWatcher`` (the seed's one-file API) is built on it. Reading
is ``publisher._mount``, keeping the watch alive is ``publisher._observe``.

Detection strategy; each rule answers a failure measured before (docs/design.md, "Measured facts"):

* Watch the directory, non-recursively, with a watchdog observer of our own. Never the file or
  ``..data``: kubelet renames a new ``..data`` symlink over the old one, and watches on the file
  path or on ``..data`` missed 999 of 1000 updates.
* watchdog's thread records which name had what kind of event and wakes our one worker thread,
  which reads. Reads must never feed back as events (reading on every event once turned one
  change into 38,000 events in 2 s): the kernel is asked only for create, delete, move, modify
  and close-after-write, never for open or close-after-read. With ``swaps_on_event`` (the
  daemon) a kubelet swap that finds the worker idle is read and reported on watchdog's thread
  itself, still one reader at a time (``_busy``): the worker's wake-up was 0.1-0.2 ms of the
  swap's path; whatever would touch the watch (a replaced or missing directory) or fails is
  left to the worker.
* Kubelet's ``..data`` swap is atomic and is read at once, with no settle delay, through the
  resolved ``..data`` target: one read never mixes two versions, and a target never changes
  once swapped in (``publisher._mount``). The new version was read while kubelet wrote it
  (``publisher._preread``): the swap reads and compares only what changed since. A deleted
  key is reported as removed at once (``FileWatcher`` keeps its content meanwhile).
* Nothing makes a plain directory's files atomic: a file is not read while a writer has it
  open, and its new content counts once two reads ``settle`` apart agree (``publisher._settle``
  says why both). Kubelet volumes do not depend on this.
* Content is compared byte for byte (``publisher._delivered``): events that change nothing
  report nothing. A plain directory reports at most once per ``settle`` (the
  first change after a quiet period at once, the rest of a burst folded into one report per
  window, ending with the final state). A kubelet swap is a complete version: reported when
  read, never held back (folded, swaps every 20 ms had the last one reported 0-100 ms late;
  ``bench_detection``); swaps made while one is read or reported fold into the next read.
* Every ``resync_interval`` everything is read again (repairs any missed event, such as an
  inotify queue overflow; a kubelet volume whose ``..data`` still names the target read last
  is not: that target cannot have changed) and the watch itself is checked
  (``publisher._observe``): a directory replaced by another inode, deleted, or a dead observer
  gets a new observer and a full read; the content is kept while the directory is missing.
* A key is read only if its file lies inside the directory, and only up to the size limit
  (``publisher._mount`` says why); one not read is logged once per change (``UnreadKeys``),
  and one that cannot be read is in ``MountContent.unreadable`` for consumers to count.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from types import MappingProxyType, TracebackType
from typing import Self

from watchdog.events import (
    DirCreatedEvent,
    FileClosedNoWriteEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from publisher._delivered import Delivered, UnreadKeys
from publisher._mount import (
    DATA_LINK,
    ConcurrentSwaps,
    MountContent,
    MountRead,
    read_mount,
)
from publisher._observe import DirectoryWatch, EventKind, directory_identity, event_kind
from publisher._preread import PreRead, is_kubelet_version
from publisher._settle import Confirmation, check_settings, first_read
from subscriber.protocol import MAX_CONTENT_BYTES

__all__ = ["MountContent", "MountWatcher"]

_logger = logging.getLogger(__name__)

_ERROR_BACKOFF = 1.0  # seconds the worker waits after an unexpected error before trying again


class _NotHere(Exception):
    """A swap seen on watchdog's thread that the worker must read (``_swap_here``)."""


class MountWatcher:
    """Watches one directory (a ConfigMap mount or a plain directory) and reports content changes
    of its keys.

    ``keys=None`` selects every top-level name that does not start with '.', including names that
    appear later; otherwise only the given names. ``on_change`` runs on the watcher's own worker
    thread, one call at a time, only when a key changed, appeared, disappeared or became
    unreadable. If ``on_change`` raises, the error is logged and the content does not count as
    delivered: the next scan (next event or periodic resync) reports the difference again.

    ``confine`` (default): a key whose file lies outside the directory (a symlink leading out
    of it) is not read, so whoever can create a symlink there cannot have the watcher read any
    file it can; ``FileWatcher``, which reads the one file its caller named, turns it off.
    ``max_bytes``: larger files are not read but reported unreadable (``FileTooLarge``).
    ``on_version_coming``: see ``publisher._preread`` (a hint; the swap is read as ever).
    ``swaps_on_event``: ``on_change`` may run on watchdog's thread (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        on_change: Callable[[MountContent], None],
        *,
        keys: Collection[str] | None = None,
        settle: float = 0.1,
        resync_interval: float = 30.0,
        force_polling: bool = False,
        logger: logging.Logger | None = None,
        confine: bool = True,
        max_bytes: int = MAX_CONTENT_BYTES,
        on_version_coming: Callable[[], None] | None = None,
        swaps_on_event: bool = False,
    ) -> None:
        check_settings(keys, settle, resync_interval, max_bytes)
        self._directory = os.path.abspath(os.fspath(directory))
        self._on_change = on_change
        self._keys = frozenset(keys) if keys is not None else None
        self._settle = settle
        self._resync_interval = resync_interval
        self._log = logger or _logger
        self._swaps_on_event = swaps_on_event

        # Shared by watchdog's thread, the worker and callers; guarded by _cond.
        self._cond = threading.Condition()
        self._started = False
        self._stopping = False
        self._scan_due = False
        self._watch_check_due = False  # watchdog saw the directory itself go away
        self._holds: dict[str, float] = {}  # key -> time.monotonic() until which it is not read
        self._busy: int | None = None  # the thread reading (worker, or watchdog's: a swap)
        self._turn_wanted = False  # the worker waits for watchdog's thread to finish a swap

        # Owned by the worker (by start() before it exists); others read single attributes.
        self._watch = DirectoryWatch(
            self._directory, self._on_event, force_polling=force_polling, log=self._log
        )
        self._kubelet_volume = False
        self._confirmation = Confirmation(settle)
        self._preread = PreRead(self._directory, max_bytes, self._keys, on_version_coming)
        self._preread_next: str | None = None  # a new kubelet version to read as it is written
        self._read: Callable[[Collection[str]], MountRead] = functools.partial(
            read_mount,
            self._directory,
            self._keys,
            confine=confine,
            limit=max_bytes,
            known=self._preread.take,
        )
        self._delivered = Delivered(self._directory)
        self._unread = UnreadKeys(self._directory, self._log)
        self._next_resync = 0.0
        self._last_resync = 0.0
        self._quiet_until = 0.0  # no delivery before this time.monotonic(): bursts coalesce
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ public API
    def start(self) -> MountContent:
        """Read every key once and start watching; returns that first content (``on_change``
        is not called for it). Raises ``FileNotFoundError`` or ``NotADirectoryError`` naming
        the directory if it cannot be watched."""
        with self._cond:
            if self._stopping:
                raise RuntimeError(
                    f"the watcher of {self._directory} was stopped and cannot be restarted; "
                    "create a new MountWatcher"
                )
            if self._started:
                raise RuntimeError(f"the watcher of {self._directory} was already started")
            self._started = True
        try:
            return self._start()
        except BaseException:
            with self._cond:
                self._started = False  # nothing runs: start() may be tried again
            raise

    def _start(self) -> MountContent:
        identity = directory_identity(self._directory)
        if identity is None:
            os.stat(self._directory)  # raises FileNotFoundError naming the path
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self._directory)
        # A hint for the event filter until the first read tells for sure.
        self._kubelet_volume = os.path.lexists(os.path.join(self._directory, DATA_LINK))
        # The observer starts before the first read so that no change can fall in between.
        self._watch.start(identity)
        try:
            content = self._initial_content()
            self._delivered.accept(content)
            self._next_resync = time.monotonic() + self._resync_interval
            self._worker = threading.Thread(
                target=self._run, name=f"hotreload-watch {self._directory}", daemon=True
            )
            self._worker.start()
        except BaseException:
            self._watch.stop()
            raise
        return content

    def stop(self) -> None:
        """Stop watching; idempotent. No ``on_change`` call runs once this returns (unless it is
        called from ``on_change`` itself, which cannot wait for its own return)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            reporting = self._busy == threading.get_ident()  # called from on_change
        worker = self._worker
        if worker is None:
            self._watch.stop()  # start() failed or never ran
        elif not reporting and worker is not threading.current_thread():
            worker.join()  # the worker stops the observer (and its thread) on its way out

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
        return worker is not None and worker.is_alive() and self._watch.healthy

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
        """Record an event and wake the worker (or read a swap here: ``_may_swap_here``)."""
        if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return  # not requested from the kernel; kept out should watchdog send them anyway
        src = os.fsdecode(event.src_path)
        if src == self._directory:
            if self._watch.in_doubt(event):  # gone, replaced, or events of it dropped
                with self._cond:
                    self._watch_check_due = True
                    self._cond.notify_all()
            return
        new = self._name_of(src) if isinstance(event, DirCreatedEvent) else None
        if self._kubelet_volume and new is not None and is_kubelet_version(new):
            with self._cond:  # a new version being written: read it meanwhile (_preread)
                self._preread_next = new
                self._cond.notify_all()
            return self._preread.hint()
        names = [
            name
            for name in (self._name_of(src), self._name_of(os.fsdecode(event.dest_path)))
            if name is not None and self._is_relevant(name)
        ]
        if not names:
            return
        # kubelet's swap, or a poll (which has no close events to wait for), is complete
        kind = event_kind(event, src, complete=DATA_LINK in names or self._watch.polling)
        now = time.monotonic()
        with self._cond:
            for name in names:
                if kind is EventKind.WRITING:
                    # no close may ever come: read anyway after a resync interval of quiet
                    self._holds[name] = now + self._resync_interval
                else:
                    self._holds.pop(name, None)
                    self._scan_due = True
            here = DATA_LINK in names and self._may_swap_here(now)
            if here:
                self._busy, self._scan_due = threading.get_ident(), False
            else:
                self._cond.notify_all()
        if here:
            self._swap_here()

    def _may_swap_here(self, now: float) -> bool:
        """Whether watchdog's thread reads the swap it saw (``_cond`` held): a kubelet volume
        whose worker is idle with nothing else due (no watch check, resync, quiet, hold)."""
        return (
            self._swaps_on_event
            and self._busy is None
            and self._kubelet_volume
            and self._worker is not None
            and not (self._stopping or self._watch.polling or self._watch.lost)
            and not (self._watch_check_due or self._holds)
            and self._quiet_until <= now < self._next_resync
        )

    def _swap_here(self) -> None:
        """Read and report the swap as the worker's ``_check_and_scan`` would; whatever this
        thread must not do (re-create the observer it runs on) or fails goes to the worker."""
        done = False
        try:
            content = self._scan(here=True)
            if content is not None and not self._stopping:
                self._report(content)
            done = True
        except _NotHere:
            pass
        except Exception:  # noqa: BLE001 - logged; the worker reads it again
            self._log.exception("reading %s's swap failed; reading it again", self._directory)
        finally:
            with self._cond:
                self._busy = None
                self._scan_due = self._scan_due or not done
                if self._turn_wanted or not done:
                    self._turn_wanted = False
                    self._cond.notify_all()

    def _name_of(self, path: str) -> str | None:
        parent, name = os.path.split(path)
        return name if path and parent == self._directory else None

    def _is_relevant(self, name: str) -> bool:
        if name == DATA_LINK:
            return True
        if self._kubelet_volume:
            return False  # keys are read through ..data; only its swap changes them
        if self._keys is None:
            return not name.startswith(".")
        return name in self._keys

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while self._work_once():
                pass
        finally:
            self._watch.stop()
            self._preread.close()

    def _work_once(self) -> bool:
        """Wait for something to do and do it; False once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return False
                if self._busy is not None:  # watchdog's thread reads a swap
                    self._turn_wanted = True
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for name, until in list(self._holds.items()):
                    if now >= until:
                        del self._holds[name]
                        self._scan_due = True
                check_watch = self._watch_check_due or (
                    self._watch.lost and now >= self._watch.next_check
                )
                # nothing is read while the directory is missing: the content stays as it was
                resync = not self._watch.lost and now >= self._next_resync
                scan = not self._watch.lost and self._scan_due and now >= self._quiet_until
                if check_watch or resync or scan:
                    break
                if self._preread_next is not None:
                    self._preread.begin(self._preread_next, self._delivered.files)
                    break
                deadlines = [self._next_resync, *self._holds.values()]
                if self._scan_due:
                    deadlines.append(self._quiet_until)
                if self._watch.lost:
                    deadlines = [self._watch.next_check]
                self._cond.wait(min(deadlines) - now)
            preread = not (check_watch or resync or scan)  # a new kubelet version is written
            if preread:
                self._preread_next = None
            else:
                self._watch_check_due = self._scan_due = False
            self._busy = threading.get_ident()
        try:
            if preread:  # without the lock: events keep coming, and a swap ends the pre-read
                self._preread.run(lambda: self._stopping or self._scan_due, self._pause)
            else:
                self._check_and_scan(check_watch=check_watch or resync, resync=resync)
        except Exception:  # noqa: BLE001 - logged; the worker must outlive one bad scan
            self._log.exception("watching %s failed; retrying", self._directory)
            with self._cond:
                self._scan_due, self._busy = True, None
                self._cond.wait_for(lambda: self._stopping, timeout=_ERROR_BACKOFF)
        finally:
            with self._cond:
                if self._busy == threading.get_ident():  # (not watchdog's thread, meanwhile)
                    self._busy = None
        return True

    def _pause(self, timeout: float) -> bool:
        """The pre-read's wait between two looks: meanwhile watchdog's thread may read a swap
        (``_may_swap_here``); True once the pre-read should end."""
        with self._cond:
            self._busy = None
            self._cond.wait_for(lambda: self._stopping or self._scan_due, timeout)
            while self._busy is not None:  # reading the swap: the pre-read is taken
                self._turn_wanted = True
                self._cond.wait()
            self._busy = threading.get_ident()
            return self._stopping or self._scan_due

    def _check_and_scan(self, *, check_watch: bool, resync: bool) -> None:
        watching = (self._watch.identity, self._watch.observer)
        if check_watch and not self._watch.ensure():
            return
        if resync:
            self._next_resync = time.monotonic() + self._resync_interval
            unchanged = watching == (self._watch.identity, self._watch.observer)
            if unchanged and self._delivered.same_target():
                self._last_resync = time.monotonic()
                return
        content = self._scan()
        if resync:
            self._last_resync = time.monotonic()
        if content is not None and not self._stopping:
            self._report(content)

    def _report(self, content: MountContent) -> None:
        try:
            self._on_change(content)
        except Exception:  # noqa: BLE001 - logged; the consumer's failure must not stop watching
            self._log.exception(
                "on_change for %s failed; the change will be reported again by the next scan",
                self._directory,
            )
            return
        self._delivered.accept(content)
        if content.target is None:  # see the module docstring: kubelet swaps are not folded
            self._quiet_until = time.monotonic() + self._settle

    def _scan(self, *, here: bool = False) -> MountContent | None:
        """Read the keys; a MountContent if anything differs from the delivered one, else None.
        ``here``: on watchdog's thread (``_swap_here``), which leaves the watch to the worker
        (``_NotHere``) and reads a kubelet volume only."""
        identity = directory_identity(self._directory)
        if identity != self._watch.identity and (here or not self._watch.ensure()):
            if here:
                raise _NotHere
            return None
        with self._cond:
            held = frozenset(self._holds)
        try:
            read = self._read(held)
        except ConcurrentSwaps:
            self._log.debug("%s: ..data kept changing while read; reading again", self._directory)
            self.rescan()
            return None
        except (FileNotFoundError, NotADirectoryError):
            if here:
                raise _NotHere from None
            self._watch.lose()
            return None
        if directory_identity(self._directory) != identity:
            self.rescan()  # replaced while being read: the read may mix two directories
            return None
        if here and read.target is None:
            raise _NotHere  # no longer a kubelet volume: its settle rules are the worker's
        self._unread.report(read, held)
        self._kubelet_volume = read.target is not None
        if read.target is not None:
            return self._delivered.compare(read, kept=())  # a target never changes once swapped in
        unconfirmed = self._confirmation.unconfirmed(read, held, self._delivered.files)
        with self._cond:
            for name, until in unconfirmed.items():
                self._holds.setdefault(name, until)
        return self._delivered.compare(read, kept={*held, *unconfirmed})

    def _initial_content(self) -> MountContent:
        """First read (``publisher._settle.first_read``): plain-directory content is confirmed
        by a second read ``settle`` later; what stays unconfirmed is held and read again."""
        read, held, unconfirmed = first_read(
            self._directory,
            self._read,
            self._confirmation,
            self._cond,
            self._holds,
            self._log,
            lambda: self._stopping,
        )
        self._kubelet_volume = read.target is not None
        self._unread.report(read, held)
        return self._delivered.compare(read, kept=unconfirmed) or MountContent(
            self._directory, read.target, MappingProxyType({}), frozenset(), frozenset()
        )
