"""A kubelet version read while kubelet writes it (``publisher._preread``): what the watcher
reports is always what ``..data`` points at once swapped, whatever the pre-read saw.

The volume is written by the vendored AtomicWriter; its ``pre_swap_hook`` runs after
``..data_tmp`` names the new directory and before the rename, where a test changes a file
behind kubelet's back (kubelet never does) or swaps in another version first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from publisher import _mount, _preread
from publisher.watcher import MountContent, MountWatcher
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.benchmarks._common import content as sized
from tests.conftest import KubeletMount
from tests.helpers import wait_until

KEYS = [f"k{i:03d}.yaml" for i in range(200)]


@pytest.fixture(autouse=True, params=[False, True], ids=["worker", "swaps_on_event"])
def swaps_on_event(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test both ways: the swap read by the worker, or on the thread that saw it (where
    the pre-read may be taken while the worker waits between two looks)."""
    defaults = MountWatcher.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "swaps_on_event", request.param)
    return bool(request.param)


class Reports:
    def __init__(self) -> None:
        self.contents: list[dict[str, bytes]] = []
        self.targets: list[str | None] = []
        self.unreadable: list[set[str]] = []
        self._lock = threading.Lock()

    def __call__(self, content: MountContent) -> None:
        with self._lock:
            self.contents.append(dict(content.files))
            self.targets.append(content.target)
            self.unreadable.append(set(content.unreadable))

    @property
    def last(self) -> dict[str, bytes]:
        with self._lock:
            return self.contents[-1] if self.contents else {}


def _payload(seq: int) -> dict[str, bytes]:
    return {key: sized(seq, 1024) for key in KEYS}


def test_a_version_is_read_while_written_and_reported_whole(
    kubelet_mount: KubeletMount,
) -> None:
    kubelet_mount.write(_payload(0))
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        payload = {**_payload(0), KEYS[7]: b"changed"}

        def pre_read() -> None:  # kubelet's rename waits for it (a busy machine's watcher is
            wait_until(lambda: watcher._preread.files.keys() == set(KEYS))  # woken late)

        kubelet_mount.payload = payload
        summary = atomic_write(str(kubelet_mount.directory), payload, pre_swap_hook=pre_read)
        wait_until(lambda: reports.last == payload, "the new version reported")
        # it was read before the swap, which read (and listed) nothing more
        assert watcher._preread.taken == (summary["new_ts_dir"], [])
    assert reports.targets == [summary["new_ts_dir"]]


