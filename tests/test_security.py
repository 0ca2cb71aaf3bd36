"""Security with real processes: signed events, key rotation, sensitive keys, size limits.

The daemon (``python -m publisher watch``) and the workers (``tests/workers/secure_worker.py``,
threaded and asyncio subscribers) run as real processes against a real ``redis-server``;
forged entries are written the way an attacker with write access to the events stream would
(XADD by hand). The TLS tests are in ``tests/test_tls.py``; the ACL users in
``tests/deploy/``.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher._sensitive import filesystem_type, memory_backed
from publisher.cli import main
from publisher.publish import Publisher
from subscriber import Subscriber
from subscriber._core import SubscriberCore
from subscriber._reasons import redact
from subscriber._redis import connect
from subscriber.errors import ConfigurationError, SigningKeyMismatch
from subscriber.keys import stream_keys
from subscriber.protocol import (
    MAX_CONTENT_BYTES,
    SCHEMA_VERSION,
    Ack,
    WorkerState,
    decode_ack,
    decode_worker_state,
    key_id,
    now_ms,
    sha256_hex,
    sign,
    signing_key,
)
from subscriber.testing import RedisServer, append_event
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, race_publishers, start_daemon, wait_until

KEY_A = b"a3f1c0de9b7e4f2a8c6d5e4f3a2b1c0d\n"  # as `openssl rand -hex 16 > key` writes it
KEY_B = b"7e4f2a8c6d5e4f3a2b1c0da3f1c0de9b"
KEY_C = b"c0d5e4f3a2b1c0da3f1c0de9b7e4f2a8"
ID_A, ID_B, ID_C = (key_id(signing_key(k)) for k in (KEY_A, KEY_B, KEY_C))
MARKER = "s3cr3t-MARKER-91f7c2"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)
    monkeypatch.delenv("HOTRELOAD_SIGNING_KEY_FILE", raising=False)


# ---------------------------------------------------------------------------- processes


class Worker:
    def __init__(self, process: subprocess.Popen[bytes], out: Path) -> None:
        self.process = process
        self.out = out

    @property
    def id_suffix(self) -> str:
        return f":{self.process.pid}"

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def record(self, event: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r["event"] == event), None)

    def ready(self) -> dict[str, Any]:
        """The ``started`` or ``failed`` record, once there is one."""
        return wait_until(lambda: self.record("started") or self.record("failed"), timeout=15)

    def files_text(self) -> str:
        log = Path(str(self.out) + ".log")
        return self.out.read_text() + (log.read_text() if log.exists() else "")


def start_worker(
    processes: Processes,
    tmp_path: Path,
    url: str,
    key: str,
    name: str,
    *,
    keys: tuple[Path, ...] = (),
    aio: bool = False,
    echo: bool = False,
    start_timeout: float = 5.0,
) -> Worker:
    out = tmp_path / f"{name}.jsonl"
    argv = ["-m", "tests.workers.secure_worker", "--url", url, "--key", key, "--out", str(out)]
    argv += ["--start-timeout", str(start_timeout)]
    for path in keys:
        argv += ["--signing-key-file", str(path)]
    if aio:
        argv.append("--aio")
    if echo:
        argv.append("--echo")
    return Worker(processes.python(*argv), out)


def key_file(directory: Path, name: str, key: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(key)
    return path


def acks_of(client: redis.Redis, key: str, worker: Worker) -> list[Ack]:
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys(key).acks))
    decoded = [decode_ack(fields) for _, fields in raw]
    return [a for a in decoded if a.worker.endswith(worker.id_suffix)]


def rejection(client: redis.Redis, key: str, worker: Worker, entry_id: str) -> str:
    """The reason ``worker`` reported for rejecting ``entry_id``, once it has."""

    def find() -> str:
        for ack in acks_of(client, key, worker):
            if ack.entry_id == entry_id and ack.status == "rejected":
                return ack.error
        return ""

    return wait_until(find, timeout=10)


def applied(client: redis.Redis, key: str, worker: Worker, version: int) -> Ack:
    def find() -> Ack | None:
        return next(
            (
                a
                for a in acks_of(client, key, worker)
                if a.version == version and a.status == "applied"
            ),
            None,
        )

    return wait_until(find, timeout=10)


def worker_state(client: redis.Redis, key: str, worker: Worker) -> WorkerState:
    states = cast(dict[bytes, bytes], client.hgetall(stream_keys(key).workers))
    [raw] = [v for k, v in states.items() if k.decode().endswith(worker.id_suffix)]
    return decode_worker_state(raw)


def xadd_event(
    client: redis.Redis, key: str, content: bytes, version: int, **extra: str | int
) -> str:
    """XADD an entry by hand, as someone with write access to the events stream could."""
    fields: dict[str, str | int | bytes] = {
        "schema": SCHEMA_VERSION,
        "key": key,
        "version": version,
        "sha256": sha256_hex(content),
        "content": content,
        "published_at": now_ms(),
        "publisher": "attacker:1",
    }
    fields.update(extra)
    entry_id = cast(bytes, client.xadd(stream_keys(key).events, fields))  # type: ignore[arg-type]
    return entry_id.decode()


# ---------------------------------------------------------------------------- signing


def test_forged_unsigned_and_wrong_key_entries_are_rejected_and_reported(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    secret = KubeletMount(tmp_path / "signing")  # the key is a mounted Secret too
    secret.write({"key": KEY_A})
    # a file whose name would break the key scheme is not published; the others are
    kubelet_mount.write({"app.yaml": b"rev: 1\n", "bad}{name.yaml": b"x: 1\n"})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory,
        "--signing-key-file", secret.path("key"),
    )  # fmt: skip
    [first] = wait_until(lambda: events(client, "app.yaml"))
    assert first.kid == ID_A
    assert first.sig == sign(signing_key(KEY_A), "app.yaml", 1, first.sha256, first.published_at)
    assert "not published: invalid config key 'bad}{name.yaml'" in daemon.output()
    assert f"signing events with key id {ID_A}" in daemon.output()

    key_path = key_file(tmp_path / "worker-keys", "key", KEY_A)
    threaded = start_worker(
        processes, tmp_path, redis_server.url, "app.yaml", "t", keys=(key_path,)
    )
    asyncio_ = start_worker(
        processes, tmp_path, redis_server.url, "app.yaml", "a", keys=(key_path,), aio=True
    )
    for worker in (threaded, asyncio_):
        assert worker.ready()["event"] == "started"
        assert worker.record("started")["version"] == 1  # type: ignore[index]

    unsigned = append_event(redis_server.url, "app.yaml", b"rev: unsigned\n", version=2)
    wrong_key = xadd_event(
        client, "app.yaml", b"rev: wrong key\n", 3, kid=ID_B,
        sig=sign(signing_key(KEY_B), "app.yaml", 3, sha256_hex(b"rev: wrong key\n"), 5),
        published_at=5,
    )  # fmt: skip
    forged = xadd_event(client, "app.yaml", b"rev: forged\n", 4, kid=ID_A, sig="0" * 64)
    # a genuine signature copied onto another identity (a replayed sig, new content)
    replayed = xadd_event(
        client, "app.yaml", b"rev: replayed\n", 5, kid=ID_A, sig=first.sig,
        published_at=first.published_at,
    )  # fmt: skip

    for worker in (threaded, asyncio_):
        assert "not signed" in rejection(client, "app.yaml", worker, unsigned)
        reason = rejection(client, "app.yaml", worker, wrong_key)
        assert f"signed with key id '{ID_B}'" in reason
        assert ID_A in reason
        assert "does not verify" in rejection(client, "app.yaml", worker, forged)
        assert "does not verify" in rejection(client, "app.yaml", worker, replayed)
        assert not [r for r in worker.records() if r["event"] == "applied" and r["size"] != 7]
        state = worker_state(client, "app.yaml", worker)
        assert (state.version, state.status) == (1, "rejected")

    kubelet_mount.set("app.yaml", b"rev: 2\n")  # the real next update still goes through
    newest = wait_until(lambda: [e for e in events(client, "app.yaml") if e.content == b"rev: 2\n"])
    assert newest[0].version == 6
    assert newest[0].kid == ID_A
    for worker in (threaded, asyncio_):
        applied(client, "app.yaml", worker, 6)
    assert daemon.stop() == 0


def test_key_rotation_and_a_subscriber_without_the_key_cannot_start(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    secret = KubeletMount(tmp_path / "signing")
    secret.write({"key": KEY_A})
    kubelet_mount.write({"app.yaml": b"rev: 1\n"})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory,
        env={"HOTRELOAD_SIGNING_KEY_FILE": str(secret.path("key"))},
    )  # fmt: skip
    wait_until(lambda: events(client, "app.yaml"))
    keys = tmp_path / "worker-keys"
    path_a, path_b, path_c = (
        key_file(keys, n, k) for n, k in zip("abc", (KEY_A, KEY_B, KEY_C), strict=False)
    )
    old = start_worker(processes, tmp_path, redis_server.url, "app.yaml", "old", keys=(path_a,))
    both = start_worker(
        processes, tmp_path, redis_server.url, "app.yaml", "both", keys=(path_a, path_b), aio=True
    )
    assert old.ready()["version"] == 1
    assert both.ready()["version"] == 1

    secret.write({"key": KEY_B})  # kubelet swaps the Secret: the daemon re-reads the key
    second = wait_until(lambda: events(client, "app.yaml")[1:])[0]
    assert (second.version, second.kid, second.content) == (2, ID_B, b"rev: 1\n")
    assert f"signing key changed (key id {ID_A} -> {ID_B})" in daemon.output()
    assert applied(client, "app.yaml", both, 2).unchanged  # same content: no callback
    assert f"signed with key id '{ID_B}'" in rejection(client, "app.yaml", old, second.id)

    new = start_worker(processes, tmp_path, redis_server.url, "app.yaml", "new", keys=(path_b,))
    assert new.ready()["version"] == 2
    wrong = start_worker(processes, tmp_path, redis_server.url, "app.yaml", "wrong", keys=(path_c,))
    failed = wrong.ready()
    assert failed["event"] == "failed"
    assert failed["type"] == "SigningKeyMismatch"
    assert f"key id {ID_C}" in failed["error"]
    assert "--signing-key-file" in failed["error"]
    assert "cannot start" in failed["error"]
    assert wrong.process.wait(10) == 3

    secret.write({"key": b"too short\n"})  # a broken key file keeps the current key
    wait_until(lambda: "shorter than 16" in daemon.output())
    kubelet_mount.set("app.yaml", b"rev: 2\n")
    third = wait_until(lambda: events(client, "app.yaml")[2:])[0]
    assert (third.version, third.kid) == (3, ID_B)
    applied(client, "app.yaml", both, 3)
    applied(client, "app.yaml", new, 3)
    rejection(client, "app.yaml", old, third.id)
    assert daemon.stop() == 0


def test_bad_signing_key_files_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yaml").write_text("a: 1\n")
    short = key_file(tmp_path / "keys", "short", b"  abc\n")
    cases = [
        (["--signing-key-file", str(tmp_path / "missing")], "cannot read"),
        (["--signing-key-file", str(short)], "shorter than 16"),
        (["--signing-key-file", str(config / "app.yaml")], "inside the watched"),
    ]
    for extra, message in cases:
        assert main(["watch", str(config), "--redis", "unix:///nonexistent.sock", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("hotreload: error: ")
        assert message in err[0]


def test_signed_racing_publishers_still_write_one_entry_per_content(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """4 signing publishers race as 4 pods would: exactly one entry per content, all valid."""
    contents = [f"rev: {i}\n".encode() for i in range(60)]
    race_publishers(redis_server.url, contents, signing_key=KEY_A)
    published = events(client, "app.yaml")
    assert [e.content for e in published] == contents
    assert [e.version for e in published] == list(range(1, 61))
    key = signing_key(KEY_A)
    assert all(e.sig == sign(key, e.key, e.version, e.sha256, e.published_at) for e in published)


def test_signed_and_sensitive_dedupe_rules(client: redis.Redis) -> None:
    unsigned = Publisher(client)
    signed = Publisher(client, signing_key=KEY_A)
    assert unsigned.publish("app.yaml", b"a").version == 1
    # the same content, now signed (or marked sensitive): published again, so that
    # subscribers that require signatures can start
    assert (signed.publish("app.yaml", b"a").version, signed.publish("app.yaml", b"a").written) == (
        2,
        False,
    )
    assert signed.publish("app.yaml", b"a", sensitive=True).version == 3
    # unsigned and not sensitive behaves as it always did: the hash alone decides
    assert not unsigned.publish("app.yaml", b"a").written
    # a forged copy of the content, with our key id, must not hold the real entry back
    xadd_event(client, "app.yaml", b"b", 4, kid=ID_A, sig="f" * 64)
    result = signed.publish("app.yaml", b"b")
    assert (result.written, result.version) == (True, 5)
    assert [e.kid for e in events(client, "app.yaml")] == ["", ID_A, ID_A, ID_A, ID_A]
    assert [e.sensitive for e in events(client, "app.yaml")] == [False, False, True, False, False]


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    key = signing_key(KEY_A)
    core = SubscriberCore(
        "app.yaml", lambda _: None, decode=True, logger=logging.getLogger("t"),
        signing_keys=[key],
    )  # fmt: skip
    walk = core.walk(limit=10)
    content = b"a: 1\n"
    sig = sign(key, "app.yaml", 1, sha256_hex(content), 7)
    fields = {
        b"schema": b"1", b"key": b"app.yaml", b"version": b"1", b"content": content,
        b"sha256": sha256_hex(content).encode(), b"published_at": b"7", b"publisher": b"p:1",
        b"sig": sig.encode(), b"kid": ID_A.encode(),
    }  # fmt: skip
    walk.step("1-0", fields)
    walk.finish()
    assert core.state.running is not None
    assert core.state.running.version == 1
    assert calls == [(sig.encode(), sig.encode())]


def test_signing_keys_are_checked_when_the_subscriber_is_created() -> None:
    for bad, message in [
        (b"short", "shorter than 16"),
        ([], "empty list"),
        ([KEY_A, 5], "must be bytes"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Subscriber("a.yaml", print, redis_url="unix:///x.sock", signing_key=bad)  # type: ignore[arg-type]
    # whitespace around a key does not count, on either side
    Subscriber("a.yaml", print, redis_url="unix:///x.sock", signing_key=[KEY_A, KEY_A.strip()])


def test_a_subscriber_in_process_names_the_missing_key(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, socket_timeout=5)
    try:
        Publisher(client, signing_key=KEY_A).publish("app.yaml", b"a: 1\n")
    finally:
        client.close()
    with pytest.raises(SigningKeyMismatch, match=f"key id {ID_B}.*Newest entry.*{ID_A}"):
        Subscriber("app.yaml", print, redis_url=redis_server.url, signing_key=KEY_B).start()
    seen: list[str] = []
    with Subscriber(
        "app.yaml", seen.append, redis_url=redis_server.url, signing_key=[KEY_B, KEY_A]
    ):
        assert seen == ["a: 1\n"]


# ---------------------------------------------------------------------------- limits


def test_oversized_entries_are_refused_by_subscribers_and_other_keys_keep_flowing(
    redis_server: RedisServer, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    publisher = Publisher(client)
    publisher.publish("big.txt", b"small\n")
    publisher.publish("other.yaml", b"o: 0\n")
    big = start_worker(processes, tmp_path, redis_server.url, "big.txt", "big")
    other = start_worker(processes, tmp_path, redis_server.url, "other.yaml", "other", aio=True)
    assert big.ready()["version"] == 1
    assert other.ready()["version"] == 1
    # written by hand: the publisher would refuse it (tests/test_daemon.py shows that)
    huge = xadd_event(client, "big.txt", b"x" * (MAX_CONTENT_BYTES + 1), 2)
    reason = rejection(client, "big.txt", big, huge)
    assert f"over the {MAX_CONTENT_BYTES} limit" in reason
    publisher.publish("other.yaml", b"o: 1\n")
    applied(client, "other.yaml", other, 2)
    limit = b"y" * MAX_CONTENT_BYTES  # exactly the limit is fine
    assert publisher.publish("big.txt", limit).version == 3
    assert applied(client, "big.txt", big, 3).status == "applied"


# ---------------------------------------------------------------------------- sensitive


@pytest.fixture
def secret_mount() -> Iterator[KubeletMount]:
    """A kubelet-style mount on a tmpfs, as a Secret volume is (/dev/shm here)."""
    if filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    directory = Path(tempfile.mkdtemp(prefix="hotreload-secret-", dir="/dev/shm"))
    try:
        yield KubeletMount(directory / "mount")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_sensitive_content_never_reaches_a_log_an_ack_or_the_cli_without_reveal(  # noqa: PLR0917
    kubelet_mount: KubeletMount, secret_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, processes: Processes, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    secret = f"password: {MARKER}\n".encode()
    secret_mount.write({"db.conf": secret})
    kubelet_mount.write({"app.yaml": b"plain: 1\n", "token.txt": f"{MARKER}-token\n".encode()})
    keys = KubeletMount(tmp_path / "signing")
    keys.write({"key": KEY_A})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, secret_mount.directory,
        "--sensitive", "token.txt", "--signing-key-file", keys.path("key"),
    )  # fmt: skip
    wait_until(lambda: all(events(client, k) for k in ("db.conf", "token.txt", "app.yaml")))
    assert [e.sensitive for e in events(client, "db.conf")] == [True]  # inferred: tmpfs
    assert [e.sensitive for e in events(client, "token.txt")] == [True]  # --sensitive
    assert [e.sensitive for e in events(client, "app.yaml")] == [False]
    assert f"{secret_mount.directory} is on tmpfs" in daemon.output()

    key_path = key_file(tmp_path / "worker-keys", "key", KEY_A)
    url, signed = redis_server.url, (key_path,)
    workers = [
        start_worker(processes, tmp_path, url, "db.conf", "db-t", keys=signed, echo=True),
        start_worker(processes, tmp_path, url, "db.conf", "db-a", keys=signed, echo=True, aio=True),
        start_worker(processes, tmp_path, url, "token.txt", "tok", keys=signed),
    ]
    for worker in workers:
        assert worker.ready()["event"] == "started"
    # an update the app refuses, with a validator that quotes the content in its error
    secret_mount.write({"db.conf": f"password: {MARKER} REJECT\n".encode()})
    second = wait_until(lambda: events(client, "db.conf")[1:])[0]
    for worker in workers[:2]:
        reason = rejection(client, "db.conf", worker, second.id)
        assert reason.startswith("ValueError: refusing content marked")
        assert "[redacted]" in reason
    secret_mount.write({"db.conf": f"password: {MARKER}-2\n".encode()})
    for worker in workers[:2]:
        applied(client, "db.conf", worker, 3)

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main([*argv, "--redis", redis_server.url])
        out, err = capsys.readouterr()
        return code, out, err

    for argv in (["show", "db.conf"], ["show", "token.txt", "1"], ["diff", "db.conf", "1", "3"]):
        code, out, err = cli(*argv)
        assert (code, out) == (2, ""), argv
        [line] = err.strip().splitlines()
        assert line.startswith("hotreload: error: ")
        assert "--reveal" in line
    code, out, err = cli("show", "db.conf", "1", "--reveal")
    assert (code, out, err) == (0, secret.decode(), "")
    code, out, _ = cli("diff", "db.conf", "1", "3", "--reveal")
    assert code == 0
    assert MARKER in out
    assert cli("show", "app.yaml")[:2] == (0, "plain: 1\n")
    code, history_out, _ = cli("history", "db.conf")
    assert code == 0
    assert "sensitive: `hotreload show` and `diff` need --reveal" in history_out
    assert f"key id: v1-3 {ID_A}" in history_out
    code, history_json, _ = cli("history", "db.conf", "--json")
    assert [row["sensitive"] for row in json.loads(history_json)] == [True, True, True]
    outputs = [history_out, history_json]
    for argv in (["status"], ["wait", "db.conf", "--timeout", "5"]):
        code, out, err = cli(*argv)
        outputs += [out, err]

    assert daemon.stop() == 0
    for worker in workers:
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(10) == 0
    everything = [daemon.output(), *(w.files_text() for w in workers), *outputs]
    for stream in ("acks", "workers"):
        for key in ("db.conf", "token.txt"):
            name = getattr(stream_keys(key), stream)
            kind = client.type(name)
            dump = client.xrange(name) if kind == b"stream" else client.hgetall(name)
            everything.append(repr(dump))
    lines = [line for text in everything for line in text.splitlines()]
    assert len(lines) > 100  # DEBUG logs of the daemon and three workers, acks, CLI output
    assert [line for line in lines if MARKER in line] == []


def test_memory_backed_mounts_are_recognised_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        # a ConfigMap volume: a bind mount of a directory on the node's disk
        "30 22 253:1 /var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/config "
        "/etc/config ro,relatime - ext4 /dev/vda1 rw\n"
        # a Secret volume: kubelet's tmpfs; its path has an escaped space
        "31 22 0:50 / /etc/secret\\040dir ro,relatime - tmpfs tmpfs rw,size=1024k\n"
        # stacked on the same mount point: the last one is the visible one
        "32 22 0:51 / /etc/stacked rw - tmpfs tmpfs rw\n"
        "33 32 253:1 /x /etc/stacked rw - ext4 /dev/vda1 rw\n"
    )
    info = str(mountinfo)
    assert memory_backed("/etc/config", info) is None
    assert filesystem_type("/etc/config", info) == "ext4"
    assert memory_backed("/etc/secret dir", info) == "tmpfs"
    assert memory_backed("/etc/secret dir/..data/key", info) == "tmpfs"
    assert memory_backed("/etc/secretdir", info) is None  # a prefix of the name is not inside
    assert memory_backed("/etc/stacked", info) is None
    assert filesystem_type("/anything", str(tmp_path / "missing")) is None


def test_redaction_keeps_the_reason_and_drops_what_the_content_says() -> None:
    content = f"user: admin\npassword: {MARKER}\n".encode()
    error = f"ScannerError: mapping values are not allowed here: 'password: {MARKER}' line 2"
    redacted = redact(error, content)
    assert MARKER not in redacted
    assert redacted.startswith("ScannerError: mapping values are not allowed here")
    assert redacted.endswith("line 2")
    assert redact("ValueError: bad", content) == "ValueError: bad"
