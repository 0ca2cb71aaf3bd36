"""MountWatcher and FileWatcher against real files, kubelet-style updates and watchdog observers.

Every wait is a deadline-bounded poll (``wait_until``). Where a test must show that something
does *not* happen, it makes a later, visible change ("a barrier") and checks what came before
it: events are handled in order, so once the barrier shows up everything earlier was handled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from publisher import filewatcher as filewatcher_module
from publisher.filewatcher import FileWatcher
from publisher.watcher import MountContent, MountWatcher
from subscriber.errors import InitialLoadError
from tests.conftest import REPO, KubeletMount
from tests.helpers import wait_until


class Calls:
    """A FileWatcher callback that records every content it gets and rejects some."""

    def __init__(self, reject: Callable[[str], bool] = lambda content: False) -> None:
        self.contents: list[str] = []
        self.accepted: list[str] = []
        self._reject = reject
        self._lock = threading.Lock()

    def __call__(self, content: str) -> None:
        with self._lock:
            self.contents.append(content)
            if self._reject(content):
                raise ValueError("invalid config")
            self.accepted.append(content)

    def __len__(self) -> int:
        with self._lock:
            return len(self.contents)

    @property
    def last(self) -> str | None:
        with self._lock:
            return self.contents[-1] if self.contents else None


class Reports:
    """A MountWatcher on_change that records every content it reports."""

    def __init__(self) -> None:
        self.items: list[MountContent] = []
        self._lock = threading.Lock()

    def __call__(self, report: MountContent) -> None:
        with self._lock:
            self.items.append(report)

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)

    @property
    def last(self) -> MountContent:
        with self._lock:
            return self.items[-1]


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def replace_file(path: Path, content: str) -> None:
    """An editor's save: write a temp file next to it, then rename it over the original."""
    temp = path.with_name(f".{path.name}.swp")
    temp.write_text(content)
    os.replace(temp, path)


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hotreload-watch")]


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plain"
    directory.mkdir()
    return directory


# ---------------------------------------------------------------- 1. kubelet's atomic update


def test_kubelet_update_reloads_the_file(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"limit: 1\n", "other.yaml": b"x: 1\n"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls) as watcher:
        assert calls.contents == ["limit: 1\n"]
        assert watcher.content == "limit: 1\n"
        assert watcher.last_hash == sha("limit: 1\n")
        assert watcher.reload_count == 1  # the initial load is reload 1, as in the seed
        assert watcher.last_reload_time is not None
        first_load = watcher.last_reload_time

        kubelet_mount.set("app.yaml", b"limit: 2\n")
        wait_until(lambda: watcher.content == "limit: 2\n")
        assert calls.contents == ["limit: 1\n", "limit: 2\n"]
        assert watcher.last_hash == sha("limit: 2\n")
        assert watcher.reload_count == 2
        assert watcher.error_count == 0
        assert watcher.last_reload_time >= first_load


def test_updates_that_touch_only_other_keys_fire_nothing(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"a\n", "other.yaml": b"1\n"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls) as watcher:
        for i in range(10):
            kubelet_mount.set("other.yaml", f"{i}\n".encode())  # content of another key
        kubelet_mount.set("new.yaml", b"added\n")  # a key appears
        kubelet_mount.write({"app.yaml": b"a\n"})  # keys disappear
        kubelet_mount.write({"app.yaml": b"a\n"})  # kubelet sees no change: no swap at all
        kubelet_mount.set("app.yaml", b"barrier\n")
        wait_until(lambda: calls.last == "barrier\n")
        assert calls.contents == ["a\n", "barrier\n"]
        assert watcher.reload_count == 2


