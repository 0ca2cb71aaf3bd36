"""The signing key file (``--signing-key-file``): read at start, re-read when kubelet swaps it.

Every event is signed with the key in that file, itself a mounted Secret and watched like a
mount. Its life has two phases with different failure rules:

- at start, a file that cannot be read, is too short, or lies where the daemon would publish
  it as config is a ``ConfigurationError``: the daemon must not start unsigned or leak it;
- once running, a new valid key signs from then on and every key is published again, signed
  with it, so subscribers that hold only the new key can start; a file that becomes
  unreadable, empty or too short keeps the current key (logged), since stopping to sign, or
  stopping, would be worse than signing with the key every worker still holds.

The key itself is never logged, only its id (``subscriber.protocol.key_id``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from publisher.plan import Plan
from publisher.watcher import MountContent, MountWatcher
from subscriber.errors import ConfigurationError
from subscriber.protocol import key_id
from subscriber.protocol import signing_key as normalized_key

__all__ = ["SigningKeyFile"]

logger = logging.getLogger(__name__)


class SigningKeyFile:
    """The current signing key from ``path``; ``start`` follows the file's changes.

    Raises ``ConfigurationError`` when ``path`` cannot serve as a key file (see the module
    docstring); ``plan`` tells where the daemon publishes from.
    """

    def __init__(self, path: str | os.PathLike[str], plan: Plan) -> None:
        self.path = os.path.abspath(path)
        where = plan.publishing(self.path)
        if where is not None:
            raise ConfigurationError(
                f"--signing-key-file {self.path} is {where}; mount the key Secret elsewhere"
            )
        try:
            with open(self.path, "rb") as fh:
                self._key = normalized_key(fh.read())
        except OSError as exc:
            raise ConfigurationError(
                f"--signing-key-file: cannot read {self.path}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"--signing-key-file {self.path}: {exc}") from None
        self._lock = threading.Lock()  # one change at a time: the initial read and the watcher's
        self._on_change: Callable[[bytes], None] = lambda _key: None
        self._watcher: MountWatcher | None = None

    @property
    def key(self) -> bytes:
        """The key to sign with now (normalized)."""
        return self._key

    @property
    def key_id(self) -> str:
        return key_id(self._key)

    def start(
        self, on_change: Callable[[bytes], None], *, settle: float, resync_interval: float
    ) -> None:
        """Watch the file's directory (a Secret mount: kubelet swaps ``..data``); call
        ``on_change`` with each new valid key, from the watcher's thread."""
        directory, name = os.path.split(self.path)
        self._on_change = on_change
        watcher = MountWatcher(
            directory,
            self._changed,
            keys={name},
            settle=settle,
            resync_interval=resync_interval,
            confine=False,  # the operator named this file, wherever it leads
        )
        initial = watcher.start()
        self._watcher = watcher
        logger.info("signing events with key id %s (from %s)", self.key_id, self.path)
        self._changed(initial)  # a change between reading it and watching it

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def _changed(self, mount: MountContent) -> None:
        """Adopt a new valid key; keep the current one otherwise (logged)."""
        name = os.path.basename(self.path)
        with self._lock:
            current = self.key_id
            error = mount.unreadable.get(name)
            raw = mount.files.get(name)
            if error is not None or raw is None:
                reason = f"cannot read it ({error})" if error is not None else "it is missing"
                logger.error(
                    "signing key file %s: %s; still signing with key id %s",
                    self.path,
                    reason,
                    current,
                )
                return
            try:
                key = normalized_key(raw)
            except ValueError as exc:
                logger.error(
                    "signing key file %s: %s; still signing with key id %s",
                    self.path,
                    exc,
                    current,
                )
                return
            if key_id(key) == current:
                return
            self._key = key
            logger.info(
                "signing key changed (key id %s -> %s): publishing every key again, signed with it",
                current,
                self.key_id,
            )
            self._on_change(key)
