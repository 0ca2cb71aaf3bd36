"""What a full Redis or a hostile Redis writer does to the publisher and the CLI (issue 23,
items 1, 3, 4, 14, 15), with real processes.

- item 1: a junk ``version`` appended by anyone who can XADD never blocks nor corrupts the
  next publish, signed or not;
- item 3: Redis at ``maxmemory`` (noeviction): the newest content always fits, history
  gives way first; when Redis refuses writes all the same, ``/readyz`` and ``status`` say so;
- item 4: reader-side bounds: 440k acks or a 50 MiB ``:workers`` value cost the daemon's status
  pass and the CLI neither the memory nor the time they cost before (oversized replies:
  tests/test_reply_cap.py);
- item 14: what a Redis writer or a file name puts on an operator's terminal or in a log is
  scrubbed by one rule (``publisher._printable``);
- item 15: gone workers collapse into a count, a huge error is cut, one broken key does not
  take ``status`` of the others with it.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
import redis

from publisher.publish import Publisher
from subscriber.keys import stream_keys
from subscriber.protocol import Event, decode_event
from subscriber.testing import RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, start_daemon, wait_until
from tests.test_endpoints import get

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)


def cli(url: str, *args: str, timeout: float = 60) -> tuple[int, str, str, float]:
    """``hotreload ARGS --redis URL`` in its own process: exit code, stdout, stderr, seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "publisher", *args, "--redis", url],
        capture_output=True,
        check=False,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )
    elapsed = time.monotonic() - started
    return done.returncode, done.stdout.decode(), done.stderr.decode(), elapsed


def blob(seed: int, size: int = 500 * 1024) -> bytes:
    """``size`` bytes of incompressible text, different for each ``seed``."""
    return (os.urandom(size // 2).hex()[: size - 12] + f"\n# {seed:08d}\n").encode()


# ---------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("junk", [str(2**63), "100000000000000000", "1e17", "-5"])
def test_one_junk_version_neither_blocks_nor_corrupts_the_next_publish(
    client: redis.Redis, signed: bool, junk: str
) -> None:
    publisher = Publisher(client, signing_key=b"k" * 32 if signed else None)
    first = publisher.publish("app.yaml", b"a: 1\n")
    fields = {"schema": "1", "key": "app.yaml", "version": junk, "sha256": "0" * 64,
              "content": b"x", "published_at": "1", "publisher": "evil:1"}  # fmt: skip
    client.xadd(stream_keys("app.yaml").events, fields)  # type: ignore[arg-type]
    fresh = Publisher(client, signing_key=b"k" * 32 if signed else None)  # remembers nothing

    second = fresh.publish("app.yaml", b"a: 2\n")
    third = publisher.publish("app.yaml", b"a: 3\n")

    assert (second.written, second.version) == (True, first.version + 1)
    assert (third.written, third.version) == (True, first.version + 2)
    newest = events_after_junk(client)
    assert [e.version for e in newest] == [first.version + 1, first.version + 2]
    assert all(bool(e.sig) == signed for e in newest)


def events_after_junk(client: redis.Redis) -> list[Event]:
    raw = cast(
        list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys("app.yaml").events)
    )
    return [decode_event(i, f) for i, f in raw[2:]]


def test_a_junk_entry_at_the_highest_version_is_refused_by_name_never_numbered_past(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    """2^53 - 1 is a valid version: the next one, 2^53, would be read as malformed by
    everyone. The daemon refuses, names the entry and what to do, counts it, and publishes
    once the entry is gone."""
    kubelet_mount.write({"app.yaml": b"a: 1\n"})
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, metrics_port=port,
        log_level="INFO",
    )  # fmt: skip
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=20)
    events_key = stream_keys("app.yaml").events
    fields = {"schema": "1", "key": "app.yaml", "version": str(2**53 - 1), "sha256": "0" * 64,
              "content": b"x", "published_at": "1", "publisher": "evil:1"}  # fmt: skip
    junk = cast(bytes, client.xadd(events_key, fields)).decode()  # type: ignore[arg-type]
    kubelet_mount.update(**{"app.yaml": b"a: 2\n"})

    wait_until(lambda: f"XDEL {events_key} {junk}" in daemon.output(), timeout=20)
    assert f"entry {junk} of {events_key} is numbered {2**53 - 1}" in daemon.output()
    counted = 'hotreload_publish_errors_total{key="app.yaml",reason="redis"}'
    wait_until(lambda: counted in get(port, "/metrics")[1])
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(events_key))
    assert [f[b"version"] for _, f in raw] == [b"1", str(2**53 - 1).encode()]

    client.xdel(events_key, junk)  # what the error says to do
    wait_until(lambda: events(client, "app.yaml")[-1].content == b"a: 2\n", timeout=30)
    assert events(client, "app.yaml")[-1].version == 2


