"""How a watched directory is read, and how a subPath mount is told: helpers of MountWatcher.

``MountWatcher`` decides when to call them; the watch itself (watchdog) is ``publisher._observe``.

Reading a directory that kubelet (or an editor, or any writer) may be changing at that moment:

- A ConfigMap volume holds ``..data -> ..2024_01_01_00_00_00.123`` plus ``key -> ..data/key``
  links. Kubelet never changes a timestamped directory after ``..data`` points at it: it writes
  a new one, swaps ``..data`` (one rename) and then deletes the old one. So every key is read
  as ``<dir>/<resolved target>/<key>``; if the target disappears mid-read (a swap happened),
  the whole read starts again, and all keys of one read come from one version.
- A plain directory is read as ``<dir>/<key>`` (following symlinks); nothing makes its files
  consistent with each other or complete, so each file's version comes with its content and
  the caller decides when to trust it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass, field

from subscriber.errors import HotReloadError

DATA_LINK = "..data"
"""The symlink kubelet swaps atomically; it points at the current timestamped directory."""

# Reading a mount restarts when kubelet swaps ..data under it; a swap takes well under a
# millisecond of our time, so running out of retries means updates arrive back to back and the
# caller should simply try again a little later.
_SWAP_RETRIES = 20


FileVersion = tuple[int, int, int, int, int]
"""(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): equal versions mean no change between."""


class ConcurrentSwaps(HotReloadError):
    """``..data`` changed on every one of the read attempts; try again later."""


class _TargetGone(Exception):
    """The resolved ``..data`` target vanished or changed while it was being read."""


class _NotARegularFile(Exception):
    """The key names a directory, FIFO, socket or device: not a key with content."""


@dataclass(slots=True)
class MountRead:
    """The result of one consistent read of a directory."""

    target: str | None
    """The ``..data`` target every key was read from; None for a plain directory."""
    files: dict[str, bytes] = field(default_factory=dict)
    unreadable: dict[str, OSError] = field(default_factory=dict)
    """Keys that exist but could not be read (permissions, I/O errors)."""
    versions: dict[str, FileVersion] = field(default_factory=dict)
    """For each key in ``files``: the identity and timestamps of the file it was read from."""


def resolve_target(directory: str) -> str | None:
    """The name ``..data`` points at, or None when the directory is not a kubelet volume."""
    try:
        return os.readlink(os.path.join(directory, DATA_LINK))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # ..data exists but is not a symlink: not kubelet's
            return None
        raise


def read_mount(directory: str, keys: Collection[str] | None, held: Collection[str]) -> MountRead:
    """Read ``keys`` (None: every name not starting with '.') from ``directory``.

    ``held`` names plain-directory keys that are being written in place right now: they are
    not read at all (a kubelet volume is never written in place, so it ignores ``held``).
    Raises ``ConcurrentSwaps`` when ``..data`` keeps changing under the read, and ``OSError``
    when the directory itself cannot be listed (for instance because it is gone).
    """
    for _ in range(_SWAP_RETRIES):
        target = resolve_target(directory)
        if target is None:
            return _read_plain(directory, keys, held)
        try:
            return _read_target(directory, target, keys)
        except _TargetGone:
            continue
    raise ConcurrentSwaps(directory)


def _read_target(directory: str, target: str, keys: Collection[str] | None) -> MountRead:
    base = os.path.join(directory, target)
    result = MountRead(target)
    if keys is None:
        try:
            names = sorted(filter(_is_candidate, os.listdir(base)))
        except (FileNotFoundError, NotADirectoryError):
            names = []  # ..data points nowhere (checked next): a broken volume has no keys
        # Kubelet deletes a target only after swapping ..data away from it, so a listing is
        # complete if ..data still points at its target afterwards; otherwise it may have been
        # taken while the old target was being emptied.
        if resolve_target(directory) != target:
            raise _TargetGone
    else:
        names = sorted(keys)
    for name in names:
        try:
            data, version = read_file(os.path.join(base, name))
        except (FileNotFoundError, NotADirectoryError):
            if resolve_target(directory) != target:
                raise _TargetGone from None
            continue  # this version of the ConfigMap has no such key
        except _NotARegularFile:
            continue  # a nested key path: kubelet made a directory for it
        except OSError as exc:
            result.unreadable[name] = exc
            continue
        result.files[name] = data
        result.versions[name] = version
    return result


def _read_plain(directory: str, keys: Collection[str] | None, held: Collection[str]) -> MountRead:
    result = MountRead(None)
    if keys is None:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if _is_candidate(entry.name))
    else:
        names = sorted(keys)
    for name in names:
        if name in held:
            continue
        try:
            data, version = read_file(os.path.join(directory, name))
        except (FileNotFoundError, NotADirectoryError, _NotARegularFile):
            continue
        except OSError as exc:
            result.unreadable[name] = exc
            continue
        result.files[name] = data
        result.versions[name] = version
    return result


def _is_candidate(name: str) -> bool:
    # Dot names are kubelet's own entries (..data, ..data_tmp, ..<timestamp>) and editors'
    # swap files; they are never keys.
    return not name.startswith(".")


def read_file(path: str) -> tuple[bytes, FileVersion]:
    """Content of the regular file at ``path`` and the version it had when the read began.

    O_NONBLOCK keeps a FIFO placed under a key's name from blocking the watcher forever; it
    has no effect on regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        # Checked before os.fdopen, which refuses a directory with an error naming the file
        # descriptor ("Is a directory: 6") instead of the path.
        if not stat.S_ISREG(st.st_mode):
            raise _NotARegularFile(path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        return file.read(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


MOUNTINFO = "/proc/self/mountinfo"
"""Where this process's mount points are listed, with their filesystem types."""

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def is_mount_point(path: str, mountinfo: str) -> bool:
    """True if ``path`` is listed as a mount point in ``mountinfo`` (a /proc/<pid>/mountinfo).

    A Kubernetes ``subPath`` volume mount is a bind mount of one file, so the file itself shows
    up as a mount point. An unreadable mountinfo means "cannot tell": False.
    """
    real = os.path.realpath(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                fields = line.split()
                # field 5 is the mount point; the kernel escapes space, tab, newline and '\'
                if len(fields) > 4 and unescape_mountinfo(fields[4]) == real:
                    return True
    except OSError:
        return False
    return False


def unescape_mountinfo(field_text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\040, \\011, \\012, \\134."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field_text)


def is_regular_file(path: str) -> bool:
    # lstat reads metadata only: unlike open() it generates no inotify event.
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
