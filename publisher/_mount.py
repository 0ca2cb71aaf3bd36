"""How a watched directory is read, and how a subPath mount is told: helpers of MountWatcher.

``MountWatcher`` decides when to call them; the watch itself (watchdog) is ``publisher._observe``.

Reading a directory that kubelet (or an editor, or any writer) may be changing at that moment:

- A ConfigMap volume holds ``..data -> ..2024_01_01_00_00_00.123`` plus ``key -> ..data/key``
  links. Kubelet never changes a timestamped directory after ``..data`` points at it: it writes
  a new one, swaps ``..data`` (one rename) and then deletes the old one. So every key is read
  as ``<dir>/<resolved target>/<key>``; if the target disappears mid-read (a swap happened),
  the whole read starts again, and all keys of one read come from one version.
- A plain directory is read as ``<dir>/<key>``; nothing makes its files consistent with each
  other or complete, so each file's version comes with its content and the caller decides when
  to trust it.

What is never read, whoever can write into the directory:

- a file that leads outside the watched directory (``confine``, the default): a symlink to
  ``/proc/self/environ`` or to the daemon's signing key would otherwise publish the daemon's
  environment or its key. Where the opened file really is comes from the kernel
  (``/proc/self/fd``), so swapping a link between a check and the open changes nothing. A
  kubelet volume stays inside by construction (``key -> ..data/key``, ``..data`` -> a
  timestamped directory beside it), and a ``..data`` pointing anywhere but at a name in the
  directory is not taken for kubelet's (``resolve_target``);
- more than ``limit`` bytes: the size is checked with ``fstat`` before reading and at most
  ``limit + 1`` bytes are read (a sparse 1 GiB file once took the daemon to 2 GiB);
- a name that is not UTF-8 (``listdir`` hands it over with surrogate escapes): no ConfigMap
  key is, and it could not be encoded for Redis.

Such keys come back in ``MountRead.skipped`` (with the reason) or ``MountRead.unreadable``
(with the ``OSError``: ``FileTooLarge`` for the size), never as an exception.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from publisher._printable import printable
from subscriber.errors import HotReloadError
from subscriber.protocol import MAX_CONTENT_BYTES

if TYPE_CHECKING:
    from publisher._preread import Known

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


class FileTooLarge(HotReloadError, OSError):
    """A file over the size limit, refused before reading it (``errno.EFBIG``)."""

    def __init__(self, path: str, size: int, limit: int) -> None:
        super().__init__(errno.EFBIG, f"{size} bytes, over the {limit}-byte limit", path)
        self.size = size
        self.limit = limit


class _TargetGone(Exception):
    """The resolved ``..data`` target vanished or changed while it was being read."""


class _NotARegularFile(Exception):
    """The key names a directory, FIFO, socket or device: not a key with content."""


class _Outside(Exception):
    """The key's file lies outside the watched directory (``args[0]``: where it is)."""


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
    skipped: dict[str, str] = field(default_factory=dict)
    """Names deliberately not read, with the reason: a file outside the directory, a name
    that is not UTF-8 (see the module docstring)."""
    same: tuple[Mapping[str, bytes], Collection[str]] = ({}, ())
    """A content and keys of ``files`` known to be the same there (``Known``)."""


@dataclass(frozen=True, slots=True)
class MountContent:
    """The content of a watched directory's keys at one moment (not the multi-key snapshot
    format ``hotreload watch --snapshot`` publishes: that is one value made from it)."""

    directory: str
    """The watched directory (absolute)."""
    target: str | None
    """The resolved ``..data`` target of a kubelet volume; None for a plain directory."""
    files: Mapping[str, bytes] = field(repr=False)  # config content stays out of logs
    """Key -> content for every selected key that exists now, all from one ``..data`` target."""
    changed: frozenset[str]
    """Keys whose content differs from the previously delivered content (new keys included)."""
    removed: frozenset[str]
    """Keys present in the previously delivered content but gone now."""
    unreadable: Mapping[str, OSError] = field(default_factory=lambda: MappingProxyType({}))
    """Keys that exist but could not be read, with the error (``publisher._mount.FileTooLarge``
    for a file over the size limit); their previous content (if any) stays in ``files``, so a
    consumer that ignores this field sees them as unchanged."""


def resolve_target(directory: str) -> str | None:
    """The name ``..data`` points at, or None when the directory is not a kubelet volume.

    Kubelet's ``..data`` always names a directory beside it; one pointing anywhere else
    (``/proc/self``, ``../other``) was not made by kubelet, and reading keys through it would
    read outside the directory: the directory is then read as a plain one.
    """
    try:
        target = os.readlink(os.path.join(directory, DATA_LINK))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # ..data exists but is not a symlink: not kubelet's
            return None
        raise
    if not target or os.sep in target or target in {".", ".."}:
        return None
    return target