# ---------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_the_newest_content_always_fits_history_gives_way(
    client: redis.Redis, signed: bool
) -> None:
    client.config_set("maxmemory", "8mb")
    client.config_set("maxmemory-policy", "noeviction")
    publisher = Publisher(client, signing_key=b"k" * 32 if signed else None)
    publisher.publish("small.yaml", b"s: 0\n")
    for seed in range(40):  # 20 MB of 500 KiB versions through an 8 MB Redis
        content = blob(seed)
        result = publisher.publish("big.yaml", content)
        assert result.written, seed
        assert events(client, "big.yaml")[-1].content == content
    small = publisher.publish("small.yaml", b"s: 1\n")  # a 5-byte change still goes through
    assert small.written
    assert events(client, "small.yaml")[-1].content == b"s: 1\n"
    assert len(events(client, "big.yaml")) < 16  # the history gave way
    assert int(client.info("memory")["used_memory"]) < 10 * MiB


def test_other_keys_histories_give_way_oldest_first(client: redis.Redis) -> None:
    publisher = Publisher(client)
    for seed in range(6):
        publisher.publish("old.yaml", blob(seed))
    for seed in range(6):
        publisher.publish("recent.yaml", blob(100 + seed))
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 200 * 1024))

    result = publisher.publish("new.yaml", blob(200))  # new.yaml has no history to give

    assert result.written
    assert len(events(client, "old.yaml")) == 1  # the oldest history gave way first
    assert events(client, "old.yaml")[-1].content.endswith(b"# 00000005\n")
    assert len(events(client, "recent.yaml")) == 6


def test_a_full_redis_keeps_publishing_two_large_keys_and_a_snapshot(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    client.config_set("maxmemory", "12mb")
    client.config_set("maxmemory-policy", "noeviction")
    kubelet_mount.write({"a.txt": blob(0), "b.txt": blob(1), "tiny": b"t0"})
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory,
        "--snapshot", f"all={kubelet_mount.directory}", metrics_port=port, log_level="INFO",
    )  # fmt: skip
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=20)
    for seed in range(2, 26):  # ~36 MB written through a 12 MB Redis
        content = blob(seed)
        kubelet_mount.update(**{"a.txt" if seed % 2 else "b.txt": content})
        key = "a.txt" if seed % 2 else "b.txt"
        wait_until(lambda: events(client, key)[-1].content == content, timeout=20)  # noqa: B023
    kubelet_mount.update(tiny=b"t1")
    wait_until(lambda: events(client, "tiny")[-1].content == b"t1", timeout=20)
    output = daemon.output()
    assert "ERROR" not in output, output[-3000:]
    assert "made room" in output  # said, at INFO
    assert get(port, "/readyz") == (200, "ok\n")


