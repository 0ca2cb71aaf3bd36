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

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from publisher._mount import FileVersion, MountRead

__all__ = ["Confirmation"]


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
        self._settle = settle
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
            elif now - candidate.since >= self._settle:
                del self._candidates[name]
                continue
            recheck[name] = candidate.since + self._settle
        return recheck
