"""The watch itself: a watchdog observer on one directory, kept alive at that path.

Split from reading (``publisher._mount``) because it answers a different question: not "what
do the keys hold now" but "will we hear about it when they change". ``DirectoryWatch`` owns
the observer; ``MountWatcher``'s worker thread alone drives it.

A watch is lost in ways no event reports: the directory is deleted (the inotify emitter stops),
replaced by another directory renamed over it (inotify follows the old inode), or the observer
thread dies. ``DirectoryWatch.ensure()`` checks the directory's identity against the one
watched and re-creates the observer when they differ; a missing directory is looked for every
half second. If no inotify instance or watch can be had (EMFILE: max_user_instances; ENOSPC:
max_user_watches), watchdog's polling observer takes over, with a warning saying why.

With inotify, one thread reads the kernel's events and hands each to the sink itself
(``_InotifyEmitter``, on watchdog's inotify instance and event classes): kubelet's rename
reaches the watcher 0.16 ms after it is made instead of 1.3 ms through watchdog's own observer
(``bench_detection``; docs/performance.md). The price of one thread: a sink that blocks holds
the reading, and past fs.inotify.max_queued_events (16,384) the kernel drops events; the
overflow is handed on as an ``EventsLostEvent`` of the directory, and the periodic resync reads
everything again in any case.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from enum import Enum

import watchdog.events
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, EventEmitter, EventQueue, ObservedWatch
from watchdog.observers.inotify_c import (
    DEFAULT_EVENT_BUFFER_SIZE,
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)
from watchdog.observers.polling import PollingObserver

_logger = logging.getLogger(__name__)

# The overflow's event, from watchdog 7.1 on (EventsLostEvent; none before: nothing is handed on)
_EventsLostEvent = getattr(watchdog.events, "EventsLostEvent", None)

__all__ = [
    "MISSING_DIRECTORY_POLL",
    "POLL_INTERVAL",
    "DirectoryWatch",
    "EventKind",
    "directory_identity",
    "event_kind",
    "events_lost",
]


class EventKind(Enum):
    """What an event on a key means for the reader."""

    CHANGED = "changed"  # the name now holds complete content, or none: read it now
    WRITING = "writing"  # a writer has the file open (inotify): do not read until it closes


def event_kind(event: FileSystemEvent, src: str, *, complete: bool) -> EventKind:
    """``complete``: kubelet's ``..data`` swap, or a poll (no close events to wait for)."""
    if complete:
        return EventKind.CHANGED
    if isinstance(event, FileModifiedEvent):
        return EventKind.WRITING
    if type(event) is FileCreatedEvent and _is_regular_file(src):
        # open(O_CREAT): content is on its way, a close will follow. A symlink, or a file
        # moved in from another directory (a FileMovedEvent with full events), is complete.
        return EventKind.WRITING
    return EventKind.CHANGED  # closed after writing, renamed, deleted


def events_lost(event: FileSystemEvent) -> bool:
    """The kernel's queue overflowed and dropped events of the directory: read it all again
    (an ``EventsLostEvent``, watchdog >= 7.1; with older ones an overflow is not reported)."""
    return _EventsLostEvent is not None and isinstance(event, _EventsLostEvent)


def _is_regular_file(path: str) -> bool:
    # lstat reads metadata only: unlike open() it generates no inotify event.
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


MISSING_DIRECTORY_POLL = 0.5
"""Seconds between two looks for a watched directory that disappeared."""


POLL_INTERVAL = 1.0
"""Seconds between two directory snapshots of the polling observer."""

# The polling observer's events (inotify's are ``_INOTIFY_MASK``): not open, close-without-write
# or attribute changes, which never change content. Directory events because polling sees
# ``..data`` as the directory it points at, and for the watched directory's deletion.
# (DirModifiedEvent would only repeat every event, naming the watched directory itself.)
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]

# inotify_init / inotify_add_watch errors that mean "no inotify now": poll instead.
_INOTIFY_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM})