class _Limits:
    """What a read may take: at most ``size`` bytes per file, only files under ``inside``
    (the directory's real path, found at the first file opened: a swap confirmed against
    the pre-read opens none, and ``realpath``'s walk of every component was a third of its
    read; None: follow symlinks anywhere)."""

    __slots__ = ("_directory", "_inside", "size")

    def __init__(self, size: int, directory: str | None) -> None:
        self.size = size
        self._directory = directory
        self._inside: str | None = None

    @property
    def inside(self) -> str | None:
        if self._inside is None and self._directory is not None:
            self._inside = os.path.realpath(self._directory)
        return self._inside


def read_mount(
    directory: str,
    keys: Collection[str] | None,
    held: Collection[str],
    *,
    confine: bool = True,
    limit: int = MAX_CONTENT_BYTES,
    known: Callable[[str], Known | None] | None = None,
) -> MountRead:
    """Read ``keys`` (None: every name not starting with '.') from ``directory``.

    ``held`` names plain-directory keys that are being written in place right now: they are
    not read at all (a kubelet volume is never written in place, so it ignores ``held``).
    ``confine``: files outside ``directory`` are skipped; ``limit``: larger files are
    unreadable (``FileTooLarge``), see the module docstring. Raises ``ConcurrentSwaps`` when
    ``..data`` keeps changing under the read, and ``OSError`` when the directory itself cannot
    be listed (for instance because it is gone). ``known``: what was read of the target
    before (``publisher._preread``), asked once the target is resolved.
    """
    limits = _Limits(limit, directory if confine else None)
    for _ in range(_SWAP_RETRIES):
        target = resolve_target(directory)
        if target is None:
            return _read_plain(directory, keys, held, limits)
        before = known(target) if known is not None else None
        if before is not None:
            known = None  # taken: a read started again reads the target whole
        try:
            return _read_target(directory, target, keys, limits, before)
        except _TargetGone:
            continue
    raise ConcurrentSwaps(directory)


def _read_target(
    directory: str,
    target: str,
    keys: Collection[str] | None,
    limits: _Limits,
    known: Known | None,
) -> MountRead:
    base = os.path.join(directory, target)
    result = MountRead(target)
    checked: Mapping[str, bytes] = {}  # pre-read files to check with a stat
    if known is not None and known.to_read is not None:
        result.files, result.versions = known.files, known.versions
        result.same = (known.baseline, known.same)
        names = _list_keys(known.to_read, result)
        if resolve_target(directory) != target:  # swapped away (and being emptied) since
            raise _TargetGone  # before the pre-read's last events were taken: start again
    elif keys is None:
        try:
            names = _list_keys(os.listdir(base), result)
        except (FileNotFoundError, NotADirectoryError):
            names = []  # ..data points nowhere (checked next): a broken volume has no keys
        # Kubelet deletes a target only after swapping ..data away from it, so a listing is
        # complete if ..data still points at its target afterwards; otherwise it may have been
        # taken while the old target was being emptied.
        if resolve_target(directory) != target:
            raise _TargetGone
    else:
        names = sorted(keys)
    if known is not None and known.to_read is None:
        checked = known.files
    if not names:  # every key known from the pre-read: nothing to open
        return result
    with _TargetDir(base, limits.inside) as opened:
        for name in names:
            if name in checked and opened.fd is not None and _still(opened.fd, name, known, result):
                continue
            _read_key(directory, target, base, name, opened, limits, result)
    return result


def _still(fd: int, name: str, known: Known | None, result: MountRead) -> bool:
    """Whether ``name`` in the target ``fd`` is the very file read before (same inode, size
    and times: ``publisher._preread``); if so its content goes to ``result`` unread."""
    assert known is not None
    version = known.versions[name]
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or version_of(st) != version:
        return False
    result.files[name] = known.files[name]
    result.versions[name] = version
    return True


