"""The seed's API: one file reloaded into ``callback(content)``, with the Go watcher's counters.

This project grew from a Go ``FileWatcher(path, callback, logger)``; its unit tests are the
executable spec (``tests/test_filewatcher_seed.py`` ports every one), so where this class
differs from what Python alone would suggest, it follows the seed: the initial load counts as
reload 1, a rejected update keeps the previous content, and a stopped watcher is never started
again (the Go one panics on that; this one says so and what to do). Detection itself is
``MountWatcher``'s, on the file's directory, because that is where kubelet's ``..data`` swap
happens. Importing this module loads neither Redis nor the daemon: a single-process user pays
for a file watcher only.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from publisher._mount import DATA_LINK, MOUNTINFO, is_mount_point
from publisher.watcher import MountContent, MountWatcher
from subscriber.errors import ConfigurationError, InitialLoadError
from subscriber.protocol import MAX_CONTENT_BYTES

__all__ = ["FileWatcher"]

_logger = logging.getLogger(__name__)

_MOUNTINFO = MOUNTINFO
"""Where mount points are listed; a test points this at a file of its own."""


def _is_a_directory(path: str) -> IsADirectoryError:
    return IsADirectoryError(
        errno.EISDIR,
        "Is a directory; FileWatcher watches one file: give the path of a file in it "
        f"(such as {os.path.join(path, 'app.yaml')}), or watch the whole directory with "
        "MountWatcher",
        path,
    )


class FileWatcher:
    """The Python form of the Go FileWatcher: reloads one file into ``callback(content)``.

    ``FileWatcher("")`` and a ``callback`` that is not callable raise ``ConfigurationError``.
    ``start()`` loads the file synchronously and raises ``InitialLoadError`` if it is missing, a
    directory, unreadable, not UTF-8, or rejected (``callback`` raised); a failed ``start()`` may
    be retried. Afterwards every content change is passed to ``callback`` on the watcher's
    thread; raising rejects it: the previous content stays active, ``error_count`` goes up by
    one, and the same content is not offered again until the file changes to something else.
    Unchanged content (same SHA-256) never calls back. A missing file is transient: the current
    content stays active until the file returns. ``stop()`` is final: like a thread, a watcher
    is started at most once.

    ``reload_count`` counts successful loads, the initial one included (it is 1 after
    ``start()``, as in the seed); ``error_count`` counts rejected, undecodable and unreadable
    updates; ``last_reload_time`` is the ``time.time()`` of the latest successful load.

    A file over ``max_bytes`` (default: what one event may carry, ``MAX_CONTENT_BYTES``) is
    not read: at ``start()`` that is an ``InitialLoadError``, later an unreadable update. The
    path may be a symlink to anywhere: the caller named it.
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
        max_bytes: int = MAX_CONTENT_BYTES,
    ) -> None:
        if not os.fspath(path):
            raise ConfigurationError(
                "FileWatcher: path is required: give the path of the file to watch, "
                "such as /etc/config/app.yaml"
            )
        if not callable(callback):
            raise ConfigurationError(
                "FileWatcher: callback is required: give a function that takes the new content "
                f"(str) and raises to reject it; got {callback!r}"
            )
        self._path = os.path.abspath(os.fspath(path))
        self._directory, self._key = os.path.split(self._path)
        if not self._key:  # "/": no file name in it
            raise ConfigurationError(f"FileWatcher: {_is_a_directory(self._path)}")
        self._callback = callback
        self._log = logger or _logger
        # One MountWatcher per start() attempt: a failed start() may be retried.
        self._new_mount = functools.partial(
            MountWatcher,
            self._directory,
            self._on_change,
            keys={self._key},
            settle=settle,
            resync_interval=resync_interval,
            force_polling=force_polling,
            logger=self._log,
            confine=False,  # the caller named this file, wherever it leads
            max_bytes=max_bytes,
        )
        self._mount = self._new_mount()  # validates the options now, not at start()
        # Held while content goes to the callback: makes the initial load come first.
        self._delivery_lock = threading.Lock()
        self._delivering = False  # the initial load succeeded: changes may reach the callback
        self._running = False
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
        """Load the file (calling ``callback`` with it) and watch it from now on."""
        with self._state_lock:
            if self._stopped:
                raise RuntimeError(
                    f"the FileWatcher of {self._path} was stopped and cannot be restarted; "
                    "create a new FileWatcher"
                )
            if self._running:
                raise RuntimeError(f"the FileWatcher of {self._path} was already started")
            self._running = True
        mount = self._mount
        error: BaseException | None = None
        # Holding the lock keeps a change found right after the first read from reaching the
        # callback before the initial content does.
        with self._delivery_lock:
            try:
                self._load_initial(mount.start())
                self._delivering = True
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after cleanup
                error = exc
        if error is not None:
            mount.stop()  # outside the lock: the worker may be waiting for it
            with self._state_lock:
                # As the seed's Start, a failed start() leaves nothing running and may be retried.
                self._mount = self._new_mount()
                self._running = False
            if isinstance(error, InitialLoadError) or not isinstance(error, Exception):
                raise error
            raise InitialLoadError(self._path, error) from error
        self._warn_if_subpath_mount()

    def stop(self) -> None:
        """Stop watching; idempotent, also before ``start()``. No callback runs once this
        returns (called from the callback itself, it cannot wait for that call to end, but no
        further one starts)."""
        # The seed's Stop is safe even on a nil *FileWatcher; the nearest Python has is an
        # object whose __init__ never ran (a subclass that raised before super().__init__()).
        mount: MountWatcher | None = getattr(self, "_mount", None)
        self._stopped = True
        if mount is not None:
            mount.stop()

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
        """The active content (the seed's GetLastContent)."""
        with self._state_lock:
            return self._content

    @property
    def last_hash(self) -> str:
        """Hex SHA-256 of the active content; "" before the initial load."""
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

    def _load_initial(self, mount: MountContent) -> None:
        if self._key in mount.unreadable:
            raise InitialLoadError(self._path, mount.unreadable[self._key])
        data = mount.files.get(self._key)
        if data is None:
            cause = (
                _is_a_directory(self._path)
                if os.path.isdir(self._path)
                else FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._path)
            )
            raise InitialLoadError(self._path, cause)
        content = data.decode("utf-8")
        self._callback(content)
        self._activate(content, hashlib.sha256(data).hexdigest())

    def _on_change(self, mount: MountContent) -> None:
        with self._delivery_lock:
            if self._delivering and not self._stopped:
                self._apply(mount)

    def _apply(self, mount: MountContent) -> None:
        error = mount.unreadable.get(self._key)
        if error is not None:
            if not self._unreadable:  # MountWatcher logged it, once
                self._unreadable = True
                self._count_error()
            return
        self._unreadable = False
        data = mount.files.get(self._key)
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
        self._activate(content, digest)
        self._log.info("reloaded %s (sha256 %s)", self._path, digest[:12])

    def _activate(self, content: str, digest: str) -> None:
        with self._state_lock:
            self._content = content
            self._hash = digest
            self._last_reload_time = time.time()
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
        if (
            stat.S_ISREG(mode)
            and not os.path.lexists(os.path.join(self._directory, DATA_LINK))
            and is_mount_point(self._path, _MOUNTINFO)
        ):
            self._log.warning(
                "%s is a file mounted on its own, as a Kubernetes subPath mount is: kubelet never "
                "updates subPath mounts, so this file will not change when the ConfigMap does; "
                "mount the whole ConfigMap volume as a directory and watch the file inside it",
                self._path,
            )
