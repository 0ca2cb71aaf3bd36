"""Randomized storms against FileWatcher: hundreds of updates, rejections and unrelated changes.

Whatever the interleaving, the callback may only ever see content that was written in full,
never the same content twice in a row, the final content must win, and the counters must
match what the callback saw.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from publisher.filewatcher import FileWatcher
from publisher.watcher import MountWatcher
from tests.conftest import KubeletMount
from tests.helpers import wait_until
from tests.test_watcher import sha

pytestmark = pytest.mark.slow


class StormCallback:
    """Accepts contents starting with 'valid', rejects the rest; checks what it is given."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.accepted = 0
        self.rejected = 0
        self.active: str | None = None
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, content: str) -> None:
        with self._lock:
            if content == self.active:
                self.problems.append(f"called back with the active content {content[:20]!r}")
            self.seen.append(content)
            if not content.startswith("valid"):
                self.rejected += 1
                raise ValueError("not valid")
            self.accepted += 1
            self.active = content


def make_content(rng: random.Random, serial: int, *, valid: bool) -> str:
    # Large and varied sizes so that a torn read would show; start and end are both marked.
    body = "".join(rng.choice("abcdefgh\n") for _ in range(rng.randint(1, 40))) * rng.randint(
        1, 400
    )
    return f"{'valid' if valid else 'invalid'} {serial}\n{body}\nend {serial}\n"


def pause(rng: random.Random, *, long: float = 0.05) -> None:
    """No pause, a short one, or (one time in ten) one up to ``long`` seconds."""
    roll = rng.random()
    if roll < 0.4:
        return  # back to back
    time.sleep(rng.uniform(0, 0.002) if roll < 0.9 else rng.uniform(0.01, long))


def check(callback: StormCallback, watcher: FileWatcher, written: set[str], final: str) -> None:
    assert not callback.problems, callback.problems[:3]
    assert set(callback.seen) <= written, "the callback saw content that was never written"
    assert all(a != b for a, b in zip(callback.seen, callback.seen[1:], strict=False))
    assert callback.seen[-1] == final
    assert watcher.content == final
    assert watcher.last_hash == sha(final)
    assert watcher.reload_count == callback.accepted  # the initial load included, as in the seed
    assert watcher.error_count == callback.rejected


# settle=0 reports every swap it sees, so the callback runs hundreds of times
@pytest.mark.parametrize("swaps_on_event", [False, True])
@pytest.mark.parametrize(("seed", "settle"), [(1, 0.1), (2, 0.0)])
def test_kubelet_storm(
    kubelet_mount: KubeletMount,
    seed: int,
    settle: float,
    swaps_on_event: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = MountWatcher.__init__.__kwdefaults__  # FileWatcher's (the daemon's: True)
    assert defaults is not None
    monkeypatch.setitem(defaults, "swaps_on_event", swaps_on_event)
    rng = random.Random(seed)
    serial = 0
    app = make_content(rng, serial, valid=True)
    written = {app}
    kubelet_mount.write({"app.yaml": app.encode(), "other.yaml": b"0"})
    callback = StormCallback()
    started = time.monotonic()
    with FileWatcher(
        kubelet_mount.path("app.yaml"), callback, settle=settle, resync_interval=0.5
    ) as watcher:
        for _ in range(400):
            serial += 1
            roll = rng.random()
            if roll < 0.4:
                app = make_content(rng, serial, valid=True)
            elif roll < 0.6:
                app = make_content(rng, serial, valid=False)
            elif roll < 0.7 and written:
                app = rng.choice(sorted(written))  # back to an earlier content
            if roll < 0.7:
                written.add(app)
                kubelet_mount.set("app.yaml", app.encode())
            elif roll < 0.9:
                kubelet_mount.set("other.yaml", str(serial).encode())  # only another key
            elif "extra.yaml" in kubelet_mount.payload:
                kubelet_mount.write(
                    {k: v for k, v in kubelet_mount.payload.items() if k != "extra.yaml"}
                )
            else:
                kubelet_mount.set("extra.yaml", b"x")  # a key comes (and later goes)
            pause(rng)
        final = make_content(rng, serial + 1, valid=True)
        written.add(final)
        kubelet_mount.set("app.yaml", final.encode())
        wait_until(lambda: watcher.content == final, timeout=10)
        wait_until(lambda: callback.seen[-1] == final)
    print(
        f"kubelet storm seed {seed} settle {settle}: {len(callback.seen)} callbacks "
        f"({callback.accepted} accepted, {callback.rejected} rejected) "
        f"in {time.monotonic() - started:.1f} s"
    )
    check(callback, watcher, written, final)


def test_plain_directory_storm(tmp_path: Path) -> None:
    """In-place rewrites (some pausing mid-write), editor saves, deletes and re-creates."""
    rng = random.Random(3)
    directory = tmp_path / "plain"
    directory.mkdir()
    path = directory / "app.yaml"
    content = make_content(rng, 0, valid=True)
    path.write_text(content)
    written = {content}
    callback = StormCallback()
    started = time.monotonic()
    settle = 0.1  # the default; the double read needs events to arrive within it
    with FileWatcher(path, callback, settle=settle, resync_interval=0.5) as watcher:
        for serial in range(1, 201):
            content = make_content(rng, serial, valid=rng.random() < 0.7)
            written.add(content)
            roll = rng.random()
            if roll < 0.45:
                with path.open("w") as file:  # truncate + write, maybe stalling in between
                    half = len(content) // 2
                    file.write(content[:half])
                    if rng.random() < 0.1:
                        file.flush()
                        time.sleep(rng.uniform(settle, 2 * settle))  # stalls longer than settle
                    file.write(content[half:])
            elif roll < 0.85:
                temp = directory / f".app.yaml.{serial}.tmp"
                temp.write_text(content)
                os.replace(temp, path)
            else:
                path.unlink()
                pause(rng)
                path.write_text(content)
            pause(rng, long=3 * settle)  # quiet long enough, at times, for a report
        final = make_content(rng, 201, valid=True)
        written.add(final)
        path.write_text(final)
        wait_until(lambda: watcher.content == final, timeout=10)
        wait_until(lambda: callback.seen[-1] == final)
    print(
        f"plain storm: {len(callback.seen)} callbacks ({callback.accepted} accepted, "
        f"{callback.rejected} rejected) in {time.monotonic() - started:.1f} s"
    )
    check(callback, watcher, written, final)