class _TargetDir:
    """The target directory opened once, when it is inside the watched directory: its keys
    are opened relative to it (``dir_fd``, ``O_NOFOLLOW``), so a plain file needs no path
    walk and no check of where it leads; a symlink or nested path takes ``read_file``'s
    checked path (1,000 keys of 1 KiB: 5.6 instead of 8.1 ms, this 2-core machine)."""

    def __init__(self, base: str, inside: str | None) -> None:
        self.fd: int | None = None
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # every key takes the checked path, and says what is wrong
        if inside is not None and not _is_under(_opened_path(fd, base), inside):
            os.close(fd)
            return
        self.fd = fd

    def __enter__(self) -> _TargetDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _read_key(  # noqa: PLR0917 - one key of _read_target's loop, its state passed on
    directory: str,
    target: str,
    base: str,
    name: str,
    opened: _TargetDir,
    limits: _Limits,
    result: MountRead,
) -> None:
    try:
        if opened.fd is not None and os.sep not in name:
            try:
                fd = os.open(name, _FAST_FLAGS, dir_fd=opened.fd)
                data, version = _read_fd(fd, f"{base}{os.sep}{name}", limits.size)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                data, version = read_file(
                    os.path.join(base, name), limits.size, limits.inside
                )  # a symlink: where does it lead?
        else:
            data, version = read_file(os.path.join(base, name), limits.size, limits.inside)
    except (FileNotFoundError, NotADirectoryError):
        if resolve_target(directory) != target:
            raise _TargetGone from None
        return  # this version of the ConfigMap has no such key
    except _NotARegularFile:
        return  # a nested key path: kubelet made a directory for it
    except _Outside as outside:
        result.skipped[name] = _outside_reason(outside)
        return
    except OSError as exc:
        result.unreadable[name] = exc
        return
    result.files[name] = data
    result.versions[name] = version


def _read_plain(
    directory: str, keys: Collection[str] | None, held: Collection[str], limits: _Limits
) -> MountRead:
    result = MountRead(None)
    if keys is None:
        with os.scandir(directory) as entries:
            names = _list_keys((entry.name for entry in entries), result)
    else:
        names = sorted(keys)
    for name in names:
        if name in held:
            continue
        try:
            data, version = read_file(os.path.join(directory, name), limits.size, limits.inside)
        except (FileNotFoundError, NotADirectoryError, _NotARegularFile):
            continue
        except _Outside as outside:
            result.skipped[name] = _outside_reason(outside)
            continue
        except OSError as exc:
            result.unreadable[name] = exc
            continue
        result.files[name] = data
        result.versions[name] = version
    return result


def _list_keys(names: Iterable[str], result: MountRead) -> list[str]:
    """The names of a listing that may be keys, sorted; names that are not UTF-8 go to
    ``result.skipped``. Dot names are kubelet's own entries (``..data``, ``..data_tmp``,
    ``..<timestamp>``) and editors' swap files: never keys, never mentioned."""
    keys = []
    for name in names:
        if name.startswith("."):
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            result.skipped[name] = "its name is not UTF-8 (no ConfigMap key is); rename it"
            continue
        keys.append(name)
    return sorted(keys)


def _outside_reason(outside: _Outside) -> str:
    return (
        f"it leads outside the watched directory (to {printable(outside.args[0], limit=None)}); "
        "only files inside it are read"
    )


def read_file(
    path: str, limit: int = MAX_CONTENT_BYTES, inside: str | None = None
) -> tuple[bytes, FileVersion]:
    """Content of the regular file at ``path`` and the version it had when the read began.

    Raises ``FileTooLarge`` for a file over ``limit`` bytes without reading it (and reads at
    most ``limit + 1`` bytes of one growing meanwhile); with ``inside`` (a real path), a file
    that is not under it is not read (``_Outside``). O_NONBLOCK keeps a FIFO placed under a
    key's name from blocking the watcher forever; it has no effect on regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if inside is not None:
        where = _opened_path(fd, path)
        if not _is_under(where, inside):
            os.close(fd)
            raise _Outside(where)
    return _read_fd(fd, path, limit)


_FAST_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW


def _read_fd(fd: int, path: str, limit: int) -> tuple[bytes, FileVersion]:
    """``read_file`` once the file is open (and known to be where it may be); closes ``fd``."""
    try:
        st = os.fstat(fd)
        # Checked before reading: a directory, FIFO or device is not a key (reading a
        # directory fails with an error that names no path).
        if not stat.S_ISREG(st.st_mode):
            raise _NotARegularFile(path)
        if st.st_size > limit:
            raise FileTooLarge(path, st.st_size, limit)
        data = _read_all(fd, st.st_size, limit)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew since fstat
        raise FileTooLarge(path, len(data), limit)
    return data, version_of(st)


def version_of(st: os.stat_result) -> FileVersion:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_all(fd: int, size: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``fd``, asking for what ``fstat`` said is there (plus
    one, to see growth) rather than for ``limit + 1``: a buffered ``read(limit + 1)`` made a
    1 MiB buffer for every file, 12 of the 28 us per 1 KiB key (1,000 keys: 28 ms a read)."""
    parts = []
    total, want = 0, size + 1
    while total <= limit:
        chunk = os.read(fd, min(want, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if len(chunk) < want:
            break  # the end, as of this read (a second read found nothing: 1,000 syscalls)
        want = 64 * 1024  # it grew: on in chunks until the end
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _opened_path(fd: int, path: str) -> str:
    """Where the open file ``fd`` really is: the kernel's answer, so a symlink swapped after
    a check cannot redirect the read; ``realpath`` where there is no /proc."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _is_under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip(os.sep) + os.sep)


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
