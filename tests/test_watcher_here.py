"""A kubelet swap read and reported on the thread that saw the rename (``swaps_on_event``).

``MountWatcher``'s worker reads everything else; it must stay one reader at a time, report
only what ``..data`` points at, and ``stop()`` must keep its word from either thread. The
pre-read's tampering tests (``tests/test_preread.py``) and the kubelet storm
(``tests/test_watcher_storm.py``) run with and without it.
"""

from __future__ import annotations

import threading
import time

from publisher.watcher import MountContent, MountWatcher
from tests.conftest import KubeletMount
from tests.helpers import wait_until

WORKER = "hotreload-watch"  # the worker thread's name begins so


def test_a_swap_met_by_an_idle_worker_is_reported_on_the_thread_that_saw_it(
    kubelet_mount: KubeletMount,
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n", "other.yaml": b"same\n"})
    reports: list[tuple[str, dict[str, bytes], frozenset[str]]] = []

    def on_change(content: MountContent) -> None:
        reports.append((threading.current_thread().name, dict(content.files), content.changed))

    with MountWatcher(kubelet_mount.directory, on_change, swaps_on_event=True) as watcher:
        for i in range(1, 21):
            kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
            wait_until(lambda i=i: len(reports) == i)  # type: ignore[misc]
            time.sleep(0.1)  # the worker's pre-read ends: idle at the next swap (0.02: flaky)
        assert watcher.alive
    assert [files for _, files, _ in reports] == [
        {"app.yaml": f"rev: {i}\n".encode(), "other.yaml": b"same\n"} for i in range(1, 21)
    ]
    assert all(changed == {"app.yaml"} for _, _, changed in reports)
    # a swap that finds the worker still pre-reading goes to it; most do not (19-20 of 20 here)
    here = [name for name, _, _ in reports if not name.startswith(WORKER)]
    assert len(here) >= 10, [name for name, _, _ in reports]


def test_stop_called_from_on_change_on_watchdogs_thread_returns(
    kubelet_mount: KubeletMount,
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    calls: list[str] = []
    stopped = threading.Event()
    watcher: MountWatcher

    def on_change(content: MountContent) -> None:
        calls.append(threading.current_thread().name)
        if not calls[-1].startswith(WORKER):
            watcher.stop()  # would wait for the worker, which waits for this thread's end
            stopped.set()

    watcher = MountWatcher(kubelet_mount.directory, on_change, swaps_on_event=True)
    watcher.start()
    try:
        for i in range(1, 11):
            kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
            wait_until(lambda i=i: len(calls) >= i or stopped.is_set())  # type: ignore[misc]
            if stopped.is_set():
                break
            time.sleep(0.02)
        assert stopped.wait(5), calls
        wait_until(lambda: not watcher.alive, "the watcher stopped")
        count = len(calls)
        kubelet_mount.set("app.yaml", b"after the stop\n")
        time.sleep(0.2)
        assert len(calls) == count  # nothing reported once stop() returned
    finally:
        watcher.stop()
