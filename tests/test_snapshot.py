"""Whole-ConfigMap snapshots (issue 12): one atomic, typed key -> value map per kubelet swap.

With the kubelet writer, the real daemon (``hotreload watch DIR --snapshot NAME``) and real
worker processes: a storm of multi-key updates reaches every worker only as whole snapshots;
keys appear and disappear; an empty ConfigMap is a snapshot; typed decoding names the key it
rejects; the CLI reads snapshots; per-key and snapshot subscriptions of one mount coexist.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import redis

from publisher.cli import main
from publisher.publish import Publisher
from subscriber import NoAcceptableConfig, Subscriber, TypedConfig, typed_snapshot
from subscriber.keys import stream_keys
from subscriber.protocol import (
    SNAPSHOT_MAGIC,
    decode_ack,
    decode_snapshot,
    encode_snapshot,
    is_snapshot,
)
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, start_daemon, wait_until

KEYS = [f"K{n}" for n in range(6)]


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)


def records(path: Path, event: str = "applied") -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["event"] == event]


def snapshot_worker(
    processes: Processes, url: str, key: str, out: Path, *extra: str
) -> None:  # fmt: skip
    processes.python(
        "-m", "tests.workers.snapshot_worker", "--url", url, "--key", key, "--out", str(out),
        *extra,
    )  # fmt: skip


def acks(client: redis.Redis, key: str) -> list[Any]:
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys(key).acks))
    return [decode_ack(fields) for _, fields in raw]


# ---------------------------------------------------------------------------- wire contract


def test_encoding_is_deterministic_self_describing_and_never_text() -> None:
    a = encode_snapshot({"B": b"2", "A": b"\xff\x00"})
    assert a == encode_snapshot({"A": b"\xff\x00", "B": b"2"})  # equal maps hash equally
    assert a.startswith(SNAPSHOT_MAGIC)
    assert is_snapshot(a)
    assert decode_snapshot(a) == {"A": b"\xff\x00", "B": b"2"}
    assert decode_snapshot(encode_snapshot({})) == {}  # an empty ConfigMap is a snapshot
    with pytest.raises(UnicodeDecodeError):
        SNAPSHOT_MAGIC.decode("utf-8")  # no UTF-8 text config can be taken for a snapshot
    with pytest.raises(ValueError, match="not a snapshot"):
        decode_snapshot(b"LOG_LEVEL=debug\n")
    with pytest.raises(ValueError, match="malformed snapshot"):
        decode_snapshot(SNAPSHOT_MAGIC + b"\xc1")


def test_per_key_and_snapshot_subscribers_each_reject_the_other_kind_clearly(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    publisher = Publisher(client)
    publisher.publish("env", encode_snapshot({"A": b"1"}))
    publisher.publish("app.yaml", b"a: 1\n")
    plain = Subscriber("env", lambda text: None, redis_url=redis_server.url, start_timeout=2)
    with pytest.raises(NoAcceptableConfig, match=r"is a snapshot .* subscribe to it with snapshot"):
        plain.start()
    whole = Subscriber(
        "app.yaml", lambda m: None, redis_url=redis_server.url, start_timeout=2, snapshot=True
    )
    with pytest.raises(NoAcceptableConfig, match=r"not a snapshot .* without snapshot=True"):
        whole.start()
    assert "is a snapshot" in acks(client, "env")[-1].error
    # a value that is not UTF-8 is rejected by name; decode=False hands over bytes
    publisher.publish("env", encode_snapshot({"A": b"1", "BLOB": b"\xff"}))
    texts: list[dict[str, str]] = []
    text = Subscriber("env", texts.append, redis_url=redis_server.url, snapshot=True)
    text.start()  # walks back to v1
    assert (text.version, texts) == (1, [{"A": "1"}])
    assert "snapshot key 'BLOB' is not valid UTF-8" in acks(client, "env")[-2].error
    text.stop()
    got: list[dict[str, bytes]] = []
    raw = Subscriber("env", got.append, redis_url=redis_server.url, snapshot=True, decode=False)
    raw.start()
    assert (raw.version, got) == (2, [{"A": b"1", "BLOB": b"\xff"}])
    raw.stop()


def test_signed_and_sensitive_snapshots_verify_like_any_key(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    publisher = Publisher(client, signing_key=secret)
    publisher.publish("env", encode_snapshot({"TOKEN": b"hunter2"}), sensitive=True)
    got: list[dict[str, str]] = []
    sub = Subscriber("env", got.append, redis_url=redis_server.url, snapshot=True,
                     signing_key=secret)  # fmt: skip
    sub.start()
    assert got == [{"TOKEN": "hunter2"}]
    assert events(client, "env")[-1].sensitive
    sub.stop()


def test_the_fallback_of_a_snapshot_subscriber_can_be_the_mount_directory(
    kubelet_mount: KubeletMount, tmp_path: Path
) -> None:
    kubelet_mount.write({"A": b"1", "B": b"two"})
    got: list[dict[str, str]] = []
    url = f"unix://{tmp_path}/nothing.sock"
    sub = Subscriber("env", got.append, redis_url=url, snapshot=True, start_timeout=0.2,
                     fallback_path=kubelet_mount.directory)  # fmt: skip
    sub.start()
    assert (sub.status, got) == ("fallback", [{"A": "1", "B": "two"}])
    sub.stop()


# ---------------------------------------------------------------------------- daemon + workers


def revision_map(revision: int) -> dict[str, str]:
    """What update ``revision`` of the storm holds: every key set to the revision, and one
    rotating key (``X0``..``X3``) that appears with it and disappears with the next."""
    return {key: str(revision) for key in [*KEYS, f"X{revision % 4}"]}


def assert_whole(files: dict[str, str]) -> int:
    """``files`` is exactly one update of the storm (never a mix); returns its revision."""
    revisions = set(files.values())
    assert len(revisions) == 1, files  # two revisions in one map: half of an update
    revision = int(revisions.pop())
    assert files == revision_map(revision), files  # and exactly its keys, none left over
    return revision


def test_a_storm_of_multi_key_updates_reaches_every_worker_only_as_whole_snapshots(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    """Every update sets every key to the same revision (and swaps one key for another): a
    map with two revisions in it, or the wrong key set, would be half of an update. Per-key
    publishing of the same mount, and a per-key subscriber of it, go on alongside."""
    updates = 300

    def write(revision: int) -> None:
        kubelet_mount.write({k: v.encode() for k, v in revision_map(revision).items()})

    write(0)
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, "--snapshot", "env"
    )
    wait_until(lambda: events(client, "env") and events(client, "K0"))
    outs = [tmp_path / f"w{n}.jsonl" for n in range(4)]
    for n, out in enumerate(outs):  # two threaded, two asyncio workers
        snapshot_worker(processes, redis_server.url, "env", out, *(["--async"] if n % 2 else []))
    per_key = tmp_path / "per-key.jsonl"
    processes.python(
        "-m", "tests.workers.subscriber_worker", "--url", redis_server.url, "--key", "K3",
        "--out", str(per_key),
    )  # fmt: skip
    wait_until(lambda: all(records(o, "started") for o in [*outs, per_key]))

    rng = random.Random(12)
    began = time.monotonic()
    for revision in range(1, updates + 1):
        write(revision)
        # mostly back to back (coalesced by the daemon), sometimes a pause long enough for
        # the swap to be published and fanned out on its own
        time.sleep(rng.choice([0, 0, 0, 0.001, 0.005, 0.02, 0.15]))
    storm_s = time.monotonic() - began
    last = revision_map(updates)
    wait_until(
        lambda: all(records(o) and records(o)[-1]["files"] == last for o in outs),
        "every snapshot worker applies the last update",
        timeout=20,
    )
    wait_until(lambda: records(per_key) and records(per_key)[-1]["text"] == str(updates))

    published = [decode_snapshot(e.content) for e in events(client, "env")]
    for raw in published:  # every entry in the stream is one whole update
        assert_whole({k: v.decode() for k, v in raw.items()})
    for out in outs:
        revisions = [assert_whole(r["files"]) for r in records(out)]
        assert revisions == sorted(revisions)  # never back to an older update
        assert revisions[-1] == updates
    print(
        f"\n{updates} kubelet updates in {storm_s:.1f} s -> {len(published)} snapshot events; "
        f"whole maps applied per worker: {[len(records(o)) for o in outs]}"
    )
    assert len(published) > 20  # the storm was not coalesced into a handful of events
    assert daemon.stop() == 0
    assert "as snapshot env" in daemon.output()


def test_keys_appear_and_disappear_and_an_empty_configmap_is_a_snapshot(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({})  # starts empty: snapshot v1 is {}
    daemon = start_daemon(
        processes, tmp_path, redis_server.url,
        "--snapshot", f"env={kubelet_mount.directory}",  # a snapshot only, no per-key PATH
    )  # fmt: skip
    wait_until(lambda: events(client, "env"))
    out = tmp_path / "w.jsonl"
    snapshot_worker(processes, redis_server.url, "env", out)
    wait_until(lambda: records(out, "started"))
    steps: list[dict[str, bytes]] = [
        {"A": b"1", "B": b"2"},
        {"A": b"1", "C": b"3"},  # B removed, C added, in one swap
        {},
        {"A": b"4"},
    ]
    for step in steps:
        kubelet_mount.write(step)
        want = {k: v.decode() for k, v in step.items()}
        wait_until(lambda want=want: records(out)[-1]["files"] == want)  # type: ignore[misc]
    assert [r["files"] for r in records(out)] == [
        {}, {"A": "1", "B": "2"}, {"A": "1", "C": "3"}, {}, {"A": "4"},
    ]  # fmt: skip
    assert [e.version for e in events(client, "env")] == [1, 2, 3, 4, 5]
    assert not client.exists(stream_keys("A").events)  # not published per key
    assert daemon.stop() == 0


def test_named_files_per_key_plus_a_snapshot_and_the_size_limit_on_the_encoded_map(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    """One PATH file of a directory published per key, the whole directory as a snapshot
    (``--snapshot NAME=DIR``); a map whose encoding is over the limit is refused, logged."""
    kubelet_mount.write({"A": b"1", "B": b"2"})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.path("A"),
        "--snapshot", f"env={kubelet_mount.directory}",
    )  # fmt: skip
    wait_until(lambda: events(client, "env") and events(client, "A"))
    assert decode_snapshot(events(client, "env")[-1].content) == {"A": b"1", "B": b"2"}
    assert not client.exists(stream_keys("B").events)  # not a PATH: only in the snapshot
    big = b"x" * (600 * 1024)  # each file fits; the two together do not
    kubelet_mount.write({"A": b"3", "B": big, "C": big})
    wait_until(lambda: events(client, "A")[-1].content == b"3")
    wait_until(lambda: "env: content is" in daemon.output())
    assert "over the 1048064-byte limit" in daemon.output()
    assert len(events(client, "env")) == 1  # the previous snapshot stays the newest
    kubelet_mount.write({"A": b"4", "C": b"5"})
    wait_until(lambda: len(events(client, "env")) == 2)
    assert decode_snapshot(events(client, "env")[-1].content) == {"A": b"4", "C": b"5"}
    assert daemon.stop() == 0


class Settings(msgspec.Struct, rename="upper"):
    timeout_s: int
    debug: bool = False


def test_typed_snapshot_converts_strings_and_rejects_naming_the_key(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"TIMEOUT_S": b"30", "DEBUG": b"true", "UNRELATED": b"x"})
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, "--snapshot", f"env={kubelet_mount.directory}"
    )
    wait_until(lambda: events(client, "env"))
    sub, settings = typed_snapshot("env", Settings, redis_url=redis_server.url, block_ms=200)
    sub.start()
    assert settings.value == Settings(timeout_s=30, debug=True)

    kubelet_mount.write({"TIMEOUT_S": b"soon", "DEBUG": b"true"})
    wait_until(lambda: acks(client, "env")[-1].status == "rejected")
    assert "Expected `int`, got `str` - at `$.TIMEOUT_S`" in acks(client, "env")[-1].error
    kubelet_mount.write({"DEBUG": b"false"})
    wait_until(lambda: acks(client, "env")[-1].version == 3)
    assert "missing required field `TIMEOUT_S`" in acks(client, "env")[-1].error
    assert (sub.version, settings.value.timeout_s, sub.status) == (1, 30, "rejected")

    kubelet_mount.write({"TIMEOUT_S": b"45"})
    wait_until(lambda: sub.version == 4)
    assert (settings.value, sub.status) == (Settings(timeout_s=45), "applied")
    sub.stop()
    # the holder on its own, given the encoded content or a map
    holder = TypedConfig(Settings, "snapshot")
    holder.apply(encode_snapshot({"TIMEOUT_S": b"7"}))
    assert holder.value.timeout_s == 7
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------- CLI


def test_history_show_diff_status_wait_of_a_snapshot_key(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url
    publisher = Publisher(client)
    v1 = encode_snapshot({"LOG_LEVEL": b"info", "policy.txt": b"allow a\nallow b\n"})
    v2 = encode_snapshot(
        {"LOG_LEVEL": b"debug", "policy.txt": b"allow a\nallow c\n", "BLOB": b"\xff\x00"}
    )
    publisher.publish("env", v1)
    publisher.publish("env", v2)

    assert main(["history", "env", "--redis", url]) == 0
    history = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in history[1:3]] == ["2", "1"]
    assert history[3].startswith("snapshot of a whole ConfigMap (3 keys in the newest)")
    assert main(["history", "env", "--json", "--redis", url]) == 0
    assert [r["snapshot_keys"] for r in json.loads(capsys.readouterr().out)] == [3, 2]

    assert main(["show", "env", "1", "--redis", url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "LOG_LEVEL=info", "policy.txt:", "    allow a", "    allow b",
    ]  # fmt: skip
    assert main(["show", "env", "--redis", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("BLOB: <binary, 2 B, ")
    assert out[1:] == ["LOG_LEVEL=debug", "policy.txt:", "    allow a", "    allow c"]

    assert main(["diff", "env", "1", "--redis", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split("\t")[0] for line in lines]
    assert labels == [
        "Binary value of BLOB added",
        "--- env@v1:LOG_LEVEL", "+++ env@v2:LOG_LEVEL", "@@ -1 +1 @@", "-info", "+debug",
        "--- env@v1:policy.txt", "+++ env@v2:policy.txt", "@@ -1,2 +1,2 @@",
        " allow a", "-allow b", "+allow c",
    ]  # fmt: skip

    # status and wait follow a snapshot subscriber like any other
    got: list[dict[str, str]] = []
    sub = Subscriber("env", got.append, redis_url=url, snapshot=True, decode=False,
                     heartbeat_interval=0.5, block_ms=200)  # fmt: skip
    sub.start()
    assert main(["wait", "env", "--timeout", "5", "--redis", url]) == 0
    assert main(["status", "env", "--redis", url]) == 0
    assert "v2" in capsys.readouterr().out
    sub.stop()

    # sensitive: show and diff still refuse without --reveal
    publisher.publish("secret-env", encode_snapshot({"TOKEN": b"hunter2"}), sensitive=True)
    assert main(["show", "secret-env", "--redis", url]) == 2
    assert "hunter2" not in capsys.readouterr().out
    assert main(["show", "secret-env", "--reveal", "--redis", url]) == 0
    assert capsys.readouterr().out == "TOKEN=hunter2\n"


def test_show_raw_writes_the_encoded_snapshot(
    client: redis.Redis, redis_server: RedisServer, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    content = encode_snapshot({"A": b"1"})
    Publisher(client).publish("env", content)
    assert main(["show", "env", "--raw", "--redis", redis_server.url]) == 0
    assert capsysbinary.readouterr().out == content


def test_watch_refuses_snapshot_setups_that_cannot_work(
    kubelet_mount: KubeletMount, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubelet_mount.write({"A": b"1"})
    other = tmp_path / "other"
    other.mkdir()
    url = f"unix://{tmp_path}/none.sock"
    base = ["watch", "--redis", url, "--metrics-port", "0"]
    assert main([*base, str(kubelet_mount.directory), str(other), "--snapshot", "env"]) == 2
    assert "there are 2 directory PATHs" in capsys.readouterr().err
    assert main([*base, str(kubelet_mount.directory), "--snapshot", "A"]) == 2
    assert "snapshot name 'A' is also a key" in capsys.readouterr().err
    assert main([*base, "--snapshot", f"env={tmp_path}/missing"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_readme_style_lock_free_reads_never_see_a_mixed_map(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    """In process: a reader thread hammering the holder sees only whole updates."""
    publisher = Publisher(client)
    publisher.publish("env", encode_snapshot({"A": b"0", "B": b"0"}))
    holder: TypedConfig[dict[str, int]] = TypedConfig(dict[str, int], "snapshot")
    sub = Subscriber("env", holder.apply, redis_url=redis_server.url, snapshot=True,
                     block_ms=100)  # fmt: skip
    sub.start()
    mixed: list[dict[str, int]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            value = holder.value
            if value["A"] != value["B"]:
                mixed.append(value)

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(1, 60):
        publisher.publish("env", encode_snapshot({"A": str(n).encode(), "B": str(n).encode()}))
    wait_until(lambda: holder.value == {"A": 59, "B": 59})
    done.set()
    reader.join()
    sub.stop()
    assert mixed == []
