"""A watch whose kernel queue overflowed reads everything again at once, not at the next resync.

The watch reads inotify on one thread (``publisher._observe``), so a reader held up long
enough lets the kernel's queue (fs.inotify.max_queued_events) fill and drop events; the
overflow arrives as an ``EventsLostEvent`` of the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from publisher.watcher import MountContent, MountWatcher
from tests.conftest import KubeletMount
from tests.helpers import wait_until


def test_a_swap_lost_in_an_overflow_is_read_at_once(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    seen: list[bytes] = []

    def on_change(content: MountContent) -> None:
        seen.append(content.files["app.yaml"])

    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    directory = kubelet_mount.directory
    with MountWatcher(directory, on_change, resync_interval=600) as watcher:
        (directory / ".a").write_bytes(b"")
        with watcher._cond:
            # a new version's directory: the watch's thread waits for the watcher's lock to
            # say so, and reads nothing more meanwhile (gone at once: nothing to pre-read)
            (directory / "..2020_01_01_00_00_00.1").mkdir()
            (directory / "..2020_01_01_00_00_00.1").rmdir()
            for _ in range(limit // 2 + 10):  # two IN_MOVED_TO each, never two equal in a row
                os.rename(directory / ".a", directory / ".c")
                os.rename(directory / ".c", directory / ".a")
            kubelet_mount.set("app.yaml", b"v2")  # the queue is full: its events are dropped
        wait_until(lambda: seen == [b"v2"], what="the lost swap", timeout=5)
