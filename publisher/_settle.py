"""When new content of a plain-directory file may be trusted: two agreeing reads ``settle`` apart.

Nothing makes a plain directory's files atomic: a reader can catch an in-place rewrite
(truncate + write) half done. So a file is not read while a writer has it open (modify or
create seen, no IN_CLOSE_WRITE yet: ``MountWatcher`` holds it), and its new content counts only
once two reads at least ``settle`` apart agree (same bytes, inode, size, mtime and ctime). A
quiet window alone handed out torn files when the writer paused mid-write; the close alone did
when rewrites came back to back or a re-create raced a delete, and trusting a rename (an
editor's save) did when an in-place write followed it: the event of the next write can still be
on its way when the reader runs (10-30 ms here with one busy thread), and ext4 shows a file
being truncated as empty before it updates its timestamps. Polling has no close events, so it
relies on the double read alone; with inotify a write that never reports its close (a writer
keeping the file open, a lost event) is read after ``resync_interval`` of quiet. The double
read assumes a write's event reaches us within ``settle`` (here: p99 2 ms idle, 19 ms and at
worst 103 ms with both CPUs saturated by other processes); a writer stalled mid-write while its
event is later still can be seen torn, so ``settle`` must stay above the event delay the machine
can have. Kubelet volumes do not depend on any of this: a ``..data`` target never changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from publisher._mount import ConcurrentSwaps, FileVersion, MountRead
from subscriber.errors import ConfigurationError

__all__ = ["Confirmation", "check_settings", "first_read"]

_FIRST_READ_ATTEMPTS = 5  # how often start() re-reads a key being written while it was read


def check_settings(
    keys: Collection[str] | None, settle: float, resync_interval: float, max_bytes: int
) -> None:
    """Refuse what no ``MountWatcher`` can watch with (``ConfigurationError``)."""
    for key in keys or ():
        if not key or "/" in key or key in {".", ".."}:
            raise ConfigurationError(f"{key!r} is not a file name in the watched directory")
    if settle < 0:
        raise ConfigurationError(f"settle must be >= 0 seconds, got {settle}")
    if resync_interval <= 0:
        raise ConfigurationError(f"resync_interval must be > 0 seconds, got {resync_interval}")
    if max_bytes < 0:
        raise ConfigurationError(f"max_bytes must be >= 0, got {max_bytes}")


@dataclass(frozen=True, slots=True)
class _Candidate:
    """New content of a plain-directory file, seen once, waiting to be seen again unchanged."""

    data: bytes
    version: FileVersion
    since: float  # time.monotonic() of the first read


class Confirmation:
    """The plain-directory files whose new content has been read once and awaits a second read.

    Not thread-safe: ``MountWatcher``'s worker alone uses it (``start()`` before the worker).
    """

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._candidates: dict[str, _Candidate] = {}

    def unconfirmed(
        self, read: MountRead, held: Collection[str], delivered: Mapping[str, bytes]
    ) -> dict[str, float]:
        """Keys of ``read`` whose new content is not confirmed yet, and when to read them again.

        Content equal to ``delivered`` needs no confirmation; a file renamed into place does,
        as an in-place write may follow the rename before its event arrives.
        """
        now = time.monotonic()
        # A candidate lives while its file is there: seen now, or not read because held.
        self._candidates = {
            n: c for n, c in self._candidates.items() if n in read.files or n in held
        }
        recheck: dict[str, float] = {}
        for name, data in read.files.items():
            if data == delivered.get(name):
                self._candidates.pop(name, None)
                continue
            version = read.versions[name]
            candidate = self._candidates.get(name)
            if candidate is None or candidate.data != data or candidate.version != version:
                candidate = self._candidates[name] = _Candidate(data, version, now)
            elif now - candidate.since >= self.settle:
                del self._candidates[name]
                continue
            recheck[name] = candidate.since + self.settle
        return recheck


def first_read(  # noqa: PLR0917 - the watcher's parts it needs, passed on
    directory: str,
    read: Callable[[frozenset[str]], MountRead],
    confirmation: Confirmation,
    cond: threading.Condition,
    holds: dict[str, float],
    log: logging.Logger,
    stopping: Callable[[], bool],
) -> tuple[MountRead, frozenset[str], dict[str, float]]:
    """A watcher's first read (``read(held)``; ``start()``, before its worker runs), a plain
    directory's read again until its keys are confirmed or ``_FIRST_READ_ATTEMPTS`` are
    spent: the read, the keys held (``holds``, guarded by ``cond``: being written) and those
    still unconfirmed (a key rewritten all the time, or held open by a writer: left out for
    now, held, and reported once it settles). ``ConcurrentSwaps`` if ``..data`` changed under
    every attempt."""
    for attempt in range(1, _FIRST_READ_ATTEMPTS + 1):
        with cond:
            held = frozenset(holds)  # writes that began since the observer started
        try:
            result = read(held)
        except ConcurrentSwaps:
            continue
        unconfirmed = (
            {}
            if result.target is not None
            else {
                **dict.fromkeys(held, time.monotonic() + confirmation.settle),
                **confirmation.unconfirmed(result, held, {}),
            }
        )
        if not unconfirmed or attempt == _FIRST_READ_ATTEMPTS:
            break
        with cond:
            cond.wait_for(stopping, timeout=max(unconfirmed.values()) - time.monotonic())
    else:
        raise ConcurrentSwaps(directory)
    if unconfirmed:
        log.warning(
            "%s: %s kept changing during start; reporting them once they settle",
            directory,
            ", ".join(sorted(unconfirmed)),
        )
        with cond:
            for name, until in unconfirmed.items():
                holds.setdefault(name, until)
    return result, held, unconfirmed
