"""The watch itself (``publisher._observe``): which events of a real directory reach the sink,
on which thread, and what the kernel is asked for.

The watcher's behaviour on top of these events is ``tests/test_watcher.py``'s.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import watchdog.events
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_c import InotifyConstants

from publisher._observe import (
    DirectoryWatch,
    _EventRecorder,
    _InotifyObserver,
    events_lost,
    observer_healthy,
    start_observer,
    stop_observer,
)
from tests.conftest import KubeletMount
from tests.helpers import wait_until


class Sink:
    """The events the observer hands over, with the thread each was handed over on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[FileSystemEvent, threading.Thread]] = []

    def __call__(self, event: FileSystemEvent) -> None:
        with self.lock:
            self.events.append((event, threading.current_thread()))

    def seen(self) -> list[tuple[type[FileSystemEvent], str, str]]:
        with self.lock:
            return [
                (type(e), os.path.basename(str(e.src_path)), os.path.basename(str(e.dest_path)))
                for e, _ in self.events
            ]

    def clear(self) -> None:
        with self.lock:
            self.events.clear()


@contextmanager
def watch(directory: Path | str, sink: Callable[[FileSystemEvent], None]) -> Iterator[BaseObserver]:
    observer, polling = start_observer(
        str(directory), sink, force_polling=False, log=logging.getLogger("test")
    )
    assert not polling
    try:
        yield observer
    finally:
        stop_observer(observer)


@pytest.fixture
def sink() -> Sink:
    return Sink()


def test_a_kubelet_swap_is_handed_over_on_the_thread_that_reads_inotify(
    kubelet_mount: KubeletMount, sink: Sink
) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    with watch(kubelet_mount.directory, sink) as observer:
        summary = kubelet_mount.set("app.yaml", b"v2")
        new_version = str(summary["new_ts_dir"])
        wait_until(lambda: (FileMovedEvent, "", "..data") in sink.seen(), what="the swap")
        seen = sink.seen()
        # the new version's directory first (the pre-read's hint), then the swap
        assert seen.index((DirCreatedEvent, new_version, "")) < seen.index(
            (FileMovedEvent, "", "..data")
        )
        # kubelet's chmod of the new directory is not asked for, nor the rename's source;
        # no DirModifiedEvent of the directory for each event
        assert not {DirAttribEvent, FileAttribEvent, DirModifiedEvent} & {k for k, *_ in seen}
        assert all(src == "" for kind, src, _ in seen if kind is FileMovedEvent)
        # no queue and no other thread between the read and the sink: watchdog's own
        # inotify path crossed four threads (1.3 ms from rename to sink on this machine)
        emitters = set(observer.emitters)
        assert {thread for _, thread in sink.events} <= emitters
        assert observer_healthy(observer)


def test_plain_files_written_renamed_in_and_deleted_are_seen(tmp_path: Path, sink: Sink) -> None:
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "app.yaml").write_text("v1")
    with watch(directory, sink):
        with (directory / "app.yaml").open("w") as file:  # edited in place
            file.write("v2")
        wait_until(lambda: (FileClosedEvent, "app.yaml", "") in sink.seen(), what="the close")
        assert (FileModifiedEvent, "app.yaml", "") in sink.seen()
        sink.clear()
        (tmp_path / "new.yaml").write_text("v3")
        (tmp_path / "new.yaml").rename(directory / "app.yaml")  # renamed in from elsewhere
        (directory / "other.yaml").write_text("x")  # created here
        (directory / "other.yaml").unlink()
        wait_until(lambda: (FileDeletedEvent, "other.yaml", "") in sink.seen(), what="unlink")
        assert sink.seen()[:2] == [
            (FileMovedEvent, "", "app.yaml"),
            (FileCreatedEvent, "other.yaml", ""),
        ]
        # reading a key makes no event at all: open and close-without-write are not asked for
        sink.clear()
        (directory / "app.yaml").read_bytes()
        (directory / "marker").mkdir()
        wait_until(sink.seen, what="the marker")
        assert sink.seen() == [(DirCreatedEvent, "marker", "")]