def test_mount_watcher_reports_changed_and_removed_keys(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"a": b"1", "b": b"1"})
    reports = Reports()
    mount = MountWatcher(kubelet_mount.directory, reports)
    first = mount.start()
    try:
        assert len(reports) == 0  # the first report is returned, not passed to on_change
        assert dict(first.files) == {"a": b"1", "b": b"1"}
        assert first.changed == {"a", "b"}
        assert first.removed == frozenset()
        assert first.target == os.readlink(kubelet_mount.directory / "..data")
        assert first.directory == str(kubelet_mount.directory)

        summary = kubelet_mount.write({"a": b"2", "c": b"new"})  # a changes, b goes, c comes
        wait_until(lambda: len(reports) == 1)
        report = reports.last
        assert dict(report.files) == {"a": b"2", "c": b"new"}
        assert report.changed == {"a", "c"}
        assert report.removed == {"b"}
        assert report.target == summary["new_ts_dir"]
        assert not report.unreadable

        kubelet_mount.set("c", b"newer")
        wait_until(lambda: len(reports) == 2)
        assert reports.last.changed == {"c"}
        assert reports.last.removed == frozenset()
        assert mount.alive
    finally:
        mount.stop()
    assert not mount.alive


def test_mount_watcher_with_selected_keys_ignores_the_others(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"a": b"1", "b": b"1"})
    reports = Reports()
    with MountWatcher(kubelet_mount.directory, reports, keys={"a", "z"}) as mount:
        kubelet_mount.set("b", b"2")
        kubelet_mount.set("z", b"appears")
        wait_until(lambda: len(reports) == 1)
        assert dict(reports.last.files) == {"a": b"1", "z": b"appears"}
        assert reports.last.changed == {"z"}
        assert mount.alive


@pytest.mark.parametrize("select", ["all keys", "named keys"])
def test_every_snapshot_comes_from_one_kubelet_version(
    kubelet_mount: KubeletMount, select: str
) -> None:
    """Keys updated together are always seen together, even under back-to-back swaps."""
    keys = [f"key{i}" for i in range(8)]
    kubelet_mount.write({key: b"version 0" for key in keys})
    reports = Reports()
    # settle=0: no coalescing, so the reads race the swaps as often as possible
    with MountWatcher(
        kubelet_mount.directory, reports, keys=keys if select == "named keys" else None, settle=0
    ):
        for version in range(1, 301):
            kubelet_mount.write({key: f"version {version}".encode() for key in keys})
        wait_until(lambda: len(reports) > 0 and reports.last.files["key0"] == b"version 300")
    for report in reports.items:
        assert set(report.files) == set(keys), report
        assert len(set(report.files.values())) == 1, dict(report.files)
        assert report.changed == set(keys)
        assert not report.removed


def test_new_keys_appear_when_all_keys_are_watched(
    kubelet_mount: KubeletMount, plain_dir: Path
) -> None:
    kubelet_mount.write({"a": b"1"})
    (plain_dir / "x").write_text("1")
    in_kubelet, in_plain = Reports(), Reports()
    with (
        MountWatcher(kubelet_mount.directory, in_kubelet),
        MountWatcher(plain_dir, in_plain) as plain,
    ):
        kubelet_mount.set("b", b"2")
        replace_file(plain_dir / "y", "2")
        (plain_dir / ".hidden").write_text("dot files are not keys")
        wait_until(lambda: len(in_kubelet) == 1 and len(in_plain) == 1)
        assert dict(in_kubelet.last.files) == {"a": b"1", "b": b"2"}
        assert in_kubelet.last.changed == {"b"}
        assert dict(in_plain.last.files) == {"x": b"1", "y": b"2"}
        assert in_plain.last.target is None
        plain.rescan()
        replace_file(plain_dir / "x", "barrier")
        wait_until(lambda: len(in_plain) == 2)
        assert in_plain.last.changed == {"x"}


# ---------------------------------------------------------------- 2. other ways a file changes


