"""A kubelet version read while kubelet writes it, so that its swap is a check of what changed.

Kubelet rewrites every file of a volume on each update: it makes a new ``..<timestamp>``
directory beside ``..data``, writes every key into it, points ``..data_tmp`` at it and renames
that over ``..data``. Reading the 1,000 files of a volume after the swap (4.7 ms alone, ~16 ms
while kubelet removes the old version's 1,000 files beside it on a busy 2-core machine) was
most of a one-key change's propagation at 1,000 keys; so was, next, a ``stat`` of each file
at the swap to tell it was still the one read (4 ms of a 7 ms swap, racing those removals).
The watch on the mount sees the new directory created, so ``MountWatcher``'s worker reads it
meanwhile: it puts an inotify watch of its own on that directory (``publisher._inotify``),
lists it once, and then reads each file as kubelet closes it, until ``..data_tmp`` or
``..data`` names the directory (kubelet wrote everything before). Each file read is compared
with what was delivered before (``baseline``), so the swap knows which keys changed without
looking at the others. ``on_begin`` (``hint``) runs on watchdog's thread as soon as the new
directory is seen, before the worker's hop: the daemon reads what the keys' workers have seen
meanwhile, so that the swap's publish waits for one Redis round trip instead of two
(``publisher.daemon``). Its price, once per update, is an inotify instance and ~3 events per
file (create, write, close) taken every ``_POLL`` while kubelet writes; an idle volume costs
nothing.

Nothing read here is published as it is. At the swap the read of ``..data``'s target
(``publisher._mount``) asks ``take`` for it; only the directory pre-read is taken, after its
events queued so far are taken too (``..data`` names it: kubelet's writes are all queued):

- any event for a name after its read (a write, a truncation, a close after writing, the name
  deleted, renamed away or over) drops what was read of it: it is read again at the swap,
  with every check of ``publisher._mount``, as is every name not read here (a symlink, a
  directory, a file over the limit or with other hard links, a name that is not UTF-8);
- the directory's names are its one listing plus the events' creations and removals (the
  watch was there before the listing), so the swap lists nothing;
- without a trustworthy watch (no inotify, a queue overflow, the directory itself moved or
  deleted) what was read is checked at the swap one ``stat`` per file (device, inode, size,
  modification and change times: kubelet never writes a file twice) and the rest read;
- another target, or no pre-read at all (a lost event), is read whole at the swap.

What inotify does not see, and so a change the swap would miss: a write through an mmap made
after the file was closed, and a write through another hard link made after the read (the
file had one when read). Both need write access to kubelet's own files.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from publisher._inotify import CLOSE_WRITE, GONE, LOST, MOVED_TO, Inotify
from publisher._mount import DATA_LINK, FileVersion, resolve_target, version_of

__all__ = ["NEW_DATA_LINK", "Known", "PreRead", "is_kubelet_version"]

NEW_DATA_LINK = "..data_tmp"
"""The link kubelet points at the new directory right before renaming it over ``..data``."""

_logger = logging.getLogger(__name__)

_POLL = 0.002  # between two looks while kubelet writes
_GIVE_UP = 5.0  # a directory still unfinished after this long is read at its swap
_BATCH = 32  # files read between two checks that no swap waits
_NO_CONTENT: Mapping[str, bytes] = {}
_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW


@dataclass(frozen=True, slots=True)
class Known:
    """What ``PreRead`` read of a target before it was swapped in (``read_mount``
    takes over ``files`` and ``versions``)."""

    files: dict[str, bytes]
    versions: dict[str, FileVersion]
    to_read: list[str] | None
    """The target's other names, the only ones read (``files`` are known to be what it
    holds); None: the target is listed and each of ``files`` checked with a ``stat``."""
    baseline: Mapping[str, bytes]
    same: Collection[str]
    """Keys of ``files`` whose content is the one ``baseline`` has."""


class PreRead:
    """The pre-read of one new ``..<timestamp>`` directory (``MountWatcher``'s worker only)."""

    def __init__(
        self,
        directory: str,
        limit: int,
        keys: frozenset[str] | None,
        on_begin: Callable[[], None] | None = None,
    ) -> None:
        self._directory = directory
        self._on_begin = on_begin
        self._limit = limit
        self._keys = keys  # the watcher's selection (None: every key)
        self.name: str | None = None  # the directory being (or last) pre-read, until taken
        self.files: dict[str, bytes] = {}  # what was read and not changed since (as of events)
        self._versions: dict[str, FileVersion] = {}
        self._names: set[str] = set()  # the directory's selected names (listing and events)
        self._closed: set[str] = set()  # names not read whose writer has closed them
        self._same: set[str] = set()  # names in files whose content is the baseline's
        self._baseline = _NO_CONTENT
        self._fd = -1  # the directory, open from run() until take()/begin()/close()
        self._inotify: Inotify | None = None  # made at the first run(), closed by close()
        self._wd: int | None = None  # the directory's watch, from run() until take()/begin()
        self._retired: int | None = None  # a taken directory's watch, removed at begin()
        self._trusted = False  # the watch saw every event since before the listing
        self.taken: tuple[str, list[str] | None] | None = None  # the last take: name, to_read

    def begin(self, name: str, baseline: Mapping[str, bytes]) -> None:
        """Pre-read ``name`` next; ``baseline``: the content delivered now, to compare with."""
        self._end()
        self.name, self._baseline = name, baseline
        self.files, self._versions = {}, {}
        self._names, self._closed, self._same = set(), set(), set()

    def close(self) -> None:
        """The end of the watcher (its worker's last step)."""
        self._end()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def _end(self) -> None:
        for wd in (self._wd, self._retired):
            if wd is not None:
                assert self._inotify is not None
                self._inotify.unwatch(wd)
        self._wd = self._retired = None
        self._close_directory()

    def _close_directory(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._trusted = False

    def hint(self) -> None:
        """A new version was seen created (on watchdog's thread): ``on_begin`` at once."""
        if self._on_begin is not None:
            try:
                self._on_begin()
            except Exception:
                _logger.exception("the hook for a new version of %s failed", self._directory)

    def take(self, target: str) -> Known | None:
        """What was pre-read of ``target`` (``..data`` names it now), for ``read_mount``;
        None if it was not pre-read. Hands it over: a later read of it reads it whole."""
        if target != self.name or self._fd < 0:
            return None
        if self._wd is not None:
            self._take_events()
        to_read = sorted(self._names - self.files.keys()) if self._trusted else None
        known = Known(self.files, self._versions, to_read, self._baseline, self._same)
        self.taken, self.name = (target, to_read), None
        self.files, self._versions, self._same = {}, {}, set()
        # its watch goes at the next begin(): removing a watch visits every file of the
        # directory (1,000 files: 0.3 ms), no cost for the swap. Kubelet leaves it alone
        # until then (it deletes it after the next swap).
        self._retired, self._wd = self._wd, None
        self._close_directory()
        return known

    def run(self, stopping: Callable[[], bool], pause: Callable[[float], bool]) -> None:
        """Read the new directory's files as kubelet writes them, until it is done with them
        (or ``stopping()``, or it takes over ``_GIVE_UP`` s). Between two looks it calls
        ``pause(_POLL)``, which waits at most that long and says whether to end: kubelet's
        swap ends the pre-read at once, where a sleep held the swap's read back up to
        ``_POLL``. The swap may have been read during the pause (``take``, on another thread:
        ``MountWatcher``'s ``swaps_on_event``): then nothing is left to read."""
        name = self.name
        if name is None or self._fd >= 0:
            return
        path = os.path.join(self._directory, name)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # gone already, or not a directory of its own: read at the swap
        self._watch_directory()
        try:
            deadline = time.monotonic() + _GIVE_UP
            self._list()
            while not stopping() and time.monotonic() < deadline:
                done = self._written(name)  # before the look: then it sees everything
                if self._wd is None:
                    self._list()
                else:
                    self._take_events()
                self._read_closed(stopping)
                if done or pause(_POLL) or self.name != name:
                    return
        except OSError:
            self._end()  # the directory went away (kubelet gave up on it): nothing to keep

    def _watch_directory(self) -> None:
        """Watch the directory just opened, before its listing: whatever happens to it next
        is then in the queue, after what older watches left there (dropped here)."""
        if self._inotify is None:
            self._inotify = Inotify.create()
            if self._inotify is None:
                return
        self._inotify.drain()
        self._wd = self._inotify.watch(self._fd)
        self._trusted = self._wd is not None

    def _list(self) -> None:
        for entry in os.listdir(self._fd):
            if entry not in self._names and self._wanted(entry):
                self._names.add(entry)
                self._closed.add(entry)  # written before the watch began, or mid-write

    def _take_events(self) -> None:
        assert self._inotify is not None
        for wd, mask, name in self._inotify.drain():
            if wd != self._wd:  # an overflow (-1), or what an older watch left
                self._trusted = self._trusted and wd >= 0
                continue
            if mask & LOST:
                self._trusted = False
                continue
            if not self._wanted(name):
                continue
            self._forget(name)  # whatever happened, what was read of it may be gone
            self._closed.discard(name)
            if mask & GONE:
                self._names.discard(name)
                continue
            self._names.add(name)
            if mask & (CLOSE_WRITE | MOVED_TO):
                self._closed.add(name)

    def _forget(self, name: str) -> None:
        if self.files.pop(name, None) is not None:
            del self._versions[name]
            self._same.discard(name)

    def _read_closed(self, stopping: Callable[[], bool]) -> None:
        """Read the files written since the last look; a swap (``stopping``) is not kept
        waiting (what is left is read at the swap, as what was never pre-read)."""
        closed, self._closed = self._closed, set()
        for count, name in enumerate(closed, 1):
            if count % _BATCH == 0 and stopping():
                self._closed = closed - self.files.keys()
                return
            self._read(name)

    def _wanted(self, name: str) -> bool:
        return (
            bool(name) and not name.startswith(".") and (self._keys is None or name in self._keys)
        )

    def _written(self, name: str) -> bool:
        """Whether kubelet has written every file of ``name`` (it links it in only then)."""
        if resolve_target(self._directory) == name:
            return True
        try:
            return os.readlink(os.path.join(self._directory, NEW_DATA_LINK)) == name
        except OSError:
            return False

    def _read(self, name: str) -> None:
        """Read ``name`` if it is a key's plain file; anything else (a symlink, a directory,
        a file over the limit or with other links, a name not UTF-8, an error) is left to the
        swap's read, which says what is wrong."""
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                return
        try:
            fd = os.open(name, _FLAGS, dir_fd=self._fd)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self._limit or st.st_nlink != 1:
                return
            data = os.read(fd, st.st_size + 1)
        except OSError:
            return
        finally:
            os.close(fd)
        if len(data) == st.st_size:  # else it grew meanwhile: read at the swap
            self.files[name] = data
            self._versions[name] = version_of(st)
            if self._baseline.get(name) == data:
                self._same.add(name)


def is_kubelet_version(name: str) -> bool:
    """A ``..<timestamp>`` directory name: kubelet's own entries that are not its links."""
    return name.startswith("..") and name not in {DATA_LINK, NEW_DATA_LINK, ".."}