def test_when_redis_refuses_writes_readyz_and_status_say_so(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"a: 1\n"})
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, metrics_port=port,
        log_level="INFO",
    )  # fmt: skip
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=20)
    wait_until(lambda: get(port, "/readyz")[0] == 200)
    # memory taken by something that is not hotreload's: no history can give way
    client.set("someone-else", b"x" * (4 * MiB))
    client.config_set("maxmemory", "1mb")  # far below what is used: nothing more fits
    kubelet_mount.update(**{"app.yaml": b"a: 2\n"})

    wait_until(lambda: get(port, "/readyz")[0] == 503, timeout=20)
    _, body = get(port, "/readyz")
    assert body.startswith("Redis refuses writes: OOM"), body
    rc, out, _, _ = cli(redis_server.url, "status")
    assert rc == 0
    assert "Redis refuses writes: OOM" in out.splitlines()[0], out
    rc, out, _, _ = cli(redis_server.url, "status", "--json")
    assert json.loads(out)["redis_refuses_writes"].startswith("OOM")

    # a publisher restarted now names memory too
    daemon.stop()
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, metrics_port=port,
        name="restarted",
    )  # fmt: skip
    wait_until(lambda: get(port, "/readyz")[1].startswith("Redis refuses writes: OOM"))

    client.config_set("maxmemory", "0")  # room again: published, ready
    wait_until(lambda: events(client, "app.yaml")[-1].content == b"a: 2\n", timeout=20)
    wait_until(lambda: get(port, "/readyz") == (200, "ok\n"))
    rc, out, _, _ = cli(redis_server.url, "status")
    assert "refuses" not in out


# ---------------------------------------------------------------------------------- item 4
# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so it would count pytest's own RSS
MEASURE = """
import sys
from publisher.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as fh:
    peak = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
sys.stderr.write(f"MAXRSS_KIB {peak}\\n")
sys.exit(code)
"""