# What the kernel is asked for: a name created (a file being written, a symlink, kubelet's new
# ``..<timestamp>`` directory), deleted, modified or closed after writing, renamed in (kubelet's
# ``..data`` swap, a file renamed over a key), and the watched directory itself deleted. Not:
# open / close-without-write (our own reads would feed back), attribute changes (kubelet's chmod
# of every new ``..<timestamp>`` directory: one more event an update, never a content change),
# IN_MOVED_FROM (see _InotifyEmitter). The kernel adds IN_IGNORED and IN_Q_OVERFLOW itself.
_INOTIFY_MASK = Mask(
    InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE
    | InotifyConstants.IN_MODIFY
    | InotifyConstants.IN_CLOSE_WRITE
    | InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_DELETE_SELF
)


class _Inotify(InotifyFD):
    """watchdog's inotify instance, read by ``_InotifyEmitter``'s thread (never started itself).

    watchdog's ``InotifyFD`` thread would hand every read to a dispatcher thread and, when a
    read comes within 1 ms of the previous one, keep reading for up to 1 ms more before handing
    anything over: kubelet's swap comes well under a millisecond after its new directory, so
    the swap was held back that long (rename -> watcher 1.25-1.46 ms, 0.3 ms without that).
    """

    def __init__(self) -> None:
        super().__init__()
        # No thread reads yet: ``close()`` must release the descriptors itself (watchdog
        # assumes a reader is running from the start and leaves that to it).
        self._is_reading = False


class _InotifyEmitter(EventEmitter):
    """Reads the directory's inotify events on its own thread and hands each, as a watchdog
    event, straight to the observer's handlers on that thread: kernel -> handler is one thread
    (watchdog's own inotify path is four: reader, dispatcher, emitter, observer).

    Events as watchdog's full events report them (``InotifyFullEmitter``): a name renamed in
    is a ``FileMovedEvent`` / ``DirMovedEvent`` with no source, a name created, deleted,
    modified or closed after writing the matching file or directory event, the watched
    directory deleted a ``DirDeletedEvent`` of the directory (and the emitter stops), a queue
    overflow an ``EventsLostEvent`` of the directory (watchdog >= 7.1; nothing before).

    IN_MOVED_FROM is not asked for: watchdog holds every IN_MOVED_FROM up to 0.5 s waiting
    for its IN_MOVED_TO, and with every later event queued behind it one kubelet swap in about
    3000 was reported after 500 ms. What changes a key is the rename's IN_MOVED_TO (onto
    ``..data`` or onto the key); a key renamed away is noticed by the next read like any
    missing key.
    """

    def __init__(
        self,
        event_queue: EventQueue,
        watch: ObservedWatch,
        *,
        timeout: float,
        event_filter: list[type[FileSystemEvent]] | None = None,
        deliver: Callable[[FileSystemEvent, ObservedWatch], None],
    ) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        self._deliver = deliver
        self._path = os.fsdecode(watch.path)
        # Created here, so that schedule() raises what inotify refuses (EMFILE, ENOSPC, ENOENT).
        self._inotify = _Inotify()
        try:
            self._inotify.add_callback(
                os.fsencode(self._path), _INOTIFY_MASK, self, CallbackId(id(self))
            )
        except BaseException:
            self._inotify.close()
            raise

    def run(self) -> None:
        inotify = self._inotify
        while self.should_keep_running():
            # InotifyFD.read_events() less its filter: before watchdog 7.1 it drops the
            # overflow (the one event without a watch descriptor) unseen
            buffer = inotify._read_event_buffer(DEFAULT_EVENT_BUFFER_SIZE)  # b"" once closed
            for wd, mask, cookie, name in InotifyFD._parse_event_buffer(buffer):
                if wd != -1:
                    inotify.handle_event(InotifyEvent(wd, mask, cookie, name))
                elif mask & InotifyConstants.IN_Q_OVERFLOW:
                    self._events_lost()

    def on_thread_stop(self) -> None:
        self._inotify.close()  # wakes a read in progress

    # watchdog's WatchCallback, called by handle_event on this emitter's thread

    def on_event(self, event: InotifyEvent) -> None:
        mask = event.mask
        if mask & InotifyConstants.IN_DELETE_SELF:
            self._deliver(DirDeletedEvent(self._path), self.watch)
            self.stop()
            return
        if not event.name:
            return
        path = os.path.join(self._path, os.fsdecode(event.name))
        is_dir = bool(mask & InotifyConstants.IN_ISDIR)
        fs_event: FileSystemEvent
        if mask & InotifyConstants.IN_MOVED_TO:
            fs_event = DirMovedEvent("", path) if is_dir else FileMovedEvent("", path)
        elif mask & InotifyConstants.IN_CREATE:
            fs_event = DirCreatedEvent(path) if is_dir else FileCreatedEvent(path)
        elif mask & InotifyConstants.IN_DELETE:
            fs_event = DirDeletedEvent(path) if is_dir else FileDeletedEvent(path)
        elif is_dir:
            return  # a subdirectory modified or closed: its entries are not watched
        elif mask & InotifyConstants.IN_CLOSE_WRITE:
            fs_event = FileClosedEvent(path)
        elif mask & InotifyConstants.IN_MODIFY:
            fs_event = FileModifiedEvent(path)
        else:
            return
        self._deliver(fs_event, self.watch)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self.stop()  # the directory is gone or unmounted: DirectoryWatch sees a dead emitter

    def on_queue_overflow(self) -> None:
        pass  # watchdog >= 7.1 only, and never called: run() reads the overflow itself

    def on_events_lost(self) -> None:
        pass  # likewise

    def _events_lost(self) -> None:
        # The periodic resync reads everything again in any case (the watcher's repair for
        # any lost event); the event says it happened. watchdog has it from 7.1 on.
        _logger.warning(
            "the kernel's inotify queue overflowed (events of %s were dropped): everything "
            "there is read again; if this repeats, raise fs.inotify.max_queued_events",
            self._path,
        )
        if _EventsLostEvent is not None:
            self._deliver(_EventsLostEvent(self._path, is_directory=True), self.watch)


