"""Conformance of ``publisher.FileWatcher`` with the Go watcher this project grew from.

The seed is ``FileWatcher`` in github.com/jordigilh/kubernaut, ``pkg/shared/hotreload``; its unit
tests (``file_watcher_test.go``, Ginkgo) are the executable spec. Each test below ports one of
its scenarios, in our own words, and names it. Go conventions map to Python idioms:
``NewFileWatcher`` returning an error -> the constructor raising ``ConfigurationError``;
``Start(ctx)`` -> ``start()``, its error -> ``InitialLoadError``; ``GetLastHash`` ->
``last_hash``, ``GetLastContent`` -> ``content`` (the name ``Subscriber`` shares),
``GetReloadCount`` -> ``reload_count``, ``GetErrorCount`` -> ``error_count``,
``GetLastReloadTime`` -> ``last_reload_time`` (``time.time()``); ``defer watcher.Stop()`` ->
``try/finally``; ``Eventually`` -> polling with a deadline; a cancelled context -> leaving the
``with`` block.

Files are real and change as the seed's test changes them (``os.WriteFile``: truncate and
write in place). The seed's watcher is for mounted ConfigMaps, so every scenario that writes a
file also runs against a ConfigMap volume updated the way kubelet does it
(``tests/_vendor/k8s_atomic_writer.py``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from publisher import FileWatcher
from publisher.watcher import MountWatcher
from subscriber import ConfigurationError, InitialLoadError
from tests.conftest import KubeletMount
from tests.helpers import wait_until
from tests.test_watcher import Calls, Reports, replace_file

EVENTUALLY = 5.0
"""Seconds an ``Eventually`` waits; the seed waits 3 s, this leaves room for a loaded machine."""

POLL = 0.1
"""The seed's ``Eventually`` polling interval."""

KEY = "config.txt"


class Config(Protocol):
    """The seed's ``testFile`` and its ``createFile`` helper."""

    path: Path

    def write(self, content: str) -> None: ...


class InPlaceFile:
    """``os.WriteFile(testFile, content, 0644)``: truncate and write the file where it is."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / KEY

    def write(self, content: str) -> None:
        self.path.write_text(content)
        self.path.chmod(0o644)


class ConfigMapKey:
    """The same file as a key of a ConfigMap volume, updated by kubelet's atomic writer."""

    def __init__(self, mount: KubeletMount) -> None:
        self.mount = mount
        self.path = mount.path(KEY)

    def write(self, content: str) -> None:
        self.mount.set(KEY, content.encode())


