"""The operator commands against a real redis-server: history, show, diff, status, wait.

Data is written as the real parts write it: versions through the real ``Publisher``
(compare-and-publish), acks and worker states with the wire contract's encoders, exactly as a
subscriber does. ``main`` runs in-process; one test runs ``python -m publisher`` for real.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal

import pytest
import redis

from publisher import inspect
from publisher.cli import main
from publisher.cli.render import status_lines
from publisher.cli.terminal import Terminal
from publisher.inspect.wait import _Awaited
from publisher.publish import Publisher, PublishResult
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, encode_ack, encode_worker_state, now_ms
from subscriber.testing import RedisServer, append_event, free_port
from tests.conftest import Processes

ANSI = re.compile(r"\x1b\[")
POD = "web-7d9f8c6b5-x2x9q"


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis", url])
    out, err = capsys.readouterr()
    return code, out, err


def publish(client: redis.Redis, key: str, *contents: bytes) -> list[PublishResult]:
    publisher = Publisher(client, publisher_id=f"{POD}:7")
    return [publisher.publish(key, content) for content in contents]


def report(
    client: redis.Redis,
    key: str,
    worker: str,
    status: str,
    on: PublishResult | None,
    *,
    error: str = "",
    rejected: PublishResult | None = None,
    age_s: float = 0.0,
    interval: float = 1.0,
) -> None:
    """HSET a worker's state as a subscriber does (``on``: the version it runs)."""
    state = WorkerState(
        worker=worker,
        status=status,  # type: ignore[arg-type]
        version=on.version if on else 0,
        sha256=on.sha256 if on else "",
        error=error,
        rejected_version=rejected.version if rejected else 0,
        heartbeat=now_ms() - int(age_s * 1000),
        heartbeat_interval=interval,
    )
    client.hset(stream_keys(key).workers, worker, encode_worker_state(state))


def ack(
    client: redis.Redis, key: str, worker: str, of: PublishResult, status: str, *, error: str = ""
) -> None:
    """XADD an ack as a subscriber does."""
    fields = encode_ack(
        Ack(worker=worker, version=of.version, sha256=of.sha256, status=status, error=error)  # type: ignore[arg-type]
    )
    client.xadd(stream_keys(key).acks, fields)  # type: ignore[arg-type]


def assert_table(text: str) -> list[str]:
    lines = text.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert not ANSI.search(text), "no colour when stdout is not a terminal"
    return lines


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("hotreload: error: "), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------- history


