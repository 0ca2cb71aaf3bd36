"""The intake's ``..data`` target per key (``Intake.target_of``): a key about to be published
is read again only when kubelet swapped its directory since the content was read.

One report of a 1,000-key volume used to set the target of each of its keys (0.2 ms of the
swap's way to Redis); now the directory's report carries it for every key, and a key read
again on its own carries its own until the next report. What users rely on is unchanged:
an unchanged key published again (a reconnect) is not read again, a key whose directory
moved on is."""

from __future__ import annotations

import logging

import pytest

from publisher._mount import read_mount
from publisher.intake import Intake
from publisher.plan import Plan
from publisher.watcher import MountContent
from tests.conftest import KubeletMount

_READ_AGAIN = "read again"


def _report(kubelet_mount: KubeletMount, changed: set[str]) -> MountContent:
    directory = str(kubelet_mount.directory)
    read = read_mount(directory, None, ())
    return MountContent(directory, read.target, read.files, frozenset(changed), frozenset())


def test_a_key_is_read_again_only_when_its_directory_moved_on(
    kubelet_mount: KubeletMount, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="publisher.intake")
    directory = str(kubelet_mount.directory)
    kubelet_mount.write({"a.yaml": b"a: 1\n", "b.yaml": b"b: 1\n"})
    intake = Intake(Plan.make([directory]))
    intake.accept(directory, _report(kubelet_mount, {"a.yaml", "b.yaml"}))
    # one key changes: the report names it alone, yet b's target is the new one too
    kubelet_mount.write({"a.yaml": b"a: 2\n", "b.yaml": b"b: 1\n"})
    intake.accept(directory, _report(kubelet_mount, {"a.yaml"}))
    for name in ("a.yaml", "b.yaml"):
        state = intake.keys[name]
        assert intake.target_of(state) == (kubelet_mount.directory / "..data").readlink().name
    intake.mark(["b.yaml"])  # published again (a reconnect): nothing to read
    newest = intake.newest("b.yaml")
    assert newest is not None
    assert newest.content == b"b: 1\n"
    assert _READ_AGAIN not in caplog.text
    # kubelet swaps before the watcher reports it: the key is read again, alone ...
    kubelet_mount.write({"a.yaml": b"a: 2\n", "b.yaml": b"b: 3\n"})
    newest = intake.newest("b.yaml")
    assert newest is not None
    assert newest.content == b"b: 3\n"
    assert caplog.text.count(_READ_AGAIN) == 1
    # ... once: that read is its target now, while a's is still its directory's report
    swapped = (kubelet_mount.directory / "..data").readlink().name
    assert intake.target_of(intake.keys["b.yaml"]) == swapped
    assert intake.target_of(intake.keys["a.yaml"]) != swapped
    assert intake.newest("b.yaml") is not None
    assert caplog.text.count(_READ_AGAIN) == 1
    # the watcher's report of that swap: every key's target again
    intake.accept(directory, _report(kubelet_mount, {"b.yaml"}))
    assert {intake.target_of(s) for s in intake.keys.values()} == {swapped}
