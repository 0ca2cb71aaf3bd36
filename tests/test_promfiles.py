"""The subscriber's own multiprocess writer (subscriber._promfiles) against prometheus_client.

Each "worker" is a real process (its own pid) recording the same sequence of applies, rejects,
connection errors and versions, once through prometheus_client's objects and once through the
writer, into two multiprocess directories; a scrape of each (MultiProcessCollector) must be the
same text, byte for byte, also after a dead worker's live gauges are dropped by
``subscriber.gunicorn.child_exit`` and after a file grew past its first 64 KiB. And the writer
keeps none of its files mapped (each mapping was 64 KiB of a worker's USS).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from subscriber import gunicorn
from subscriber._promfiles import sample_key

# argv: own_files (0/1), worker index, app gauge ("", "before", "after"), key length
_WORKER = """
import sys
from subscriber.metrics import SubscriberMetrics
own, index, app, length = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
m = SubscriberMetrics(own_files=own)
m.prepare("app")  # as pre_fork does: the writer's warm-up must leave no trace
if app:
    from prometheus_client import Gauge
    gauge = Gauge("app_live", "an app's own live gauge", ["x"], multiprocess_mode="livemax")
if app == "before":
    gauge.labels("1").set(7)
keys = ["app", 'q"u\\\\o\\u00fc\\u2603']
keys += ["k" * length + str(i) for i in range(index * 20 if length else 0)]
for n, key in enumerate(keys):
    m.record_version(key, 10 + index)
    m.record_applied(key, 11 + index + n, [0.04, 0.3, 7.0, 900.0, 5000.0][(n + index) % 5])
    if n % 2:
        m.record_rejected(key, 2)
    if app == "after" and n == 0:
        gauge.labels("1").set(7)
    m.record_connection_error(key)
m.record_applied("app", 30 + index, 0.5)
m.record_rejected("app")
if app:
    gauge.labels("2").set(8)  # prometheus_client appends again