@pytest.fixture(params=["os.WriteFile", "kubelet"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    if request.param == "kubelet":
        return ConfigMapKey(KubeletMount(tmp_path / "configmap"))
    return InPlaceFile(tmp_path)


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hotreload-watch")]


@pytest.fixture
def started() -> Iterator[list[FileWatcher]]:
    """Watchers a test started; stopped afterwards whatever happened (the seed's AfterEach)."""
    watchers: list[FileWatcher] = []
    yield watchers
    for watcher in watchers:
        watcher.stop()


# ---------------------------------------------------------------- NewFileWatcher


def test_creates_a_watcher_with_valid_parameters(config: Config) -> None:
    # Seed: NewFileWatcher "should create watcher with valid parameters"
    config.write("initial content")
    watcher = FileWatcher(config.path, lambda content: None)
    assert isinstance(watcher, FileWatcher)
    assert not watcher_threads()  # constructing watches nothing yet


def test_an_empty_path_is_refused() -> None:
    # Seed: NewFileWatcher "should return error for empty path"
    with pytest.raises(ConfigurationError, match="path is required"):
        FileWatcher("", lambda content: None)


def test_a_missing_callback_is_refused() -> None:
    # Seed: NewFileWatcher "should return error for nil callback"
    with pytest.raises(ConfigurationError, match="callback is required"):
        FileWatcher("/some/path", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Start


def test_start_loads_the_initial_content_and_calls_back(
    config: Config, started: list[FileWatcher]
) -> None:
    # Seed: Start "should load initial content and call callback"
    config.write("initial content")
    callback = Calls()
    watcher = FileWatcher(config.path, callback)
    watcher.start()
    started.append(watcher)
    assert callback.contents == ["initial content"]
    assert watcher.last_hash != ""
    assert watcher.reload_count == 1  # the initial load is reload 1


def test_start_fails_when_the_file_does_not_exist() -> None:
    # Seed: Start "should return error if file does not exist"
    watcher = FileWatcher("/nonexistent/file.txt", lambda content: None)  # constructing is fine
    with pytest.raises(InitialLoadError, match="cannot load initial config") as raised:
        watcher.start()
    assert raised.value.path == "/nonexistent/file.txt"
    assert isinstance(raised.value.cause, FileNotFoundError)
    assert not watcher_threads()


def test_start_fails_when_the_callback_rejects_the_initial_content(config: Config) -> None:
    # Seed: Start "should return error if callback fails on initial load"
    config.write("initial content")
    callback = Calls(reject=lambda content: True)
    watcher = FileWatcher(config.path, callback)
    with pytest.raises(InitialLoadError) as raised:
        watcher.start()
    assert isinstance(raised.value.cause, ValueError)  # the callback's own error, kept
    assert raised.value.__cause__ is raised.value.cause
    assert callback.contents == ["initial content"]
    assert watcher.last_hash == ""
    assert watcher.reload_count == 0
    assert not watcher_threads()


# ---------------------------------------------------------------- Stop


def test_stop_returns_promptly(config: Config) -> None:
    # Seed: Stop "should stop gracefully" (within 2 s)
    config.write("initial content")
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.start()
    stopper = threading.Thread(target=watcher.stop)
    stopper.start()
    stopper.join(2)
    assert not stopper.is_alive(), "stop() did not return within 2 s"
    assert not watcher_threads()


# ---------------------------------------------------------------- Hot-Reload on File Change


def test_a_content_change_calls_back(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Hot-Reload "should detect file content change and call callback"
    config.write("initial content")
    callback = Calls()
    watcher = FileWatcher(config.path, callback)
    watcher.start()
    started.append(watcher)
    assert len(callback) == 1

    config.write("updated content")
    wait_until(lambda: len(callback) == 2, "the second call", timeout=EVENTUALLY, interval=POLL)
    assert callback.last == "updated content"
    assert watcher.reload_count == 2


def test_unchanged_content_does_not_call_back(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Hot-Reload "should skip reload if content hash unchanged"
    config.write("same content")
    callback = Calls()
    watcher = FileWatcher(config.path, callback)
    watcher.start()
    started.append(watcher)
    initial_hash = watcher.last_hash

    config.write("same content")
    time.sleep(0.5)  # as long as the seed gives a reload that must not come
    assert len(callback) == 1
    assert watcher.last_hash == initial_hash
    assert watcher.reload_count == 1


def test_rejected_content_keeps_the_old_one(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Hot-Reload "should keep old content if callback rejects new content"
    config.write("initial content")
    reject_new = threading.Event()
    callback = Calls(reject=lambda content: reject_new.is_set())
    watcher = FileWatcher(config.path, callback)
    watcher.start()
    started.append(watcher)
    initial_hash = watcher.last_hash
    reject_new.set()

    config.write("bad content")
    wait_until(lambda: watcher.error_count == 1, "the rejection", timeout=EVENTUALLY, interval=POLL)
    assert watcher.last_hash == initial_hash
    assert watcher.content == "initial content"
    assert watcher.reload_count == 1


# ---------------------------------------------------------------- Status Methods


def test_last_reload_time_is_the_initial_load(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Status Methods "should return correct reload time"
    config.write("initial content")
    before_start = time.time()
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.start()
    started.append(watcher)
    after_start = time.time()
    reload_time = watcher.last_reload_time
    assert reload_time is not None
    assert before_start <= reload_time <= after_start


def test_content_is_the_loaded_content(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Status Methods "should return content via GetLastContent"
    config.write("test content 123")
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.start()
    started.append(watcher)
    assert watcher.content == "test content 123"


def test_last_hash_is_the_full_sha256(config: Config, started: list[FileWatcher]) -> None:
    # Seed: Status Methods "should compute consistent hash" (full SHA-256: 64 hex characters)
    config.write("content for hash")
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.start()
    started.append(watcher)
    assert len(watcher.last_hash) == 64
    assert watcher.last_hash == hashlib.sha256(b"content for hash").hexdigest()


# ---------------------------------------------------------------- Context Cancellation


def test_leaving_the_with_block_stops_the_watch(config: Config) -> None:
    # Seed: Context Cancellation "should stop watch loop when context is cancelled". Python has
    # no context to cancel; the scope a watcher lives in is its ``with`` block, and leaving it
    # (here by an exception, as a cancellation would) stops the watch. A later stop() returns.
    config.write("initial content")

    class Cancelled(Exception):
        pass

    watcher = FileWatcher(config.path, lambda content: None)

    def work_until_cancelled() -> None:
        with watcher:
            assert watcher_threads()
            raise Cancelled

    with pytest.raises(Cancelled):
        work_until_cancelled()
    assert not watcher_threads()
    watcher.stop()


# ---------------------------------------------------------------- Double Stop Safety


def test_stop_twice_after_start(config: Config) -> None:
    # Seed: Double Stop Safety "UT-HR-1356-001: should not panic when Stop() is called twice
    # after Start()"
    config.write("double stop content")
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.start()
    watcher.stop()
    watcher.stop()
    assert not watcher_threads()


def test_stop_before_start(config: Config) -> None:
    # Seed: Double Stop Safety "UT-HR-1356-002: should not panic when Stop() is called before
    # Start()"
    config.write("stop before start")
    watcher = FileWatcher(config.path, lambda content: None)
    watcher.stop()
    assert not watcher_threads()


def test_stop_on_a_watcher_that_was_never_set_up() -> None:
    # Seed: Double Stop Safety "UT-HR-1356-003: should not panic when Stop() is called on a nil
    # *FileWatcher". Python has no nil receiver (None.stop() is an AttributeError no class can
    # prevent); the nearest is a FileWatcher whose __init__ never ran, as when a subclass raises
    # before super().__init__() and cleanup still calls stop().
    watcher = FileWatcher.__new__(FileWatcher)
    watcher.stop()
    watcher.stop()


# ---------------------------------------------------------------- beyond the seed's tests
# What the seed's code does (file_watcher.go) that its tests leave unchecked, and the errors
# that must say what to do.


def test_a_directory_path_is_refused_naming_the_path_and_what_to_do(
    tmp_path: Path, kubelet_mount: KubeletMount
) -> None:
    kubelet_mount.write({"app.yaml": b"v1"})
    for directory in (tmp_path, kubelet_mount.directory):
        with pytest.raises(InitialLoadError) as raised:
            FileWatcher(directory, Calls()).start()
        assert isinstance(raised.value.cause, IsADirectoryError)
        message = str(raised.value)
        assert f"'{directory}'" in message  # the path, not a file descriptor
        assert "give the path of a file in it" in message
        assert "MountWatcher" in message
    with pytest.raises(ConfigurationError, match="Is a directory"):
        FileWatcher("/", Calls())
    assert not watcher_threads()


def test_the_callback_must_be_callable(tmp_path: Path) -> None:
    for callback in (None, "apply"):
        with pytest.raises(ConfigurationError, match="callback is required") as raised:
            FileWatcher(tmp_path / "app.yaml", callback)  # type: ignore[arg-type]
        assert repr(callback) in str(raised.value)


def test_a_stopped_watcher_cannot_be_restarted(tmp_path: Path) -> None:
    """As in the seed, whose Start after Stop panics: stop() is final; a new watcher is not."""
    path = tmp_path / "app.yaml"
    path.write_text("v1")
    calls = Calls()
    watcher = FileWatcher(path, calls)
    watcher.start()
    watcher.stop()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stopped and cannot be restarted") as raised:
            watcher.start()
        assert "create a new FileWatcher" in str(raised.value)
    never_started = FileWatcher(path, calls)
    never_started.stop()
    with pytest.raises(RuntimeError, match="cannot be restarted"):
        never_started.start()
    mount = MountWatcher(tmp_path, Reports())
    mount.start()
    mount.stop()
    with pytest.raises(RuntimeError, match="create a new MountWatcher"):
        mount.start()
    assert calls.contents == ["v1"]
    assert not watcher_threads()


def test_a_failed_start_can_be_retried(tmp_path: Path) -> None:
    """As in the seed, a Start that failed to load leaves nothing running and may be retried."""
    path = tmp_path / "app.yaml"
    calls = Calls(reject=lambda content: content == "bad")
    watcher = FileWatcher(path, calls)
    with pytest.raises(InitialLoadError):
        watcher.start()  # missing
    path.write_text("bad")
    with pytest.raises(InitialLoadError):
        watcher.start()  # rejected
    assert not watcher_threads()
    path.write_text("good")
    watcher.start()
    try:
        assert (watcher.content, watcher.reload_count, watcher.error_count) == ("good", 1, 0)
        replace_file(path, "v2")
        wait_until(lambda: watcher.content == "v2")
        assert calls.contents == ["bad", "good", "v2"]
    finally:
        watcher.stop()
    assert not watcher_threads()
    mount = MountWatcher(tmp_path / "later", Reports())
    with pytest.raises(FileNotFoundError):
        mount.start()
    (tmp_path / "later").mkdir()
    with mount:
        assert mount.alive
