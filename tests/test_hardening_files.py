"""Hostile and unlucky mount contents (issue 23, items 5, 7, 8, 12, 13), with the real daemon.

What a directory may hold that the watcher must not take at face value: a symlink leading out
of it (to ``/proc/self/environ``, to the signing key), a fake ``..data`` pointing elsewhere, a
file of a gigabyte or one that keeps growing, a key that cannot be read, a name that is not
UTF-8. Each is skipped or refused with one clear line, never a traceback, never at the cost of
the other keys, and an operator can see it (``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import redis

from publisher._mount import read_file
from subscriber.keys import stream_keys
from subscriber.protocol import MAX_CONTENT_BYTES, decode_snapshot
from subscriber.testing import RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import cpu_seconds, events, start_daemon, wait_until
from tests.test_endpoints import get, metrics_containing


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plain"
    directory.mkdir()
    return directory


def lines_with(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(word in line for word in words)]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---------------------------------------------------------------------------------- item 7
def test_symlinks_leading_out_of_a_plain_directory_are_never_published(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    processes: Processes,
) -> None:  # fmt: skip
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "signing.key").write_bytes(b"k" * 32)
    (plain_dir / "app.yaml").write_bytes(b"a: 1\n")
    (plain_dir / "sub").mkdir()
    (plain_dir / "sub" / "real.yaml").write_bytes(b"r: 1\n")
    (plain_dir / "alias.yaml").symlink_to("app.yaml")  # inside: published
    (plain_dir / "deep.yaml").symlink_to("sub/real.yaml")  # inside (a subdirectory): published
    (plain_dir / "environ").symlink_to("/proc/self/environ")
    (plain_dir / "key").symlink_to(secret / "signing.key")
    (plain_dir / "up").symlink_to("../secret/signing.key")
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, plain_dir,
        "--signing-key-file", secret / "signing.key",
    )  # fmt: skip
    wait_until(lambda: "initial publish done" in daemon.output())
    assert events(client, "app.yaml")[-1].content == b"a: 1\n"
    assert events(client, "alias.yaml")[-1].content == b"a: 1\n"
    assert events(client, "deep.yaml")[-1].content == b"r: 1\n"
    for name in ("environ", "key", "up"):
        assert not client.exists(stream_keys(name).events), name
        warned = lines_with(daemon.output(), "WARNING", f" {name} ", "outside")
        assert len(warned) == 1, (name, daemon.output())
    # Later scans (a change elsewhere, a new escaping link) warn about the new one only.
    (plain_dir / "app.yaml").write_bytes(b"a: 2\n")
    (plain_dir / "passwd").symlink_to("/etc/passwd")
    wait_until(lambda: len(events(client, "app.yaml")) == 2)
    wait_until(lambda: lines_with(daemon.output(), "WARNING", " passwd ", "outside"))
    time.sleep(0.5)
    assert len(lines_with(daemon.output(), "WARNING", " environ ", "outside")) == 1
    assert not client.exists(stream_keys("passwd").events)
    assert "Traceback" not in daemon.output()
    assert daemon.stop() == 0


def test_a_fake_data_link_does_not_lead_out_of_a_plain_directory(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    processes: Processes,
) -> None:  # fmt: skip
    """``..data -> /proc/self`` would make the directory a "kubelet volume" whose keys are
    read from /proc/self: a ``..data`` target must be a name inside the directory."""
    (plain_dir / "..data").symlink_to("/proc/self")
    (plain_dir / "ok.yaml").write_bytes(b"ok\n")
    (plain_dir / "environ").symlink_to("..data/environ")
    daemon = start_daemon(processes, tmp_path, redis_server.url, plain_dir)
    wait_until(lambda: "initial publish done" in daemon.output())
    assert events(client, "ok.yaml")[-1].content == b"ok\n"
    assert not client.exists(stream_keys("environ").events)
    assert not client.exists(stream_keys("cmdline").events)
    assert daemon.stop() == 0


def test_a_kubelet_volume_still_publishes_through_its_links(
    kubelet_mount: KubeletMount, tmp_path: Path, redis_server: RedisServer,
    client: redis.Redis, processes: Processes,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"v1"})
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    wait_until(lambda: events(client, "app.yaml"))
    kubelet_mount.set("app.yaml", b"v2")
    wait_until(lambda: len(events(client, "app.yaml")) == 2)
    assert "outside" not in daemon.output()
    assert daemon.stop() == 0


def test_a_signing_key_under_a_watched_directory_is_refused_at_start(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    """A symlink inside the directory can reach anything below it: the key must live elsewhere."""
    (plain_dir / "nested").mkdir()
    (plain_dir / "nested" / "signing.key").write_bytes(b"k" * 32)
    (plain_dir / "app.yaml").write_bytes(b"a: 1\n")
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, plain_dir,
        "--signing-key-file", plain_dir / "nested" / "signing.key",
    )  # fmt: skip
    assert daemon.process.wait(20) == 2
    assert "mount the key Secret elsewhere" in daemon.output()


def test_a_named_file_leading_out_of_its_directory_is_refused_at_start(
    plain_dir: Path, tmp_path: Path
) -> None:
    from publisher.daemon import Daemon
    from subscriber.errors import ConfigurationError

    (tmp_path / "elsewhere.yaml").write_bytes(b"e: 1\n")
    (plain_dir / "app.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(ConfigurationError, match=r"leading out of its directory .*name the file"):
        Daemon([plain_dir / "app.yaml"], redis_url="redis://unused")
    Daemon([tmp_path / "elsewhere.yaml"], redis_url="redis://unused")  # the file itself is fine


# ---------------------------------------------------------------------------------- item 8
def test_read_file_never_reads_more_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with path.open("wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB, sparse
    started = time.monotonic()
    with pytest.raises(OSError, match=f"{1 << 30} bytes, over the {MAX_CONTENT_BYTES}-byte"):
        read_file(str(path))
    assert time.monotonic() - started < 0.5
    path.write_bytes(b"x" * MAX_CONTENT_BYTES)
    assert len(read_file(str(path))[0]) == MAX_CONTENT_BYTES


def test_a_huge_file_is_refused_without_being_read(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    processes: Processes,
) -> None:  # fmt: skip
    (plain_dir / "ok.yaml").write_bytes(b"ok\n")
    with (plain_dir / "huge.bin").open("wb") as fh:
        fh.truncate(1 << 30)
    daemon = start_daemon(processes, tmp_path, redis_server.url, plain_dir)
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=30)
    refused = lines_with(daemon.output(), "huge.bin", "over the")
    assert len(refused) == 1, daemon.output()
    assert str(1 << 30) in refused[0]
    assert peak_rss_mib(daemon.pid) < 150, peak_rss_mib(daemon.pid)
    assert events(client, "ok.yaml")
    assert not client.exists(stream_keys("huge.bin").events)
    # item 13: a key never published is not looked for in Redis every second
    time.sleep(2.5)
    assert "events stream missing" not in daemon.output()
    assert len(lines_with(daemon.output(), "huge.bin", "over the")) == 1
    assert daemon.stop() == 0


def test_a_growing_file_over_the_limit_is_not_read_on_every_close(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    log = plain_dir / "growing.log"
    with log.open("wb") as fh:
        fh.truncate(64 << 20)
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, plain_dir, metrics_port=port, log_level="INFO"
    )
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=30)
    before = cpu_seconds(daemon.pid)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # appended and closed 50 times a second
        with log.open("ab") as fh:
            fh.write(b"line\n")
        time.sleep(0.02)
    time.sleep(0.5)
    used = cpu_seconds(daemon.pid) - before
    assert used < 0.6, f"{used:.2f} s of CPU for 2 s of appends"
    # said and counted once, not once per append
    assert len(lines_with(daemon.output(), "growing.log", "over the")) == 1
    _status, body = get(port, "/metrics")
    counted = 'hotreload_publish_errors_total{key="growing.log",reason="too_large"} 1.0'
    assert counted in body, body
    assert get(port, "/readyz")[1].startswith("growing.log cannot be read (")
    assert daemon.stop() == 0


# --------------------------------------------------------------------------------- item 12
def test_an_unreadable_key_is_logged_counted_and_keeps_the_daemon_not_ready(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    processes: Processes,
) -> None:  # fmt: skip
    (plain_dir / "ok.yaml").write_bytes(b"ok\n")
    (plain_dir / ".loop").symlink_to(".loop")  # ELOOP, even for root (a dot name: no key)
    (plain_dir / "app.yaml").symlink_to(".loop")
    port = free_port()
    daemon = start_daemon(processes, tmp_path, redis_server.url, plain_dir, metrics_port=port)
    wait_until(lambda: events(client, "ok.yaml"))
    wait_until(lambda: get(port, "/readyz")[0] == 503 and "app.yaml" in get(port, "/readyz")[1])
    _status, reason = get(port, "/readyz")
    assert "cannot be read" in reason, reason
    assert "never published" in reason, reason
    body = wait_until(metrics_containing(port, 'reason="unreadable"'))
    assert re.search(
        r'hotreload_publish_errors_total\{key="app.yaml",reason="unreadable"\} 1', body
    )
    warned = lines_with(daemon.output(), "WARNING", "app.yaml", "symbolic links")
    assert len(warned) == 1, daemon.output()
    (plain_dir / "ok.yaml").write_bytes(b"ok 2\n")  # another scan: not logged again
    wait_until(lambda: len(events(client, "ok.yaml")) == 2)
    assert len(lines_with(daemon.output(), "WARNING", "app.yaml", "symbolic links")) == 1
    os.unlink(plain_dir / "app.yaml")
    (plain_dir / "app.yaml").write_bytes(b"a: 1\n")
    wait_until(lambda: events(client, "app.yaml"))
    wait_until(lambda: get(port, "/readyz") == (200, "ok\n"))
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file: no EACCES to test")
def test_a_key_without_read_permission_is_reported(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    (plain_dir / "app.yaml").write_bytes(b"a: 1\n")
    os.chmod(plain_dir / "app.yaml", 0)
    daemon = start_daemon(processes, tmp_path, redis_server.url, plain_dir)
    wait_until(lambda: lines_with(daemon.output(), "WARNING", "app.yaml", "Permission denied"))
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------------- item 5
def test_a_name_that_is_not_utf8_is_skipped_with_one_warning(
    plain_dir: Path, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    processes: Processes,
) -> None:  # fmt: skip
    (plain_dir / "A").write_bytes(b"1")
    bad = os.path.join(os.fsencode(plain_dir), b"caf\xe9")
    with open(bad, "wb") as fh:
        fh.write(b"x")
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, plain_dir, "--snapshot", f"env={plain_dir}"
    )
    wait_until(lambda: events(client, "env") and events(client, "A"), timeout=20)
    assert decode_snapshot(events(client, "env")[-1].content) == {"A": b"1"}
    assert len(lines_with(daemon.output(), "WARNING", "caf\\xe9", "not UTF-8")) == 1
    # appearing later: skipped too, and the other keys keep flowing
    with open(os.path.join(os.fsencode(plain_dir), b"\xff\x1b[2J"), "wb") as fh:
        fh.write(b"y")
    (plain_dir / "A").write_bytes(b"2")
    wait_until(lambda: len(events(client, "env")) == 2)
    wait_until(lambda: len(events(client, "A")) == 2)
    assert decode_snapshot(events(client, "env")[-1].content) == {"A": b"2"}
    wait_until(lambda: lines_with(daemon.output(), "WARNING", "\\xff\\x1b[2J", "not UTF-8"))
    output = daemon.output()
    assert "Traceback" not in output
    assert "\x1b" not in output
    assert len(lines_with(output, "WARNING", "caf\\xe9", "not UTF-8")) == 1
    assert daemon.stop() == 0