"""


def _worker(directory: Path, own: bool, index: int, app: str = "", length: int = 0) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    args = [sys.executable, "-c", _WORKER, "1" if own else "0", str(index), app, str(length)]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=60)  # killed on timeout


def _run(directory: Path, own: bool, workers: int, app: str = "", length: int = 0) -> list[int]:
    directory.mkdir()
    pids = []
    for index in range(workers):
        before = set(os.listdir(directory))
        _worker(directory, own, index, app, length)
        (new,) = {name.rsplit("_", 1)[1] for name in set(os.listdir(directory)) - before}
        pids.append(int(new.removesuffix(".db")))
    return pids


class _Merged:
    def __init__(self, files: list[str]) -> None:
        self.files = files

    def collect(self) -> Any:
        return MultiProcessCollector.merge(self.files)  # type: ignore[no-untyped-call]


def _scrape(directory: Path, pids: list[int]) -> bytes:
    """The exposition of the directory's files, in one order for both writers: by worker,
    then by prometheus_client's file name (the writer's counter files are named apart)."""

    def order(path: str) -> tuple[int, str]:
        name = os.path.basename(path).replace("_hotreload", "")
        return pids.index(int(name.rsplit("_", 1)[1].removesuffix(".db"))), name

    registry = CollectorRegistry()
    registry.register(_Merged(sorted(glob.glob(str(directory / "*.db")), key=order)))
    return generate_latest(registry)


def _collect(directory: Path) -> list[str]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return sorted(generate_latest(registry).decode().splitlines())


def test_sample_key_is_mmap_key() -> None:
    for labels in ({"key": "a"}, {"key": 'q"u\\o\u00fc\u2603\n', "le": "+Inf"}, {}):
        for names in (("m", "m_total", 'Help, "quoted" \u00e9'), ("m", "m_bucket", "")):
            metric, sample, help_text = names
            expected = mmap_key(metric, sample, list(labels), list(labels.values()), help_text)
            assert sample_key(metric, sample, labels, help_text) == expected.encode()


def test_scrape_is_the_same_across_workers_and_a_dead_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = _run(tmp_path / "prometheus_client", own=False, workers=3)
    ours = _run(tmp_path / "writer", own=True, workers=3)
    # the writer really wrote its own files, and the worker never built prometheus' values
    assert glob.glob(str(tmp_path / "writer" / "counter_hotreload_*.db"))
    assert not glob.glob(str(tmp_path / "writer" / "counter_[0-9]*.db"))
    before = _scrape(tmp_path / "prometheus_client", theirs)
    assert before == _scrape(tmp_path / "writer", ours)
    assert b"hotreload_subscriber_version_min" in before
    assert _collect(tmp_path / "prometheus_client") == _collect(tmp_path / "writer")
    for directory, pids in ((tmp_path / "prometheus_client", theirs), (tmp_path / "writer", ours)):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        gunicorn.child_exit(None, SimpleNamespace(pid=pids[0]))  # the lowest versions' worker
    after = _scrape(tmp_path / "prometheus_client", theirs[1:] + theirs[:1])
    assert after != before
    assert after == _scrape(tmp_path / "writer", ours[1:] + ours[:1])
    assert 'hotreload_subscriber_version_min{key="app"} 30.0' in before.decode()
    assert 'hotreload_subscriber_version_min{key="app"} 31.0' in after.decode()


def test_a_file_grown_past_its_first_size(tmp_path: Path) -> None:
    theirs = _run(tmp_path / "prometheus_client", own=False, workers=2, length=300)
    ours = _run(tmp_path / "writer", own=True, workers=2, length=300)
    grown = [os.path.getsize(f) for f in glob.glob(str(tmp_path / "writer" / "*.db"))]
    assert max(grown) > 1 << 16
    assert _scrape(tmp_path / "prometheus_client", theirs) == _scrape(tmp_path / "writer", ours)


@pytest.mark.parametrize("app", ["before", "after"])
def test_an_apps_own_live_gauge_in_the_same_file(tmp_path: Path, app: str) -> None:
    """prometheus_client holds gauge_livemax_<pid>.db open for the app's own gauge: the writer
    never appends behind its back, every entry survives."""
    theirs = _run(tmp_path / "prometheus_client", own=False, workers=2, app=app)
    ours = _run(tmp_path / "writer", own=True, workers=2, app=app)
    assert _scrape(tmp_path / "prometheus_client", theirs) == _scrape(tmp_path / "writer", ours)
    for pid in ours:
        path = tmp_path / "writer" / f"gauge_livemax_{pid}.db"
        entries = {
            json.loads(k)[2].get("key") or "app-" + json.loads(k)[2]["x"]: v
            for k, v, _, _ in MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        }
        assert (entries["app-1"], entries["app-2"]) == (7.0, 8.0)
        assert entries["app"] == 30 + ours.index(pid)


def test_the_writer_maps_none_of_its_files(tmp_path: Path) -> None:
    """A worker's written files are not mapped into it: a shared mapping it touches is
    counted whole in its USS (the kernel maps 16 pages around each fault), 64 KiB per file --
    0.25 MiB of a gunicorn worker's 0.36 MiB of metrics (docs/performance.md)."""
    code = (
        "import json\n"
        "from subscriber.metrics import SubscriberMetrics\n"
        "m = SubscriberMetrics()\n"
        "m.record_applied('app', 3, 0.5)\n"
        "m.record_rejected('app')\n"
        "m.record_connection_error('app')\n"
        "print(json.dumps(open('/proc/self/maps').read().splitlines()))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=60
    )
    written = sorted(os.listdir(tmp_path))
    assert [name.rsplit("_", 1)[0] for name in written] == [
        "counter_hotreload", "gauge_livemax", "gauge_livemin", "histogram_hotreload",
    ]  # fmt: skip
    assert [line for line in json.loads(done.stdout) if str(tmp_path) in line] == []