def test_a_directory_reached_through_a_symlink_reports_paths_under_the_symlink(
    tmp_path: Path, sink: Sink
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with watch(link, sink):
        (real / "app.yaml").write_text("v1")
        wait_until(lambda: (FileClosedEvent, "app.yaml", "") in sink.seen())
        assert {str(event.src_path) for event, _ in sink.events} == {str(link / "app.yaml")}


def _inotify_masks() -> dict[int, int]:
    """Inode -> event mask of every inotify watch this process holds, as the kernel has them
    (``/proc/self/fdinfo``)."""
    masks = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("inotify wd:"):
                fields = dict(field.split(":", 1) for field in line.split()[1:])
                masks[int(fields["ino"], 16)] = int(fields["mask"], 16)
    return masks


def test_the_kernel_is_asked_only_for_what_the_watcher_uses(tmp_path: Path, sink: Sink) -> None:
    c = InotifyConstants
    with watch(tmp_path, sink):
        mask = _inotify_masks()[tmp_path.stat().st_ino]
    wanted = (
        c.IN_CREATE
        | c.IN_DELETE
        | c.IN_MODIFY
        | c.IN_CLOSE_WRITE
        | c.IN_MOVED_TO
        | c.IN_DELETE_SELF
    )
    assert mask & wanted == wanted
    # never: our own reads (open, access, close-without-write), attribute changes (kubelet's
    # chmod of each new version's directory), the rename's source (see _InotifyEmitter)
    unwanted = c.IN_OPEN | c.IN_ACCESS | c.IN_CLOSE_NOWRITE | c.IN_ATTRIB | c.IN_MOVED_FROM
    assert mask & unwanted == 0


# watchdog has the overflow's event from 7.1 on (pyproject.toml admits 7.0)
EventsLostEvent = getattr(watchdog.events, "EventsLostEvent", None)


@pytest.mark.skipif(EventsLostEvent is None, reason="watchdog < 7.1 has no EventsLostEvent")
def test_an_overflowing_queue_is_reported_and_the_watch_goes_on(tmp_path: Path) -> None:
    release = threading.Event()
    sink = Sink()

    def slow_sink(event: FileSystemEvent) -> None:
        sink(event)
        release.wait(30)  # the reader is held up: the kernel's queue fills

    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with watch(tmp_path, slow_sink) as observer:
        (tmp_path / "a").write_bytes(b"")
        wait_until(sink.seen, what="the first event")
        for _ in range(limit // 2 + 10):  # two IN_MOVED_TO each, never two equal in a row
            os.rename(tmp_path / "a", tmp_path / "b")
            os.rename(tmp_path / "b", tmp_path / "a")
        release.set()
        lost = wait_until(
            lambda: [e for e, _ in sink.events if events_lost(e)],
            what="the overflow",
        )
        assert [str(e.src_path) for e in lost] == [str(tmp_path)]
        assert DirectoryWatch.in_doubt(lost[0])
        (tmp_path / "after").mkdir()
        wait_until(lambda: (DirCreatedEvent, "after", "") in sink.seen(), what="a later event")
        assert observer_healthy(observer)


def test_the_directory_deleted_ends_the_watch(tmp_path: Path, sink: Sink) -> None:
    directory = tmp_path / "gone"
    directory.mkdir()
    with watch(directory, sink) as observer:
        directory.rmdir()
        wait_until(lambda: not observer_healthy(observer), what="the emitter to stop")
        assert (DirDeletedEvent, "gone", "") in sink.seen()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_outlives_its_observer(tmp_path: Path) -> None:
    before = _descriptors()
    for _ in range(20):
        with watch(tmp_path, Sink()):
            pass
        # scheduled (inotify instance and watch made) but never started
        observer = _InotifyObserver()
        observer.schedule(_EventRecorder(Sink()), str(tmp_path))
        observer.stop()
    assert _descriptors() == before
