"""A kubelet version read while kubelet writes it, so that its swap leaves only a compare.

Kubelet rewrites every file of a volume on each update: it makes a new ``..<timestamp>``
directory beside ``..data``, writes every key into it, points ``..data_tmp`` at it and renames
that over ``..data``. Reading the 1,000 files of a volume after the swap (4.7 ms alone, ~16 ms
while kubelet removes the old version's 1,000 files beside it on a busy 2-core machine) was
most of a one-key change's propagation at 1,000 keys. The watch on the mount sees the new
directory created, so ``MountWatcher``'s worker reads it meanwhile: every file as it appears,
until ``..data_tmp`` or ``..data`` names the directory (kubelet wrote everything before).
``on_begin`` (``hint``) runs on watchdog's thread as soon as the new directory is seen, before
the worker's hop: the daemon reads what the keys' workers have seen meanwhile, so that the
swap's publish waits for one Redis round trip instead of two (``publisher.daemon``). Events
reach the watcher 0.5-1.5 ms after kubelet's calls on this machine, so for a small version
the swap has often happened by then; the read still overlaps the swap's own read.
Its price is a listing of the directory every ``_POLL`` while kubelet writes (1,000 names:
~0.2 ms each), once per update; an idle volume costs nothing.

Nothing read here is published as it is. At the swap the read of ``..data``'s target
(``publisher._mount``) takes a pre-read file's content only if the target is the directory
pre-read and the file there is the very one read: same device, inode, size, modification and
change times (a file read half-written is still being written: its size or times move on, and
kubelet never writes a file twice). Anything else -- another target, a file changed, missing
or not pre-read, a lost event (no pre-read at all) -- is read at the swap as before.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

from publisher._mount import DATA_LINK, FileVersion, resolve_target, version_of

__all__ = ["NEW_DATA_LINK", "Known", "PreRead", "is_kubelet_version"]

NEW_DATA_LINK = "..data_tmp"
"""The link kubelet points at the new directory right before renaming it over ``..data``."""

_logger = logging.getLogger(__name__)

_POLL = 0.002  # between two listings while kubelet writes
_GIVE_UP = 5.0  # a directory still unfinished after this long is read at its swap

Known = dict[str, tuple[bytes, FileVersion]]
"""Name -> content and the version of the file it was read from."""


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
        self.name: str | None = None  # the directory being (or last) pre-read
        self.files: Known = {}

    def begin(self, name: str) -> None:
        self.name, self.files = name, {}

    def hint(self) -> None:
        """A new version was seen created (on watchdog's thread): ``on_begin`` at once."""
        if self._on_begin is not None:
            try:
                self._on_begin()
            except Exception:
                _logger.exception("the hook for a new version of %s failed", self._directory)

    def pending(self) -> tuple[str, Known] | None:
        """The directory pre-read last and its files, for ``read_mount``'s ``known``."""
        return (self.name, self.files) if self.name is not None else None

    def run(self, stopping: Callable[[], bool]) -> None:
        """Read the new directory's files as kubelet writes them, until it is done with them
        (or ``stopping()``, or it takes over ``_GIVE_UP`` s)."""
        name = self.name
        if name is None:
            return
        try:
            fd = os.open(
                os.path.join(self._directory, name),
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            )
        except OSError:
            return  # gone already, or not a directory of its own: read at the swap
        try:
            deadline = time.monotonic() + _GIVE_UP
            while not stopping() and time.monotonic() < deadline:
                done = self._written(name)  # before the listing: then the listing is whole
                for entry in os.listdir(fd):
                    if entry in self.files or entry.startswith("."):
                        continue
                    if self._keys is None or entry in self._keys:
                        self._read(fd, entry)
                if done:
                    return
                time.sleep(_POLL)
        except OSError:
            return  # the directory went away (kubelet gave up on it): nothing to keep
        finally:
            os.close(fd)

    def _written(self, name: str) -> bool:
        """Whether kubelet has written every file of ``name`` (it links it in only then)."""
        if resolve_target(self._directory) == name:
            return True
        try:
            return os.readlink(os.path.join(self._directory, NEW_DATA_LINK)) == name
        except OSError:
            return False

    def _read(self, fd: int, entry: str) -> None:
        try:
            file_fd = os.open(
                entry, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=fd
            )
        except OSError as exc:
            if exc.errno in {errno.ELOOP, errno.ENOENT, errno.EISDIR}:
                return  # a symlink or nested key (read at the swap), or not there yet
            raise
        try:
            st = os.fstat(file_fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self._limit:
                return  # read (and refused, or reported) at the swap as ever
            data = os.read(file_fd, st.st_size + 1)
        finally:
            os.close(file_fd)
        if len(data) == st.st_size:  # else it grew meanwhile: read at the swap
            self.files[entry] = (data, version_of(st))


def is_kubelet_version(name: str) -> bool:
    """A ``..<timestamp>`` directory name: kubelet's own entries that are not its links."""
    return name.startswith("..") and name not in {DATA_LINK, NEW_DATA_LINK, ".."}
