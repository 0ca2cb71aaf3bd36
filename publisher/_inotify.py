"""A minimal inotify instance for ``publisher._preread`` (Linux; ctypes).

watchdog's observer watches the mount itself; this watches kubelet's new ``..<timestamp>``
directory while the pre-read reads it, so that the swap needs no ``stat`` per file to know
that what was read is still there (``publisher._preread`` says what counts). Non-blocking:
``drain`` returns what is queued now. ``Inotify.create`` and ``watch`` return None where
there is no inotify (another OS, no instance or watch left): the pre-read then checks files
one by one at the swap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Callable

__all__ = ["CLOSE_WRITE", "GONE", "LOST", "MOVED_TO", "Inotify"]

_logger = logging.getLogger(__name__)

# <sys/inotify.h>
_MODIFY, _CLOSE_WRITE, _MOVED_FROM, _MOVED_TO = 0x2, 0x8, 0x40, 0x80
_CREATE, _DELETE, _DELETE_SELF, _MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_UNMOUNT, _Q_OVERFLOW, _IGNORED, _ONLYDIR = 0x2000, 0x4000, 0x8000, 0x1000000

# What changes a file's content or which file a name is: a write or truncation (MODIFY), a
# close after writing (what an mmap wrote), a name created, deleted or renamed. Not ATTRIB:
# kubelet's chmod after each write would be a fourth event per file and changes no content.
_MASK = _MODIFY | _CLOSE_WRITE | _CREATE | _DELETE | _MOVED_FROM | _MOVED_TO
_MASK |= _DELETE_SELF | _MOVE_SELF | _ONLYDIR

CLOSE_WRITE, MOVED_TO = _CLOSE_WRITE, _MOVED_TO
GONE = _DELETE | _MOVED_FROM
"""The name no longer names what it did (deleted or renamed away)."""
LOST = _Q_OVERFLOW | _IGNORED | _DELETE_SELF | _MOVE_SELF | _UNMOUNT
"""Events were dropped or the directory is no longer the one watched: nothing can be told."""

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
_BUFFER = 64 * 1024

_Functions = tuple[
    Callable[[int], int], Callable[[int, bytes, int], int], Callable[[int, int], int]
]


def _functions() -> _Functions | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        int_ = ctypes.c_int
        init1 = ctypes.CFUNCTYPE(int_, int_, use_errno=True)(("inotify_init1", libc))
        add = ctypes.CFUNCTYPE(int_, int_, ctypes.c_char_p, ctypes.c_uint32, use_errno=True)(
            ("inotify_add_watch", libc)
        )
        rm = ctypes.CFUNCTYPE(int_, int_, int_, use_errno=True)(("inotify_rm_watch", libc))
    except (OSError, AttributeError):
        return None
    return init1, add, rm


_LIBC = _functions()


class Inotify:
    """One inotify instance, for one watched directory at a time. It lives as long as its
    ``PreRead``: closing an instance waits for the kernel's grace period (13-20 ms here),
    removing a watch does not (1 us)."""

    def __init__(self, fd: int, libc: _Functions) -> None:
        self._fd = fd
        self._libc = libc

    @classmethod
    def create(cls) -> Inotify | None:
        """A new instance; None if inotify cannot be had."""
        if _LIBC is None:
            return None
        fd = _LIBC[0](os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            _logger.debug("no inotify instance: %s", os.strerror(ctypes.get_errno()))
            return None
        return cls(fd, _LIBC)

    def watch(self, dir_fd: int) -> int | None:
        """Watch the directory open as ``dir_fd``: its watch descriptor, None if none can be
        had. Added through ``/proc/self/fd``: the very directory opened, whatever its path
        names by now."""
        wd = self._libc[1](self._fd, f"/proc/self/fd/{dir_fd}".encode(), _MASK)
        if wd < 0:
            _logger.debug("no inotify watch: %s", os.strerror(ctypes.get_errno()))
            return None
        return wd

    def unwatch(self, wd: int) -> None:
        self._libc[2](self._fd, wd)  # fails only when the watch went with its directory

    def drain(self) -> list[tuple[int, int, str]]:
        """Every event queued now, in order: (watch descriptor, mask, name); an empty name for
        the directory's own events, wd -1 for a queue overflow (``LOST``)."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                buffer = os.read(self._fd, _BUFFER)
            except BlockingIOError:
                return events
            except OSError:  # not expected: tell the caller nothing can be trusted
                return [*events, (-1, _Q_OVERFLOW, "")]
            offset, end = 0, len(buffer)
            while offset < end:
                wd, mask, _cookie, length = _HEADER.unpack_from(buffer, offset)
                offset += 16
                name = buffer[offset : offset + length].rstrip(b"\0")
                offset += length
                events.append((wd, mask, os.fsdecode(name)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