def test_editor_save_rename_over_the_file(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    calls = Calls()
    with FileWatcher(path, calls) as watcher:
        replace_file(path, "v2")
        wait_until(lambda: watcher.content == "v2")
        replace_file(path, "v3")
        wait_until(lambda: watcher.content == "v3")
        assert calls.contents == ["v1", "v2", "v3"]
        assert watcher.reload_count == 3


def test_kubelet_swap_is_not_delayed_by_settle(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    settle = 3.0  # far longer than the wait below
    with FileWatcher(kubelet_mount.path("app.yaml"), Calls(), settle=settle) as watcher:
        kubelet_mount.set("app.yaml", b"v2")
        wait_until(lambda: watcher.content == "v2", timeout=settle / 2)


def test_in_place_write_with_a_pause_mid_write_is_never_seen_torn(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    contents = [f"version {i} " + str(i) * 4000 for i in range(4)]
    path.write_text(contents[0])
    calls = Calls()
    settle = 0.05
    with FileWatcher(path, calls, settle=settle) as watcher:
        for content in contents[1:]:
            with path.open("w") as file:  # truncates: the file is empty from here on
                file.write(content[:1000])
                file.flush()
                time.sleep(settle * 4)  # the writer stalls far longer than the quiet window
                file.write(content[1000:])
            wait_until(lambda content=content: watcher.content == content)  # type: ignore[misc]
        assert calls.contents == contents  # each one whole, none torn, none twice
        assert watcher.reload_count == 4


def test_back_to_back_in_place_rewrites_coalesce_and_are_never_torn(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("initial")
    written = {"initial"}
    calls = Calls()
    with FileWatcher(path, calls) as watcher:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 0.5 or i < 100:  # spans several settle windows
            content = f"{i:05d} " + "y" * (64 * 1024 if i % 2 else 10)
            written.add(content)
            with path.open("w") as file:
                file.write(content)
            i += 1
        burst = time.monotonic() - started
        wait_until(lambda: watcher.content == content)
    print(f"in-place burst: {i} rewrites in {burst * 1000:.0f} ms -> {len(calls) - 1} callbacks")
    assert set(calls.contents) <= written  # every content seen was written in full
    assert len(calls.contents) - 1 <= 2 + burst / 0.1
    assert all(a != b for a, b in zip(calls.contents, calls.contents[1:], strict=False))


def test_burst_of_kubelet_updates_is_reported_in_order_and_never_held_back(
    kubelet_mount: KubeletMount,
) -> None:
    kubelet_mount.write({"app.yaml": b"0"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls, settle=3600) as watcher:
        for i in range(1, 101):
            kubelet_mount.set("app.yaml", str(i).encode())
            if i in {1, 2}:  # two lone swaps in a row: neither waits for a settle window
                wait_until(lambda i=i: watcher.content == str(i), timeout=10)  # type: ignore[misc]
        wait_until(lambda: watcher.content == "100", timeout=10)
    print(f"kubelet burst: 100 updates -> {len(calls) - 1} callbacks")
    # every report is a whole version, newer than the one before; swaps made while one was
    # read or called back are folded into the next read: the final state always wins
    assert set(calls.contents) <= {str(i) for i in range(101)}
    assert [int(c) for c in calls.contents] == sorted({int(c) for c in calls.contents})
    assert watcher.reload_count == len(calls.contents)


def test_burst_of_editor_saves_coalesces(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("0")
    calls = Calls()
    with FileWatcher(path, calls) as watcher:
        started = time.monotonic()
        for i in range(1, 101):
            replace_file(path, str(i))
        burst = time.monotonic() - started
        wait_until(lambda: watcher.content == "100")
    print(f"rename burst: 100 saves in {burst * 1000:.0f} ms -> {len(calls) - 1} callbacks")
    assert set(calls.contents) <= {str(i) for i in range(101)}
    assert [int(c) for c in calls.contents] == sorted(int(c) for c in calls.contents)
    assert len(calls.contents) - 1 <= 2 + burst / 0.1


def test_delete_then_recreate_keeps_the_content_meanwhile(
    plain_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="publisher")
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    calls = Calls()
    with FileWatcher(path, calls) as watcher:
        path.unlink()
        wait_until(lambda: "is missing" in caplog.text)
        assert watcher.content == "v1"
        assert watcher.error_count == 0
        path.write_text("v1")  # back with the same content: nothing to reload
        path.unlink()
        with path.open("w") as file:  # created in place: open(O_CREAT), write, close
            time.sleep(0.3)  # an empty new file is not the new content either
            file.write("v2 first half, ")
            file.flush()
            time.sleep(0.3)  # a reader must not take the half-written file for the new one
            file.write("second half")
        wait_until(lambda: watcher.content == "v2 first half, second half")
        assert calls.contents == ["v1", "v2 first half, second half"]
        assert watcher.reload_count == 2
        assert watcher.error_count == 0


# ---------------------------------------------------------------- 4. missed events and repair


def test_directory_removed_and_recreated_is_watched_again(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls, resync_interval=0.5) as watcher:
        mount = watcher._mount
        shutil.rmtree(kubelet_mount.directory)
        wait_until(lambda: not mount.alive, what="the watch to notice the directory is gone")
        assert watcher.content == "v1"
        kubelet_mount.directory.mkdir()
        kubelet_mount.write({"app.yaml": b"v2"})
        wait_until(lambda: watcher.content == "v2", what="the directory's return")
        wait_until(lambda: mount.alive)
        kubelet_mount.set("app.yaml", b"v3")  # events flow again, not just resyncs
        wait_until(lambda: watcher.content == "v3")
        assert calls.contents == ["v1", "v2", "v3"]
        assert watcher.error_count == 0


def test_directory_replaced_by_rename_is_noticed_by_the_resync(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    calls = Calls()
    with FileWatcher(path, calls, resync_interval=1.5) as watcher:
        # The inotify watch follows the moved inode: only the resync's inode check sees this.
        plain_dir.rename(plain_dir.with_name("old"))
        replacement = plain_dir.with_name("new")
        replacement.mkdir()
        (replacement / "app.yaml").write_text("v2")
        replacement.rename(plain_dir)
        wait_until(lambda: watcher.content == "v2", timeout=5)
        # The new directory itself is watched now: its events arrive well before a resync.
        replace_file(path, "v3")
        wait_until(lambda: watcher.content == "v3", timeout=0.75)
        assert calls.contents == ["v1", "v2", "v3"]


def test_resync_repairs_a_dead_watch(kubelet_mount: KubeletMount) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls, resync_interval=0.3) as watcher:
        mount = watcher._mount
        observer = mount._watch.observer
        assert observer is not None
        observer.unschedule_all()  # the observer thread lives on, but nothing is watched
        assert not mount.alive
        kubelet_mount.set("app.yaml", b"v2")  # no event can report this
        wait_until(lambda: watcher.content == "v2", what="the resync")
        wait_until(lambda: mount.alive)
        assert mount._watch.observer is not observer
        assert mount.last_resync > 0
        kubelet_mount.set("app.yaml", b"v3")
        wait_until(lambda: watcher.content == "v3")


def test_resync_of_an_unchanged_kubelet_volume_reads_nothing(kubelet_mount: KubeletMount) -> None:
    # kubelet never changes a target once ..data points at it, so the resync only compares
    # the target (1,000 keys were read every 30 s for nothing). Proof that it did not read: a
    # file changed inside the target behind kubelet's back is not reported by resyncs...
    kubelet_mount.write({"app.yaml": b"v1", "other": b"x"})
    calls = Calls()
    with FileWatcher(kubelet_mount.path("app.yaml"), calls, resync_interval=0.1) as watcher:
        target = os.readlink(kubelet_mount.path("..data"))
        (kubelet_mount.directory / target / "app.yaml").write_bytes(b"tampered")
        before = watcher._mount.last_resync
        wait_until(lambda: watcher._mount.last_resync > before + 0.3, what="a few resyncs")
        assert watcher.content == "v1"
        # ... while a swap is read at once, as ever (and a lost one at the next resync: the
        # target is not the one read last)
        kubelet_mount.set("app.yaml", b"v2")
        wait_until(lambda: watcher.content == "v2")
    assert calls.contents == ["v1", "v2"]


def test_resync_picks_up_a_change_no_event_reports(plain_dir: Path, tmp_path: Path) -> None:
    # The key is a symlink to a file elsewhere: writing that file makes no event in plain_dir.
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("v1")
    (plain_dir / "app.yaml").symlink_to(elsewhere)
    calls = Calls()
    with FileWatcher(plain_dir / "app.yaml", calls, resync_interval=0.2) as watcher:
        before = watcher._mount.last_resync
        elsewhere.write_text("v2")
        wait_until(lambda: watcher.content == "v2")
        assert watcher._mount.last_resync > before
        assert calls.contents == ["v1", "v2"]


def test_polling_observer_detects_every_kind_of_change(
    kubelet_mount: KubeletMount, plain_dir: Path
) -> None:
    kubelet_mount.write({"app.yaml": b"k1"})
    (plain_dir / "app.yaml").write_text("p1")
    from_kubelet, from_plain = Calls(), Calls()
    with (
        FileWatcher(kubelet_mount.path("app.yaml"), from_kubelet, force_polling=True) as kubelet,
        FileWatcher(plain_dir / "app.yaml", from_plain, force_polling=True) as plain,
    ):
        assert type(kubelet._mount._watch.observer).__name__ == "PollingObserver"
        kubelet_mount.set("app.yaml", b"k2")
        replace_file(plain_dir / "app.yaml", "p2")
        wait_until(lambda: kubelet.content == "k2" and plain.content == "p2")
        with (plain_dir / "app.yaml").open("w") as file:
            file.write("p3 " + "z" * 10_000)
        wait_until(lambda: plain.content.startswith("p3"), timeout=10)
        assert from_plain.contents == ["p1", "p2", "p3 " + "z" * 10_000]
        assert from_kubelet.contents == ["k1", "k2"]


_INOTIFY_EXHAUSTED_CHILD = textwrap.dedent(
    """
    import ctypes, json, logging, os, sys, tempfile, time
    from publisher import FileWatcher

    # The inotify instance limit is per user: exhaust it for an otherwise unused uid only.
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    libc = ctypes.CDLL(None, use_errno=True)
    held = []
    while (fd := libc.inotify_init1(os.O_CLOEXEC)) >= 0:
        held.append(fd)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("publisher").addHandler(handler)
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "app.yaml")
    with open(path, "w") as file:
        file.write("v1")
    with FileWatcher(path, lambda content: None) as watcher:
        with open(path + ".tmp", "w") as file:
            file.write("v2")
        os.replace(path + ".tmp", path)
        deadline = time.monotonic() + 10
        while watcher.content != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        observer = type(watcher._mount._watch.observer).__name__
        content = watcher.content
    print(json.dumps({"held": len(held), "errno": ctypes.get_errno(), "observer": observer,
                      "content": content, "logs": records}))
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the child as uid 65534")
def test_no_inotify_instance_left_falls_back_to_polling() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _INOTIFY_EXHAUSTED_CHILD],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["held"] > 0
    assert report["observer"] == "PollingObserver"
    assert report["content"] == "v2"
    warnings = [line for line in report["logs"] if "polling" in line]
    assert len(warnings) == 1
    assert "inotify instance limit reached" in warnings[0]
    assert "max_user_instances" in warnings[0]


# ---------------------------------------------------------------- 5. subPath mounts


def test_subpath_mount_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "etc config"  # mountinfo escapes the space as \\040
    directory.mkdir()
    path = directory / "app.yaml"
    path.write_text("v1")
    mountinfo = tmp_path / "mountinfo"
    escaped = str(path.resolve()).replace(" ", "\\040")
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"35 22 8:1 /var/lib/kubelet/pods/p/volumes/cm/app.yaml {escaped} ro,relatime - ext4 "
        "/dev/sda1 rw\n"
    )
    monkeypatch.setattr(filewatcher_module, "_MOUNTINFO", str(mountinfo))
    caplog.set_level(logging.WARNING, logger="publisher")
    with FileWatcher(path, Calls()) as watcher:
        replace_file(path, "v2")
        wait_until(lambda: watcher.content == "v2")
    warnings = [r for r in caplog.records if "subPath" in r.getMessage()]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "mount the whole ConfigMap volume" in warnings[0].getMessage()


def test_no_subpath_warning_for_ordinary_files_and_volumes(
    kubelet_mount: KubeletMount,
    plain_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    (plain_dir / "app.yaml").write_text("v1")
    mountinfo = tmp_path / "mountinfo"
    # Even listed as mount points, a volume's key (a symlink) is not a subPath mount.
    mountinfo.write_text(f"35 22 8:1 / {kubelet_mount.path('app.yaml')} rw - ext4 /dev/sda1 rw\n")
    monkeypatch.setattr(filewatcher_module, "_MOUNTINFO", str(mountinfo))
    caplog.set_level(logging.WARNING, logger="publisher")
    with (
        FileWatcher(plain_dir / "app.yaml", Calls()),
        FileWatcher(kubelet_mount.path("app.yaml"), Calls()),
    ):
        pass
    assert "subPath" not in caplog.text


# ---------------------------------------------------------------- 6. FileWatcher semantics


def test_start_fails_for_a_missing_file_or_directory(plain_dir: Path) -> None:
    missing = plain_dir / "missing.yaml"
    with pytest.raises(InitialLoadError) as raised:
        FileWatcher(missing, Calls()).start()
    assert raised.value.path == str(missing)
    assert isinstance(raised.value.cause, FileNotFoundError)
    assert str(missing) in str(raised.value)

    in_missing_dir = plain_dir / "nope" / "app.yaml"
    with pytest.raises(InitialLoadError) as raised:
        FileWatcher(in_missing_dir, Calls()).start()
    assert raised.value.path == str(in_missing_dir)
    assert isinstance(raised.value.cause, FileNotFoundError)
    assert not watcher_threads()


def test_start_fails_when_the_callback_rejects_or_the_file_is_not_text(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("bad")
    calls = Calls(reject=lambda content: content == "bad")
    watcher = FileWatcher(path, calls)
    with pytest.raises(InitialLoadError) as raised:
        watcher.start()
    assert raised.value.path == str(path)
    assert isinstance(raised.value.cause, ValueError)
    assert str(path) in str(raised.value)
    assert watcher.last_hash == ""
    watcher.stop()  # harmless after a failed start

    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InitialLoadError) as raised:
        FileWatcher(path, Calls()).start()
    assert isinstance(raised.value.cause, UnicodeDecodeError)
    assert not watcher_threads()


def test_mount_watcher_start_names_the_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        MountWatcher(tmp_path / "nope", Reports()).start()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        MountWatcher(tmp_path / "file", Reports()).start()
    assert not watcher_threads()


def test_rejected_content_is_counted_once_and_not_retried(
    kubelet_mount: KubeletMount, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="publisher")
    kubelet_mount.write({"app.yaml": b"good 1", "other": b"0"})
    calls = Calls(reject=lambda content: content.startswith("bad"))
    with FileWatcher(kubelet_mount.path("app.yaml"), calls, resync_interval=0.2) as watcher:
        kubelet_mount.set("app.yaml", b"bad 1")
        wait_until(lambda: watcher.error_count == 1)
        assert watcher.content == "good 1"
        assert watcher.last_hash == sha("good 1")
        for i in range(5):
            kubelet_mount.set("other", str(i).encode())  # swaps that leave "bad 1" in place
        watcher._mount.rescan()
        kubelet_mount.write({"other": b"x"})  # the key goes away ...
        wait_until(lambda: "is missing" in caplog.text)
        kubelet_mount.set("app.yaml", b"bad 1")  # ... and comes back as it was: still rejected
        readded = time.monotonic()
        wait_until(lambda: watcher._mount.last_resync > readded)  # it has been read since
        kubelet_mount.set("app.yaml", b"good 2")
        wait_until(lambda: watcher.content == "good 2")
        assert calls.contents == ["good 1", "bad 1", "good 2"]
        kubelet_mount.set("app.yaml", b"bad 1")  # the content changed again: offered again
        wait_until(lambda: watcher.error_count == 2)
        kubelet_mount.set("app.yaml", b"bad 2")
        wait_until(lambda: watcher.error_count == 3)
        assert calls.contents == ["good 1", "bad 1", "good 2", "bad 1", "bad 2"]
        assert watcher.reload_count == 2
        assert watcher.content == "good 2"


def test_undecodable_and_unreadable_updates_count_as_errors(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    calls = Calls()
    with FileWatcher(path, calls) as watcher:
        temp = plain_dir / "tmp"
        temp.write_bytes(b"\xff not utf-8")
        os.replace(temp, path)
        wait_until(lambda: watcher.error_count == 1)
        # A symlink loop cannot be opened (ELOOP), even by root.
        (plain_dir / "loop").symlink_to("loop")
        (plain_dir / "link").symlink_to("loop")
        os.replace(plain_dir / "link", path)
        wait_until(lambda: watcher.error_count == 2)
        watcher._mount.rescan()  # still unreadable: not counted again
        replace_file(path, "v2")
        wait_until(lambda: watcher.content == "v2")
        assert watcher.error_count == 2
        assert calls.contents == ["v1", "v2"]


def test_unchanged_content_never_calls_back(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("same")
    calls = Calls()
    with FileWatcher(path, calls, resync_interval=0.1) as watcher:
        path.write_text("same")  # in place, same bytes
        replace_file(path, "same")  # new inode, same bytes
        os.utime(path)
        watcher._mount.rescan()
        before = watcher._mount.last_resync
        wait_until(lambda: watcher._mount.last_resync > before)  # a full resync ran too
        replace_file(path, "barrier")
        wait_until(lambda: watcher.content == "barrier")
        assert calls.contents == ["same", "barrier"]
        assert watcher.reload_count == 2


def test_stop_is_idempotent_and_no_callback_runs_after_it(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    entered, release = threading.Event(), threading.Event()

    def slow_callback(content: str) -> None:
        if content == "v2":
            entered.set()
            release.wait(5)

    watcher = FileWatcher(path, slow_callback, resync_interval=0.05)
    watcher.start()
    replace_file(path, "v2")
    assert entered.wait(5)
    stopper = threading.Thread(target=watcher.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive(), "stop() must wait for the running callback"
    release.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert not watcher_threads()  # the worker is gone: nothing can call back any more
    assert not watcher._mount.alive
    watcher.stop()
    watcher.stop()
    assert watcher.content == "v2"


def test_stop_from_inside_the_callback(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    holder: list[FileWatcher] = []

    def stop_on_v2(content: str) -> None:
        if content == "v2":
            holder[0].stop()

    watcher = FileWatcher(path, stop_on_v2)
    holder.append(watcher)
    watcher.start()
    replace_file(path, "v2")
    wait_until(lambda: not watcher_threads())
    assert watcher.content == "v2"
    watcher.stop()


def test_context_manager_starts_and_stops(plain_dir: Path) -> None:
    path = plain_dir / "app.yaml"
    path.write_text("v1")
    with FileWatcher(path, Calls()) as watcher:
        assert watcher.content == "v1"
        assert watcher._mount.alive
        with pytest.raises(RuntimeError, match="already started"):
            watcher.start()
    assert not watcher._mount.alive
    assert not watcher_threads()


def test_on_change_failure_is_reported_again_by_the_next_scan(plain_dir: Path) -> None:
    (plain_dir / "a").write_text("1")
    attempts: list[MountContent] = []

    def failing_once(report: MountContent) -> None:
        attempts.append(report)
        if len(attempts) == 1:
            raise RuntimeError("publishing failed")

    with MountWatcher(plain_dir, failing_once, resync_interval=0.1):
        replace_file(plain_dir / "a", "2")
        wait_until(lambda: len(attempts) == 2, what="the resync to offer the change again")
    assert [dict(s.files) for s in attempts] == [{"a": b"2"}, {"a": b"2"}]
    assert attempts[1].changed == {"a"}