def measured(url: str, *args: str) -> tuple[int, str, float, float]:
    """``hotreload ARGS``: exit code, stdout, seconds, peak RSS in MiB."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args, "--redis", url],
        capture_output=True,
        check=False,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    peak = int(done.stderr.decode().rsplit("MAXRSS_KIB ", 1)[1].split()[0]) / 1024
    return done.returncode, done.stdout.decode(), elapsed, peak


# one XADD per ack, run by Redis itself (the same entries as from a client, in a second
# instead of ten: redis-py packs each command in Python)
FLOOD = """
for _ = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2)) end
"""


def flood_acks(client: redis.Redis, key: str, count: int) -> None:
    """``count`` acks XADDed without MAXLEN, as the ``subscriber`` user may."""
    acks = stream_keys(key).acks
    ack = {"worker": "w:1", "entry_id": "1-0", "version": "1", "sha256": "0" * 64,
           "status": "rejected", "error": "e" * 200, "at": "1", "published_at": "1"}  # fmt: skip
    fields = [part for pair in ack.items() for part in pair]
    for start in range(0, count, 20_000):  # Redis answers others between the batches
        client.eval(FLOOD, 1, acks, min(20_000, count - start), *fields)
    assert client.xlen(acks) == count


def test_a_flood_of_acks_or_a_huge_worker_state_costs_readers_little(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"a: 1\n"})
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, metrics_port=port,
        log_level="INFO",
    )  # fmt: skip
    wait_until(lambda: "initial publish done" in daemon.output(), timeout=20)
    flood_acks(client, "app.yaml", 440_000)
    client.hset(stream_keys("app.yaml").workers, "w:1", b'{"status":"applied","version":1}')

    for command in (("status",), ("history", "app.yaml"), ("wait", "app.yaml", "--timeout", "1")):
        code, out, seconds, peak = measured(redis_server.url, *command)
        print(f"440k acks: {command[0]}: {seconds:.1f} s, peak RSS {peak:.0f} MiB")
        assert code in (0, 2), out
        assert seconds < 8, (command, seconds)
        assert peak < 100, (command, peak)
    time.sleep(12)  # a status pass of the daemon's ack follower (every 10 s)
    print(f"440k acks: daemon peak RSS {daemon_peak_mib(daemon.pid):.0f} MiB")
    assert daemon_peak_mib(daemon.pid) < 100

    # one 50 MiB value: skipped (an invalid row); Redis still sends it whole in its HSCAN page,
    # but the reply cap drops it as it arrives (the daemon's side: tests/test_reply_cap.py)
    client.hset(stream_keys("app.yaml").workers, "huge:1", b"x" * (50 * MiB))
    code, out, seconds, peak = measured(redis_server.url, "status")
    print(f"50 MiB :workers value: status {seconds:.1f} s, peak RSS {peak:.0f} MiB")
    assert "unreadable state: over 16384 bytes" in out
    assert peak < 100  # 186 MiB before the reply cap


def daemon_peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


# --------------------------------------------------------------------------------- item 14
def test_what_redis_writers_send_reaches_no_terminal_raw(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    publisher = Publisher(client)
    [v1] = [publisher.publish("app.yaml", b"a: 1\n")]
    state = {"status": "applied\x1b[2J", "version": v1.version, "sha256": "\x1b[2J\x1b[H" * 4,
             "heartbeat": int(time.time() * 1000), "heartbeat_interval": 5.0}  # fmt: skip
    client.hset(stream_keys("app.yaml").workers, "w\x1b]0;owned\x07:1", json.dumps(state))
    from subscriber.protocol import encode_snapshot

    publisher.publish("snap", encode_snapshot({"k\x1b[31m": b"v\x1b[2Jx", "ok": b"fine"}))

    for command in (("status",), ("show", "snap")):
        out = on_a_terminal(redis_server.url, *command)
        assert "\x1b" not in out, (command, out)
        assert "\x07" not in out, (command, out)
    assert "\\x1b[2J" in on_a_terminal(redis_server.url, "status")
    assert "ok=fine" in on_a_terminal(redis_server.url, "show", "snap")
    # a pipe gets the values as they are (only the key names are scrubbed)
    assert "k\\x1b[31m=v\x1b[2Jx" in cli(redis_server.url, "show", "snap")[1]


def on_a_terminal(url: str, *args: str) -> str:
    """What ``hotreload ARGS`` writes to a terminal (a pty as its stdout)."""
    main, tty = pty.openpty()
    env = {**os.environ, "NO_COLOR": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "publisher", *args, "--redis", url], stdout=tty, env=env
    ) as process:
        try:
            os.close(tty)
            chunks = []
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:  # stopped by its PID even when the test fails
                process.kill()
    os.close(main)
    return b"".join(chunks).decode().replace("\r\n", "\n")


# --------------------------------------------------------------------------------- item 15
def test_gone_workers_are_a_count_and_huge_errors_are_cut(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    publisher = Publisher(client)
    v1 = publisher.publish("app.yaml", b"a: 1\n")
    v2 = publisher.publish("app.yaml", b"a: [\n")
    now = int(time.time() * 1000)
    workers = stream_keys("app.yaml").workers
    pipe = client.pipeline(transaction=False)
    for n in range(1000):
        gone = {"status": "stopped", "version": 1, "heartbeat": now, "heartbeat_interval": 5.0}
        pipe.hset(workers, f"old:{n}", json.dumps(gone))
    pipe.execute()
    live = {"status": "applied", "version": v1.version, "sha256": v1.sha256,
            "heartbeat": now, "heartbeat_interval": 5.0}  # fmt: skip
    client.hset(workers, "w:1", json.dumps(live))
    ack = {"worker": "w:1", "entry_id": v2.entry_id, "version": str(v2.version),
           "sha256": v2.sha256, "status": "rejected", "error": "E" * (20 * MiB),
           "at": str(now), "published_at": str(now)}  # fmt: skip
    client.xadd(stream_keys("app.yaml").acks, ack)  # type: ignore[arg-type]

    code, out, _, _ = cli(redis_server.url, "status")
    assert code == 0
    assert len(out.splitlines()) < 12, out[:2000]
    assert "1000 gone (stopped) workers: --all shows them" in out
    code, out, _, _ = cli(redis_server.url, "status", "--all")
    assert len(out.splitlines()) > 1000

    code, out, _, _ = cli(redis_server.url, "wait", "app.yaml", "--timeout", "5")
    assert code == 1
    assert len(out) < 4000, len(out)
    # never read: the reply cap dropped it as it arrived (before it: read whole, then cut)
    assert f"w:1: <{20 * MiB} bytes, over the 1064448-byte reply cap: not read>" in out


def test_one_unreadable_key_is_named_and_the_others_reported(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", b"a: 1\n")
    publisher.publish("broken.yaml", b"b: 1\n")
    client.set(stream_keys("broken.yaml").acks, b"not a stream")

    code, out, err, _ = cli(redis_server.url, "status")

    assert code == 3
    assert err.startswith("hotreload: error: broken.yaml cannot be read: WRONGTYPE"), err
    assert "app.yaml v1" in out, out