class _InotifyObserver(BaseObserver):
    """A watchdog observer whose emitters call its handlers themselves (``_InotifyEmitter``);
    its own thread has nothing to dispatch and waits for ``stop()``."""

    def __init__(self) -> None:
        super().__init__(_InotifyEmitter)
        self._emitter_kwargs["deliver"] = self._deliver

    def _deliver(self, event: FileSystemEvent, watch: ObservedWatch) -> None:
        # Without the observer's lock: stop() holds it while it joins the emitter calling this.
        # A handler unscheduled meanwhile gets no later event (the dict read is atomic).
        for handler in tuple(self._handlers.get(watch, ())):
            handler.dispatch(event)


class _EventRecorder(FileSystemEventHandler):
    """Hands watchdog's events to ``sink``, on watchdog's thread."""

    def __init__(self, sink: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        self._sink(event)


def start_observer(
    directory: str,
    sink: Callable[[FileSystemEvent], None],
    *,
    force_polling: bool,
    log: logging.Logger,
) -> tuple[BaseObserver, bool]:
    """A running observer of ``directory`` (non-recursive) and whether it polls.

    inotify unless ``force_polling``, or unless no inotify instance or watch can be had
    (EMFILE: fs.inotify.max_user_instances; ENOSPC: max_user_watches), which is logged.
    """
    if not force_polling:
        try:
            return _start(_InotifyObserver(), directory, sink), False
        except OSError as exc:
            if exc.errno not in _INOTIFY_EXHAUSTED:
                raise
            log.warning(
                "cannot watch %s with inotify (%s: no inotify instance or watch left, see "
                "fs.inotify.max_user_instances and max_user_watches); polling every %.1f s "
                "instead, changes will show up more slowly",
                directory,
                exc,
                POLL_INTERVAL,
            )
    return _start(PollingObserver(timeout=POLL_INTERVAL), directory, sink), True


def _start(
    observer: BaseObserver, directory: str, sink: Callable[[FileSystemEvent], None]
) -> BaseObserver:
    try:
        observer.schedule(
            _EventRecorder(sink),
            directory,
            recursive=False,
            event_filter=_EVENT_FILTER,
            follow_symlink=True,  # the directory path itself may be a symlink
        )
        observer.start()
    except BaseException:
        observer.stop()  # releases the inotify instance created by the constructor
        raise
    return observer


def observer_healthy(observer: BaseObserver | None) -> bool:
    """The observer runs and still watches (an inotify emitter stops when its directory goes)."""
    if observer is None or not observer.is_alive():
        return False
    emitters = tuple(observer.emitters)
    return bool(emitters) and all(emitter.is_alive() for emitter in emitters)


def stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    if observer.ident is not None:  # it was started
        observer.join()


def directory_identity(directory: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory now at ``directory``; None if there is none."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class DirectoryWatch:
    """A live observer on the directory now at ``directory`` (non-recursive).

    Not thread-safe: one thread drives it (``start()`` before the worker exists, then the
    worker). Other threads only read ``polling`` and ``healthy``, single attributes.
    """

    def __init__(
        self,
        directory: str,
        sink: Callable[[FileSystemEvent], None],
        *,
        force_polling: bool,
        log: logging.Logger,
    ) -> None:
        self._directory = directory
        self._sink = sink
        self._force_polling = force_polling
        self._log = log
        self.observer: BaseObserver | None = None
        self.polling = False
        """The observer polls (no inotify, or ``force_polling``): events never report a close."""
        self.identity: tuple[int, int] | None = None
        """The identity of the directory being watched."""
        self.lost = False
        """The directory is missing; it is looked for again at ``next_check``."""
        self.next_check = 0.0

    @property
    def healthy(self) -> bool:
        return observer_healthy(self.observer)

    @staticmethod
    def in_doubt(event: FileSystemEvent) -> bool:
        """Whether ``event``, of the watched directory itself, means the watch must be checked
        and everything read again: the directory deleted or moved, or events of it dropped."""
        return isinstance(event, DirDeletedEvent | DirMovedEvent) or events_lost(event)

    def start(self, identity: tuple[int, int]) -> None:
        """Start observing the directory whose identity the caller has just read."""
        self._start_observer()
        self.identity = identity

    def stop(self) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            stop_observer(observer)

    def ensure(self) -> bool:
        """Make sure a live observer watches the directory now at the path; False if missing."""
        identity = directory_identity(self._directory)
        if identity is None:
            self.lose()
            return False
        if identity == self.identity and self.healthy:
            return True
        self._log.warning(
            "the watch on %s was lost (directory replaced, deleted or observer stopped); "
            "watching it again and re-reading every key",
            self._directory,
        )
        self.stop()
        try:
            self._start_observer()
        except OSError:
            self.lose()
            return False
        # Compare with a stat taken after the watch was added: a directory replaced in between
        # would otherwise stay unwatched.
        if directory_identity(self._directory) != identity:
            self.lose()
            return False
        self.identity = identity
        self.lost = False
        return True

    def lose(self) -> None:
        """The directory is missing: drop the observer and look for it again soon."""
        if not self.lost:
            self._log.warning(
                "%s is missing; keeping the current content and looking for it every %.1f s",
                self._directory,
                MISSING_DIRECTORY_POLL,
            )
        self.lost = True
        self.next_check = time.monotonic() + MISSING_DIRECTORY_POLL
        self.stop()

    def _start_observer(self) -> None:
        self.observer, self.polling = start_observer(
            self._directory, self._sink, force_polling=self._force_polling, log=self._log
        )