def test_history_table_is_newest_first_with_distinct_worker_counts(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2, v3 = publish(client, "app.yaml", b"limit: 1\n", b"limit: 2\n", b"limit: -1\n")
    for worker in ("w:1", "w:2", "w:3"):
        ack(client, "app.yaml", worker, v1, "applied")
        ack(client, "app.yaml", worker, v2, "applied")
    ack(client, "app.yaml", "w:1", v2, "applied")  # a repeated ack counts once
    ack(client, "app.yaml", "w:1", v3, "rejected", error="limit must be >= 0")
    ack(client, "app.yaml", "w:2", v3, "rejected", error="limit must be >= 0")

    code, out, err = run(capsys, redis_server.url, "history", "app.yaml")

    assert (code, err) == (0, "")
    header, *rows = assert_table(out)
    assert header.split() == [
        "VERSION", "SHA256", "SIZE", "PUBLISHED", "APPLIED", "REJECTED", "PUBLISHER",
    ]  # fmt: skip
    assert [r.split()[0] for r in rows] == ["3", "2", "1"]
    newest = rows[0].split()
    assert newest[1] == v3.sha256[:12]
    assert newest[2:4] == ["10", "B"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", newest[4])
    assert newest[6:8] == ["0", "2"]
    assert rows[1].split()[6:8] == ["3", "0"]
    # 80 columns leave the publisher little room: its middle goes, the telling tail stays
    assert rows[0].endswith("...2x9q:7")


def test_history_json_and_limit(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    *_, v3 = publish(client, "app.yaml", b"a: 1\n", b"a: 2\n", b"a: 3\n")
    ack(client, "app.yaml", "w:1", v3, "applied")

    code, out, _ = run(capsys, redis_server.url, "history", "app.yaml", "--json", "--limit", "2")

    assert code == 0
    rows = json.loads(out)
    assert [r["version"] for r in rows] == [3, 2]
    assert rows[0]["sha256"] == v3.sha256
    assert rows[0]["size"] == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows[0]["published_at"])
    assert abs(rows[0]["published_at_ms"] - now_ms()) < 60_000
    assert rows[0]["publisher"] == f"{POD}:7"
    assert (rows[0]["applied"], rows[0]["rejected"], rows[0]["malformed"]) == (1, 0, None)


def test_history_shows_malformed_entries_as_rows_with_the_reason(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(client, "app.yaml", b"good: 1\n")
    events = stream_keys("app.yaml").events
    client.xadd(events, {"version": "two", "content": b"x"})
    append_event(redis_server.url, "app.yaml", b"forged\n", version=3, sha256="0" * 64)

    code, out, err = run(capsys, redis_server.url, "history", "app.yaml")

    assert (code, err) == (0, "")
    lines = assert_table(out)
    assert lines[1].split()[:2] == ["3", "malformed"]
    assert lines[2].startswith("  entry ")
    note = " ".join(line.strip() for line in lines[2:4])  # wrapped under its row
    assert "not to its sha256 000000000000...: the entry is corrupt or forged" in note
    assert lines[4].split()[:2] == ["?", "malformed"]
    assert "version" in lines[5]
    # the reason may wrap over more lines (it names the bounds); version 1's row follows it
    assert any(line.split()[:1] == ["1"] for line in lines[6:])

    code, out, _ = run(capsys, redis_server.url, "history", "app.yaml", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["version"] for r in rows] == [3, None, 1]
    assert "corrupt or forged" in rows[0]["malformed"]
    assert rows[2]["malformed"] is None


# ---------------------------------------------------------------------------- show and diff


def test_show_writes_the_raw_bytes_of_a_version(
    client: redis.Redis, redis_server: RedisServer, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    publish(client, "app.yaml", b"limit: 1\n", b"\x00\xffbinary\r\nno newline")
    assert main(["show", "app.yaml", "1", "--redis", redis_server.url]) == 0
    assert capsysbinary.readouterr().out == b"limit: 1\n"
    assert main(["show", "app.yaml", "--redis", redis_server.url]) == 0
    assert capsysbinary.readouterr().out == b"\x00\xffbinary\r\nno newline"


def test_diff_is_unified_and_labelled_and_defaults_to_the_newest(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(client, "app.yaml", b"a: 1\nb: 2\n", b"a: 1\nb: 3\n", b"a: 1\nb: 3\nc: 4")

    code, out, _ = run(capsys, redis_server.url, "diff", "app.yaml", "1")

    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("--- app.yaml@v1\t")
    assert lines[1].startswith("+++ app.yaml@v3\t")
    assert lines[2:] == [
        "@@ -1,2 +1,3 @@", " a: 1", "-b: 2", "+b: 3", "+c: 4", "\\ No newline at end of file",
    ]  # fmt: skip
    code, out, _ = run(capsys, redis_server.url, "diff", "app.yaml", "1", "2")
    assert (code, out.splitlines()[3:]) == (0, [" a: 1", "-b: 2", "+b: 3"])
    assert run(capsys, redis_server.url, "diff", "app.yaml", "2", "2") == (0, "", "")


def test_diff_of_binary_content_says_so_in_one_line(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(client, "blob.bin", b"text\n", b"\xff\xfe\x00")
    code, out, err = run(capsys, redis_server.url, "diff", "blob.bin", "1", "2")
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    assert line.startswith("Binary contents blob.bin@v1 (5 B,")
    assert "blob.bin@v2 (3 B," in line
    assert "not UTF-8" in line


# ---------------------------------------------------------------------------- status


@pytest.fixture
def fleet(client: redis.Redis) -> dict[str, PublishResult]:
    """app.yaml at v3; workers: 2 live on v3, 1 live behind on v2, 1 stale, 1 stopped."""
    v1, v2, v3 = publish(client, "app.yaml", b"a: 1\n", b"a: 2\n", b"a: 3\n")
    report(client, "app.yaml", f"{POD}:101", "applied", v3)
    report(client, "app.yaml", f"{POD}:102", "applied", v3, interval=5.0, age_s=12)
    report(client, "app.yaml", f"{POD}:103", "applied", v2)
    report(client, "app.yaml", f"{POD}:104", "applied", v1, age_s=30)
    report(client, "app.yaml", f"{POD}:105", "stopped", v3, age_s=600)
    return {"v1": v1, "v2": v2, "v3": v3}


def test_status_table_shows_every_worker_and_a_summary(
    fleet: dict[str, PublishResult], redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, redis_server.url, "status", "app.yaml")

    assert (code, err) == (0, "")
    summary, header, *rows, gone = assert_table(out)
    assert summary == (
        f"app.yaml v3 ({fleet['v3'].sha256[:12]}): behind, 2/3 live workers run it; 1 stale, 1 gone"
    )
    assert header.split() == ["WORKER", "VERSION", "SHA256", "STATUS", "HEARTBEAT", "LIVE"]
    assert gone == "  and 1 gone (stopped) workers: --all shows them"  # not a row each
    assert f"{POD}:105" not in out
    _, out, _ = run(capsys, redis_server.url, "status", "app.yaml", "--all")
    _, _, *rows = assert_table(out)
    table = {row.split()[0]: row.split()[1:] for row in rows}
    assert table[f"{POD}:101"][0] == "3"
    assert table[f"{POD}:102"][-1] == "live"  # 12 s old, but it beats every 5 s
    assert table[f"{POD}:102"][-2] == "12s"
    assert table[f"{POD}:103"][:1] + table[f"{POD}:103"][-1:] == ["2", "live"]
    assert table[f"{POD}:104"][-2:] == ["30s", "stale"]
    assert table[f"{POD}:105"][-3:] == ["stopped", "10m00s", "gone"]


def test_status_json(
    fleet: dict[str, PublishResult], redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, redis_server.url, "status", "app.yaml", "--json")

    assert code == 0
    data = json.loads(out)
    workers = {w["worker"]: w for w in data["workers"]}
    assert set(workers) == {f"{POD}:{n}" for n in range(101, 106)}
    first = workers[f"{POD}:101"]
    assert first["key"] == "app.yaml"
    assert (first["version"], first["sha256"], first["status"]) == (
        3,
        fleet["v3"].sha256,
        "applied",
    )
    assert (first["error"], first["live"], first["liveness"]) == ("", True, "live")
    assert 0 <= first["heartbeat_age_s"] < 5
    assert (workers[f"{POD}:104"]["live"], workers[f"{POD}:105"]["liveness"]) == (False, "gone")
    [summary] = data["summary"]
    assert summary["key"] == "app.yaml"
    assert (summary["state"], summary["converged"], summary["newest_version"]) == (
        "behind", False, 3,
    )  # fmt: skip
    assert summary["behind"] == [{"worker": f"{POD}:103", "version": 2, "status": "applied"}]
    assert summary["stale"] == [f"{POD}:104"]
    assert summary["gone"] == [f"{POD}:105"]


def test_status_without_a_key_covers_every_key_under_the_prefix(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    [v1] = publish(client, "app.yaml", b"a: 1\n")
    [flags] = publish(client, "flags.json", b"{}")
    report(client, "app.yaml", "w:1", "applied", v1)
    report(client, "flags.json", "w:1", "rejected", None, error="bad {}", rejected=flags)
    # another prefix is another system: not shown, and a glob character in it is literal
    Publisher(client, prefix="other").publish("hidden.yaml", b"x")
    Publisher(client, prefix="hot*").publish("star.yaml", b"x")

    code, out, _ = run(capsys, redis_server.url, "status")

    assert code == 0
    lines = assert_table(out)
    assert [line.split()[0] for line in lines if not line.startswith(" ") and line] == [
        "app.yaml", "flags.json",
    ]  # fmt: skip
    assert f"app.yaml v1 ({v1.sha256[:12]}): converged, 1/1 live workers run it\n" in out
    assert f"flags.json v1 ({flags.sha256[:12]}): rejected by 1/1 live workers\n" in out
    assert "    v1 error: bad {}" in out
    data = json.loads(run(capsys, redis_server.url, "status", "--json")[1])
    assert [s["key"] for s in data["summary"]] == ["app.yaml", "flags.json"]
    assert {(w["key"], w["worker"]) for w in data["workers"]} == {
        ("app.yaml", "w:1"), ("flags.json", "w:1"),
    }  # fmt: skip
    assert inspect.list_keys(client, "hot*") == ("star.yaml",)


def test_status_keeps_long_ids_and_errors_within_80_columns(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = publish(client, "app.yaml", b"a: 1\n", b"a: [\n")
    worker = "a-very-long-deployment-name-7d9f8c6b5-x2x9q.example-namespace:4242"
    error = "while parsing a flow sequence\n  in line 1\x1b[31m" + " expected ']'" * 20
    report(client, "app.yaml", worker, "rejected", v1, error=error, rejected=v2)

    code, out, _ = run(capsys, redis_server.url, "status", "app.yaml")

    assert code == 0
    lines = assert_table(out)  # also: the escape code in the error was not passed through
    cell = lines[2].split()[0]
    assert cell.startswith("a-very-")
    assert cell.endswith("...le-namespace:4242")  # the tail tells ids apart
    note = lines[3:]
    assert len(note) == 3  # wrapped, at most 3 lines
    # escaped, not acted on (publisher._printable): the newline and the colour code show
    assert note[0].startswith("    v2 error: while parsing a flow sequence\\n  in line 1\\x1b[31m")
    assert all(line.startswith("      ") for line in note[1:])
    assert note[-1].endswith(" ...")


def test_status_of_an_empty_redis_says_so(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, redis_server.url, "status") == (
        0, "no config keys under prefix 'hotreload'\n", "",
    )  # fmt: skip
    code, out, _ = run(capsys, redis_server.url, "status", "--json")
    assert (code, json.loads(out)) == (0, {"workers": [], "summary": []})


def test_unreadable_worker_state_is_a_row_not_a_crash(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    [v1] = publish(client, "app.yaml", b"a: 1\n")
    report(client, "app.yaml", "w:1", "applied", v1)
    client.hset(stream_keys("app.yaml").workers, "junk:9", b"{not json")
    code, out, _ = run(capsys, redis_server.url, "status", "app.yaml")
    assert code == 0
    assert f"app.yaml v1 ({v1.sha256[:12]}): converged, 1/1 live workers run it" in out
    assert re.search(r"junk:9 +- +- +invalid +never +stale", out)
    assert "error: unreadable state" in out


# ---------------------------------------------------------------------------- liveness


def test_liveness_rule() -> None:
    now = 1_000_000

    def state(
        status: Literal["applied", "stopped"] = "applied", age_ms: int = 0, interval: float = 1.0
    ) -> WorkerState:
        return WorkerState(
            worker="w", status=status, heartbeat=now - age_ms, heartbeat_interval=interval
        )

    assert inspect.liveness(state(age_ms=3000), now) == "live"
    assert inspect.liveness(state(age_ms=3001), now) == "stale"
    assert inspect.liveness(state(age_ms=14_000, interval=5), now) == "live"
    assert inspect.liveness(state(age_ms=3000, interval=0.1), now) == "live"  # at least 1 s
    assert inspect.liveness(state(age_ms=3000, interval=0), now) == "live"
    assert inspect.liveness(state("stopped"), now) == "gone"
    assert inspect.liveness(WorkerState(worker="w", status="starting"), now) == "stale"


# ---------------------------------------------------------------------------- wait


def _in_background(delay: float, url: str, action: object) -> threading.Thread:
    def body() -> None:
        time.sleep(delay)
        c = connect(url, socket_timeout=5)
        try:
            action(c)  # type: ignore[operator]
        finally:
            c.close()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_wait_succeeds_when_a_worker_catches_up_mid_wait(
    fleet: dict[str, PublishResult], redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    catch_up = _in_background(
        0.4,
        redis_server.url,
        lambda c: report(c, "app.yaml", f"{POD}:103", "applied", fleet["v3"]),
    )
    started = time.monotonic()

    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "20")

    catch_up.join()
    assert code == 0
    assert 0.4 <= time.monotonic() - started < 3
    first, second = out.splitlines()
    sha = fleet["v3"].sha256[:12]
    done = re.fullmatch(
        rf"app\.yaml v3 \({sha}\): all 3 live workers run it \(after (.+) s\)", first
    )
    assert done is not None, first
    assert 0.3 <= float(done[1]) < 3
    assert second == "  (not counted: 1 stale, 1 gone)"


@pytest.mark.usefixtures("fleet")
def test_wait_exits_1_as_soon_as_a_live_worker_rejects(
    redis_server: RedisServer, client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    [v4] = publish(client, "app.yaml", b"a: [\n")
    report(client, "app.yaml", f"{POD}:101", "applied", v4)
    rejects = _in_background(
        0.3,
        redis_server.url,
        lambda c: report(
            c, "app.yaml", f"{POD}:103", "rejected", None, error="bad yaml", rejected=v4
        ),
    )
    started = time.monotonic()

    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "20")

    rejects.join()
    assert code == 1
    assert time.monotonic() - started < 3
    assert out.splitlines() == [
        f"app.yaml v4 ({v4.sha256[:12]}): rejected by 1 of 3 live workers:",
        f"  {POD}:103: bad yaml",
        "  (not counted: 1 stale, 1 gone)",
    ]


@pytest.mark.usefixtures("fleet")
def test_wait_takes_a_rejecting_ack_as_a_rejection(
    redis_server: RedisServer, client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    [v4] = publish(client, "app.yaml", b"a: 4\n")
    ack(client, "app.yaml", f"{POD}:102", v4, "rejected", error="limit too high")
    ack(client, "app.yaml", f"{POD}:104", v4, "rejected", error="stale workers do not count")
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "5")
    assert code == 1
    assert out.splitlines()[1:] == [
        f"  {POD}:102: limit too high",
        "  (not counted: 1 stale, 1 gone)",
    ]


def test_wait_times_out_with_exit_2_naming_the_workers_behind(
    fleet: dict[str, PublishResult], redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "0.5")
    assert code == 2
    assert 0.5 <= time.monotonic() - started < 2
    assert out.splitlines() == [
        f"app.yaml v3 ({fleet['v3'].sha256[:12]}): timed out after 0.5 s, "
        "2/3 live workers run it; behind:",
        f"  {POD}:103: on v2 (applied)",
        "  (not counted: 1 stale, 1 gone)",
    ]


def test_stale_and_gone_workers_do_not_hold_up_convergence(
    fleet: dict[str, PublishResult],
    client: redis.Redis,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the live laggard catches up; the stale worker (still on v1) and the gone one remain
    report(client, "app.yaml", f"{POD}:103", "applied", fleet["v3"])
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "5")
    assert code == 0
    assert "all 3 live workers run it" in out
    summary = run(capsys, redis_server.url, "status")[1].splitlines()[0]
    assert summary.endswith("): converged, 3/3 live workers run it; 1 stale, 1 gone")


def test_wait_for_an_older_version_and_with_no_live_workers(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = publish(client, "app.yaml", b"a: 1\n", b"a: 2\n")
    report(client, "app.yaml", "w:1", "applied", v1)
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--version", "1")
    assert (code, out.split(":")[0]) == (0, "app.yaml v1 (" + v1.sha256[:12] + ")")

    report(client, "app.yaml", "w:1", "applied", v1, age_s=60)
    started = time.monotonic()
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--timeout", "0.4")
    assert code == 2
    assert time.monotonic() - started >= 0.4  # no live worker: it waited for some to start
    assert out.splitlines() == [
        f"app.yaml v2 ({v2.sha256[:12]}): timed out after 0.4 s with no live workers",
        "  (workers may still be starting: wait again, or see `hotreload status`)",
        "  (not counted: 1 stale, 0 gone)",
    ]


def test_wait_for_a_version_or_content_not_published_yet(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Right after `kubectl apply` the new content is not published yet: wait waits for it
    (by version, or by the applied file's content) within the same timeout."""
    [v1] = publish(client, "app.yaml", b"a: 1\n")
    report(client, "app.yaml", "w:1", "applied", v1)
    applied = tmp_path / "app.yaml"
    applied.write_bytes(b"a: 2\n")

    def publish_and_apply(c: redis.Redis) -> None:
        [v2] = publish(c, "app.yaml", b"a: 2\n")
        report(c, "app.yaml", "w:1", "applied", v2)

    for argv in (["--file", str(applied)], ["--version", "2"]):
        if argv[0] == "--version":
            client.delete(stream_keys("app.yaml").events)
            [v1] = publish(client, "app.yaml", b"a: 1\n")
            report(client, "app.yaml", "w:1", "applied", v1)
        later = _in_background(0.4, redis_server.url, publish_and_apply)
        started = time.monotonic()
        code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", *argv, "--timeout", "20")
        later.join()
        assert code == 0, out
        assert time.monotonic() - started >= 0.4
        assert out.startswith("app.yaml v2 ("), out

    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--version", "9",
                       "--timeout", "0.3")  # fmt: skip
    assert code == 2
    assert out.splitlines()[0] == "app.yaml v9: not published within 0.3 s (newest is v2)"
    sha = "ab" * 32
    code, out, _ = run(capsys, redis_server.url, "wait", "fresh.yaml", "--sha256", sha,
                       "--timeout", "0.3")  # fmt: skip
    assert code == 2  # a new key: its first publish is waited for too
    assert out.splitlines()[0] == (
        f"fresh.yaml content {sha[:12]}: not published within 0.3 s (nothing published yet)"
    )


def test_wait_for_a_content_follows_it_when_it_is_published_again(
    client: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A revert X -> Y -> X: the applied file's content is in the history as v1, but the
    workers run v2; once the revert is published as v3 and applied, wait succeeds on v3."""
    v1, v2 = publish(client, "app.yaml", b"x: 1\n", b"y: 2\n")
    report(client, "app.yaml", "w:1", "applied", v2)

    def revert(c: redis.Redis) -> None:
        [v3] = publish(c, "app.yaml", b"x: 1\n")
        report(c, "app.yaml", "w:1", "applied", v3)

    later = _in_background(0.4, redis_server.url, revert)
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--sha256", v1.sha256,
                       "--timeout", "20")  # fmt: skip
    later.join()
    assert code == 0, out
    assert out.startswith(f"app.yaml v3 ({v1.sha256[:12]}): all 1 live workers run it"), out


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["history", "nope.yaml"], ["unknown key 'nope.yaml'", "published keys: app.yaml"]),
        (["status", "nope.yaml"], ["unknown key 'nope.yaml'"]),
        (["wait", "nope.yaml"], ["unknown key"]),
        (["show", "app.yaml", "7"], ["app.yaml has no version 7", "newest is v2"]),
        (["diff", "app.yaml", "1", "9"], ["no version 9"]),
        (["wait", "app.yaml", "--version", "3"], ["app.yaml v3 is malformed"]),
        (["wait", "app.yaml", "--file", "/nonexistent/app.yaml"], ["--file /nonexistent"]),
        (["show", "app.yaml", "3"], ["app.yaml v3 is malformed"]),
        (["show", "bad/key"], ["invalid config key 'bad/key'"]),
        (["status", "--prefix", "a b"], ["invalid prefix"]),
    ],
)
def test_unknown_keys_and_versions_are_one_line_and_exit_2(
    client: redis.Redis,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragments: list[str],
) -> None:
    publish(client, "app.yaml", b"a: 1\n", b"a: 2\n")
    client.xadd(stream_keys("app.yaml").events, {"version": "3"})
    code, out, err = run(capsys, redis_server.url, *argv)
    assert (code, out) == (2, "")
    assert_one_error_line(err, *fragments)


@pytest.mark.parametrize(
    ("redis_args", "fragment"),
    [
        ([], "no Redis URL"),
        (["--redis", "http://localhost"], "scheme must be one of"),
        (["--redis", "redis://localhost:notaport"], "malformed Redis URL"),
        (["--redis", "unix://"], "needs a socket path"),
    ],
)
def test_malformed_or_missing_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], redis_args: list[str], fragment: str
) -> None:
    assert main(["status", *redis_args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, fragment)


def test_unreachable_redis_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for url in (f"unix://{tmp_path}/absent.sock", f"redis://:s3cret@127.0.0.1:{free_port()}/0"):
        for argv in (["history", "app.yaml"], ["status"], ["wait", "app.yaml"]):
            assert main([*argv, "--redis", url]) == 3
            out, err = capsys.readouterr()
            assert out == ""
            assert_one_error_line(err, "cannot reach Redis at")
            assert "s3cret" not in err


def test_a_frozen_redis_fails_within_the_cli_timeout(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.freeze()
    try:
        started = time.monotonic()
        code = main(["status", "--redis", redis_server.url])
        elapsed = time.monotonic() - started
    finally:
        redis_server.thaw()
    assert code == 3
    assert 1.5 < elapsed < 4
    assert_one_error_line(capsys.readouterr().err, "cannot reach Redis", "Timeout")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["history", "app.yaml", "--limit", "0"], "must be at least 1"),
        (["wait", "app.yaml", "--timeout", "soon"], "not a number of seconds"),
        (["wait", "app.yaml", "--sha256", "abc"], "not a hex SHA-256"),
        (["wait", "app.yaml", "--version", "2", "--file", "x"], "not allowed with argument"),
        (["show", "app.yaml", "v2"], "not a whole number"),
        (["status", "--colour"], "unrecognized arguments: --colour"),
        (["diff", "app.yaml"], "required: V1"),
        (["frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, fragment, "--help")


# ---------------------------------------------------------------------------- output details


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    pipe = Terminal.for_stream(Stream(tty=False))  # type: ignore[arg-type]
    tty = Terminal.for_stream(Stream(tty=True))  # type: ignore[arg-type]
    assert (pipe.colour, pipe.width, tty.colour) == (False, 80, True)
    assert tty.paint("ok", "green") == "\x1b[32mok\x1b[0m"
    assert pipe.paint("ok", "green") == "ok"
    monkeypatch.setenv("NO_COLOR", "1")
    assert not Terminal.for_stream(Stream(tty=True)).colour  # type: ignore[arg-type]


@pytest.mark.usefixtures("fleet")
def test_coloured_tables_stay_aligned(client: redis.Redis) -> None:
    report = inspect.status(client, "app.yaml", prefix="hotreload")
    plain = status_lines(report, Terminal(colour=False), "hotreload")
    coloured = status_lines(report, Terminal(colour=True), "hotreload")
    assert any(ANSI.search(line) for line in coloured)
    assert [re.sub(r"\x1b\[\d+m", "", line) for line in coloured] == plain


def test_python_m_publisher_history_runs_as_a_process(
    client: redis.Redis, redis_server: RedisServer, processes: Processes
) -> None:
    publish(client, "app.yaml", b"a: 1\n", b"a: 2\n")
    proc = processes.python(
        "-m", "publisher", "history", "app.yaml", "--json",
        env={"HOTRELOAD_REDIS_URL": redis_server.url},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, b"")
    assert [row["version"] for row in json.loads(out)] == [2, 1]


def test_wait_for_a_version_published_while_it_looks(
    client: redis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """v2 appears between wait's lookup (missing) and its check of the newest version: that
    is a published version to wait on, not an error."""
    publish(client, "app.yaml", b"a: 1\n")
    newest_version = _Awaited._newest_version

    def published_meanwhile(self: _Awaited) -> int:
        if self.newest == 0:  # the first look only
            [v2] = publish(client, "app.yaml", b"a: 2\n")
            report(client, "app.yaml", "w:1", "applied", v2)
        return newest_version(self)

    monkeypatch.setattr(_Awaited, "_newest_version", published_meanwhile)
    code, out, _ = run(capsys, redis_server.url, "wait", "app.yaml", "--version", "2",
                       "--timeout", "5")  # fmt: skip
    assert code == 0, out
    assert out.startswith("app.yaml v2 ("), out