def test_a_swap_known_whole_from_its_pre_read_opens_and_resolves_nothing(
    kubelet_mount: KubeletMount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What proves the pre-read is the swapped-in version is ``..data``'s two reads and the
    pre-read's events: no ``realpath`` walk of the directory, no open of the target (a
    third of the swap's read)."""
    kubelet_mount.write(_payload(0))
    directory = str(kubelet_mount.directory)
    walked: list[str] = []
    opened: list[str] = []
    realpath, target_dir = os.path.realpath, _mount._TargetDir.__init__

    def walk(path: str, **kwargs: bool) -> str:
        walked.append(path)
        return realpath(path, **kwargs)

    def open_target(self: _mount._TargetDir, base: str, inside: str | None) -> None:
        opened.append(base)
        target_dir(self, base, inside)

    monkeypatch.setattr(os.path, "realpath", walk)
    monkeypatch.setattr(_mount._TargetDir, "__init__", open_target)
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        assert directory in walked  # the first read reads everything
        assert opened
        walked.clear()
        opened.clear()
        payload = {**_payload(0), KEYS[9]: b"changed"}

        def pre_read() -> None:
            wait_until(lambda: watcher._preread.files.keys() == set(KEYS))

        kubelet_mount.payload = payload
        summary = atomic_write(directory, payload, pre_swap_hook=pre_read)
        wait_until(lambda: reports.last == payload, "the new version reported")
        assert watcher._preread.taken == (summary["new_ts_dir"], [])
    assert directory not in walked
    assert opened == []


def test_a_file_changed_after_its_pre_read_is_read_again(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write(_payload(0))
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        directory = kubelet_mount.directory

        def tamper() -> None:  # ..data_tmp names the new directory: the pre-read is done
            new = os.readlink(directory / "..data_tmp")
            wait_until(lambda: len(watcher._preread.files) == len(KEYS), "the pre-read")
            (directory / new / KEYS[3]).write_bytes(b"rewritten, another size")
            (directory / new / KEYS[4]).unlink()
            (directory / new / "added.yaml").write_bytes(b"a key kubelet never wrote")

        payload = _payload(1)
        atomic_write(str(directory), payload, pre_swap_hook=tamper)
        expected = {
            **payload,
            KEYS[3]: b"rewritten, another size",
            "added.yaml": b"a key kubelet never wrote",
        }
        del expected[KEYS[4]]
        wait_until(lambda: reports.last == expected, "what ..data points at")
        assert watcher._preread.taken is not None
        assert watcher._preread.taken[1] == sorted([KEYS[3], "added.yaml"])  # and only those
    assert all(files in (expected,) for files in reports.contents)


def _same_size_and_times(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place, same size, its modification time put back: only its change
    time tells (and the inotify event)."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _rewritten(seq: int) -> bytes:
    """Version ``seq``'s content of a key with its last byte changed: the same size."""
    data = sized(seq, 1024)
    return data[:-1] + (b"#" if data[-1:] != b"#" else b"%")


def test_a_file_rewritten_after_its_pre_read_is_published_with_its_new_content(
    kubelet_mount: KubeletMount,
) -> None:
    """The swap takes what the pre-read read without a stat: a file written after its read
    (same size, its mtime put back) is told by its inotify event and read at the swap."""
    kubelet_mount.write(_payload(0))
    reports = Reports()
    payload = _payload(1)
    changed = _rewritten(1)
    assert changed != payload[KEYS[3]]
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        directory = kubelet_mount.directory

        def tamper() -> None:
            new = os.readlink(directory / "..data_tmp")
            wait_until(lambda: len(watcher._preread.files) == len(KEYS), "the pre-read")
            assert watcher._preread.files[KEYS[3]] == payload[KEYS[3]]  # read before
            _same_size_and_times(directory / new / KEYS[3], changed)

        atomic_write(str(directory), payload, pre_swap_hook=tamper)
        expected = {**payload, KEYS[3]: changed}
        wait_until(lambda: reports.last == expected, "the file as ..data points at it")
        assert watcher._preread.taken is not None
        assert watcher._preread.taken[1] == [KEYS[3]]  # read again at the swap, alone
    assert reports.contents == [expected]


def test_lost_events_fall_back_to_a_stat_per_file(kubelet_mount: KubeletMount) -> None:
    """More events than the inotify queue holds (one is lost: the change of a file already
    read): every pre-read file is then checked at the swap, as without inotify."""
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queue > 200_000:
        pytest.skip(f"an inotify queue of {queue} events takes too long to fill")
    kubelet_mount.write(_payload(0))
    reports = Reports()
    payload = _payload(1)
    changed = _rewritten(1)
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        directory = kubelet_mount.directory

        def flood_then_tamper() -> None:
            new = directory / os.readlink(directory / "..data_tmp")
            wait_until(lambda: len(watcher._preread.files) == len(KEYS), "the pre-read")
            # alternating writes of the same bytes to two keys: events the kernel cannot merge
            first, second = (os.open(new / key, os.O_WRONLY) for key in KEYS[:2])
            try:
                for n in range(queue + 100):
                    fd, key = (first, KEYS[0]) if n % 2 else (second, KEYS[1])
                    os.pwrite(fd, payload[key][:1], 0)
            finally:
                os.close(first)
                os.close(second)
            _same_size_and_times(new / KEYS[3], changed)  # its event is dropped

        atomic_write(str(directory), payload, pre_swap_hook=flood_then_tamper)
        expected = {**payload, KEYS[3]: changed}
        wait_until(lambda: reports.last == expected, "the file as ..data points at it")
        assert watcher._preread.taken == (os.readlink(directory / "..data"), None)
    assert reports.contents == [expected]


def test_what_the_swap_checks_is_never_taken_from_the_pre_read(
    kubelet_mount: KubeletMount, tmp_path: Path
) -> None:
    """A symlink (leading out of the directory), a file over the size limit, a FIFO and a
    file with a second hard link in a new version: none is pre-read, each is read (and
    refused or reported) at the swap as without a pre-read."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the volume")
    kubelet_mount.write(_payload(0))
    reports = Reports()
    payload = _payload(1)
    with MountWatcher(kubelet_mount.directory, reports, max_bytes=2048) as watcher:
        directory = kubelet_mount.directory
        new = directory / "..2099_01_01_00_00_00.3"  # written as kubelet does, by hand
        new.mkdir()
        (new / "escape.yaml").symlink_to(secret)
        (new / "big.yaml").write_bytes(b"x" * 4096)
        os.mkfifo(new / "fifo.yaml")
        (tmp_path / "elsewhere").write_bytes(payload[KEYS[5]])
        os.link(tmp_path / "elsewhere", tmp_path / "staged")  # one file, two names
        os.rename(tmp_path / "staged", new / KEYS[5])  # moved in, as a finished file
        for key, data in payload.items():  # written after those: read after them
            if key != KEYS[5]:
                (new / key).write_bytes(data)
        # the pre-read goes on until ..data_tmp names the directory: it met all of them
        wait_until(lambda: set(KEYS) - {KEYS[5]} <= watcher._preread.files.keys(), "pre-read")
        os.symlink(new.name, directory / "..data_tmp")
        os.rename(directory / "..data_tmp", directory / "..data")
        wait_until(lambda: reports.targets[-1:] == [new.name], "the swap")
        planted = ["big.yaml", "escape.yaml", "fifo.yaml", KEYS[5]]
        assert watcher._preread.taken == (new.name, planted)
    assert reports.contents[-1] == payload  # the link out skipped, the FIFO not a key
    assert reports.unreadable[-1] == {"big.yaml"}


def test_a_pre_read_of_a_version_never_swapped_in_is_discarded(
    kubelet_mount: KubeletMount,
) -> None:
    kubelet_mount.write(_payload(0))
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        directory = kubelet_mount.directory
        # a version written and linked as ..data_tmp, then abandoned for another one
        abandoned = directory / "..2099_01_01_00_00_00.1"
        abandoned.mkdir()
        for key in KEYS:
            (abandoned / key).write_bytes(b"never swapped in")
        os.symlink(abandoned.name, directory / "..data_tmp")
        wait_until(lambda: watcher._preread.name == abandoned.name, "its pre-read")
        wait_until(lambda: len(watcher._preread.files) == len(KEYS), "its pre-read")
        os.unlink(directory / "..data_tmp")
        payload = _payload(2)
        summary = kubelet_mount.write(payload)
        wait_until(lambda: reports.last == payload, "the version swapped in")
    assert reports.targets == [summary["new_ts_dir"]]
    assert all(b"never swapped in" not in files.values() for files in reports.contents)


def test_without_a_pre_read_the_swap_is_read_as_before(tmp_path: Path) -> None:
    # the version's directory appears before the watch starts (as after a lost event)
    directory = tmp_path / "volume"
    directory.mkdir()
    atomic_write(str(directory), _payload(0))
    reports = Reports()
    done = threading.Event()

    def hook() -> None:
        watcher.start()
        done.set()

    watcher = MountWatcher(directory, reports)
    try:
        atomic_write(str(directory), _payload(1), pre_swap_hook=hook)
        assert done.is_set()
        wait_until(lambda: reports.last == _payload(1), "the swap")
        assert watcher._preread.taken is None
    finally:
        watcher.stop()


def test_a_version_never_finished_holds_back_no_swap(
    kubelet_mount: KubeletMount, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a directory kubelet began and never linked (it died mid-write): its pre-read polls on,
    # yet the next swap ends it and is reported (events keep arriving meanwhile)
    monkeypatch.setattr(_preread, "_GIVE_UP", 3600.0)
    kubelet_mount.write(_payload(0))
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports) as watcher:
        unfinished = kubelet_mount.directory / "..2099_01_01_00_00_00.2"
        unfinished.mkdir()
        (unfinished / KEYS[0]).write_bytes(b"half")
        wait_until(lambda: KEYS[0] in watcher._preread.files, "its pre-read")
        payload = _payload(3)
        kubelet_mount.write(payload)
        wait_until(lambda: reports.last == payload, "the swap")


def test_the_hook_runs_before_each_swap_and_a_failing_one_changes_nothing(
    kubelet_mount: KubeletMount,
) -> None:
    """``on_version_coming`` (the daemon reads the workers' floors meanwhile) runs on the
    watcher's thread when kubelet starts writing, before the swap is reported; if it raises,
    the swap is read and reported all the same."""
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    reports = Reports()
    calls: list[int] = []

    def coming() -> None:
        calls.append(len(reports.contents))  # how many swaps were reported before
        raise RuntimeError("the hook failed")

    directory = str(kubelet_mount.directory)
    with MountWatcher(directory, reports, on_version_coming=coming):
        for n in (1, 2):
            payload = {"app.yaml": f"rev: {n}\n".encode()}

            def hooked(n: int = n) -> None:  # kubelet's rename waits for the hook (a watcher
                wait_until(lambda: len(calls) == n)  # woken after the swap skips it)

            atomic_write(directory, payload, pre_swap_hook=hooked)
            wait_until(lambda payload=payload: reports.last == payload)  # type: ignore[misc]
    assert calls == [0, 1]
