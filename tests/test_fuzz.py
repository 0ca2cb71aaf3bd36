"""Property tests (hypothesis): whatever arrives, nothing crashes and nothing unverified runs.

- arbitrary stream entries through the wire contract (``decode_event``): an ``Event`` whose
  hash is true, or a ``MalformedEntry`` with a reason -- never another exception;
- the same entries through the subscriber's decision core (``SubscriberCore.walk``): no
  crash, the callback only ever sees verified content of its own key, and a fresh walk runs
  exactly the newest entry that decodes and that the callback accepts;
- arbitrary file contents and sizes through the daemon (``Daemon`` in this process, a real
  redis-server, kubelet swaps): published iff size <= the limit, with a true hash;
- arbitrary arguments through ``hotreload``'s ``main(argv)``: an exit code or argparse's
  ``SystemExit``, one line of error, never a traceback.

Example counts are modest so the file runs in well under a minute; they are printed and
written to bench-results/reliability.json.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher import cli
from publisher.daemon import Daemon
from subscriber._core import SubscriberCore
from subscriber._redis import connect
from subscriber._state import Cursor
from subscriber.defaults import HISTORY_READ_CAP, REPLAY_TOLERANCE_MS
from subscriber.errors import MalformedEntry
from subscriber.keys import stream_keys
from subscriber.protocol import (
    AUDIENCE_SCHEMA,
    MAX_CONTENT_BYTES,
    SCHEMA_VERSION,
    Event,
    decode_event,
    encode_audience,
    sha256_hex,
)
from subscriber.testing import RedisServer, append_event
from tests.conftest import KubeletMount
from tests.fault.results import record
from tests.helpers import events, wait_until

KEY = "app.yaml"
LOG = logging.getLogger("tests.fuzz")
COUNTS: dict[str, int] = {}

FIELD_NAMES = ("schema", "key", "version", "sha256", "content", "published_at", "publisher")
# absent from a plain entry; fuzzed when added
OPTIONAL_FIELDS = ("sig", "kid", "sensitive", "audience", "rollout", "rollout_of")
# one over the limit; built once (hypothesis shrinks poorly through megabytes)
HUGE = b"h" * (MAX_CONTENT_BYTES + 1)


def counted(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    if COUNTS:
        record("fuzz", "examples", dict(COUNTS))


# -- entries ---------------------------------------------------------------------------------

contents = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.sampled_from([b"", b"REJECT me", b"\xff\xfe not utf-8", b"x" * 5000, HUGE]),
)
scalars = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(
        [b"\xff", b"\xc3\x28", b"1", b"0", b"-1", b"1.0", b" 1", b"9" * 400, "9" * 30, HUGE]
    ),
)


WORKER = "fuzz:1"  # the core's worker id: canaries name it, or only others
AUDIENCES = [None, None, None, [WORKER], ["other:2"], [WORKER, "other:2"]]


@st.composite
def valid_fields(draw: st.DrawFn, key: str = KEY) -> dict[Any, Any]:
    content = draw(contents)
    fields = {
        b"schema": str(SCHEMA_VERSION).encode(),
        b"key": key.encode(),
        b"version": str(draw(st.integers(1, 10**6))).encode(),
        b"sha256": sha256_hex(content).encode(),
        b"content": content,
        b"published_at": str(draw(st.integers(0, 2**45))).encode(),
        b"publisher": b"pod:1",
    }
    audience = draw(st.sampled_from(AUDIENCES))
    if audience is not None:  # a canary entry (rollout control)
        fields[b"schema"] = str(AUDIENCE_SCHEMA).encode()
        fields[b"audience"] = encode_audience(audience).encode()
    return fields


@st.composite
def mutated_fields(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid entry with some fields dropped, replaced, retyped, or extra ones added."""
    fields: dict[Any, Any] = draw(valid_fields(draw(st.sampled_from([KEY, KEY, "other.yaml"]))))
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES + OPTIONAL_FIELDS), max_size=3)):
        action = draw(st.sampled_from(["drop", "replace", "as_str", "wrong_hash"]))
        raw = name.encode()
        if action == "drop":
            fields.pop(raw, None)
        elif action == "replace":
            fields[raw] = draw(scalars)
        elif action == "as_str" and isinstance(fields.get(raw), bytes):
            fields[name] = fields.pop(raw).decode("utf-8", "surrogateescape")
        else:
            fields[b"sha256"] = draw(st.sampled_from([b"0" * 64, b"A" * 64, b"", b"zz"]))
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(st.one_of(st.binary(max_size=12), st.text(max_size=12)))] = draw(scalars)
    return fields


def as_text(fields: dict[Any, Any]) -> dict[Any, Any]:
    """The entry as a client with ``decode_responses=True, encoding_errors="surrogateescape"``
    returns it: every name and value a ``str``, bytes that are not UTF-8 as lone surrogates."""

    def text(value: Any) -> Any:
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value

    return {text(name): text(value) for name, value in fields.items()}


entry_ids = st.one_of(
    st.sampled_from([b"1-0", b"1700000000000-5", "2-1", b"0-0"]),
    st.binary(max_size=20),
    st.text(max_size=20),
)
anything = st.one_of(
    mutated_fields(),
    valid_fields(),
    st.one_of(valid_fields(), mutated_fields()).map(as_text),
    st.dictionaries(st.one_of(st.binary(max_size=10), st.text(max_size=10)), scalars, max_size=8),
    scalars,
)
FUZZ = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(entry_ids, anything)
def test_decode_event_returns_an_event_or_a_malformed_entry(entry_id: Any, fields: Any) -> None:
    counted("decode_event")
    try:
        event = decode_event(entry_id, fields)
    except MalformedEntry as exc:
        reason = exc.reason
        assert reason
        return
    assert isinstance(event, Event)
    assert event.sha256 == sha256_hex(event.content)
    assert len(event.content) <= MAX_CONTENT_BYTES
    assert event.version >= 1
    assert event.published_at >= 0
    assert event.schema in {SCHEMA_VERSION, AUDIENCE_SCHEMA}
    assert (event.schema == AUDIENCE_SCHEMA) == (event.audience is not None)


# -- the decision core -------------------------------------------------------------------------


class Validator:
    """Refuses content containing REJECT (and, decoding it, content that is not UTF-8)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, text: str) -> None:
        self.seen.append(text)
        if "REJECT" in text:
            raise ValueError("refused")


def acceptable(entry_id: Any, fields: Any) -> Event | None:
    """The oracle: the event if it decodes for KEY, is meant for WORKER and the validator
    would accept it."""
    try:
        event = decode_event(entry_id, fields)
    except MalformedEntry:
        return None
    if event.key != KEY or not event.is_for(WORKER):
        return None
    try:
        text = event.content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "REJECT" in text else event


def verified(text: str, entries: list[tuple[Any, Any]]) -> bool:
    """``text`` is the content of an entry for KEY and WORKER that decodes with a true hash
    (a canary for other workers never reaches this one's callback)."""
    for entry_id, fields in entries:
        try:
            event = decode_event(entry_id, fields)
        except MalformedEntry:
            continue
        if event.key == KEY and event.is_for(WORKER) and event.content == text.encode():
            return True
    return False


def on_time(event: Event) -> bool:
    """Appended within the tolerance of its ``published_at``, by its id's milliseconds."""
    millis = event.id.split("-")[0]
    return bool(re.fullmatch("[0-9]+", millis)) and (
        int(millis) - event.published_at <= REPLAY_TOLERANCE_MS
    )


def highest_acceptable(entries: list[tuple[Any, Any]], limit: int) -> Event | None:
    """The oracle of a replay: read newest first; while nothing read is suspect, the first
    on-time entry the validator accepts is the answer (rejected ones are walked past). Once
    an entry is late, unreadable, or versions stop decreasing: up to ``limit`` entries (up
    to the hard cap once versions stop decreasing), the highest acceptable version (equal
    versions: the one appended first). Canaries for other workers are read past as if they
    were not there (not counted toward ``limit``)."""
    read: list[tuple[int, Any, Any]] = []
    cap, previous, suspect = limit, None, False
    for position, (entry_id, fields) in enumerate(reversed(entries)):
        try:
            event = decode_event(entry_id, fields)
        except MalformedEntry:
            event = None
        if event is not None and event.key == KEY and not event.is_for(WORKER):
            continue
        read.append((position, entry_id, fields))
        if event is not None and event.key == KEY:
            if previous is not None and event.version >= previous:
                cap = max(limit, HISTORY_READ_CAP)
                suspect = True
            previous = event.version
            if not suspect and on_time(event):
                taken = acceptable(entry_id, fields)
                if taken is not None:
                    return taken
            elif not suspect:
                suspect = True  # late
        else:
            suspect = True  # unreadable
        if len(read) >= cap:
            break
    found = [(p, e) for p, i, f in read if (e := acceptable(i, f)) is not None]
    if not found:
        return None
    return max(found, key=lambda item: (item[1].version, item[0]))[1]


entry_lists = st.lists(st.tuples(entry_ids, anything), max_size=10)


@FUZZ
@given(entry_lists, entry_lists, st.integers(1, 12))
def test_the_core_never_crashes_and_runs_only_verified_content(
    first: list[tuple[Any, Any]], second: list[tuple[Any, Any]], limit: int
) -> None:
    counted("core_walk")
    validator = Validator()
    core = SubscriberCore(KEY, validator, decode=True, logger=LOG)
    core.worker = WORKER

    # a replay: newest first; runs the highest version that decodes and is accepted
    walk = core.walk(limit=limit)
    examined = 0
    for entry_id, fields in reversed(first):
        examined += 1
        if not walk.step(entry_id, fields):
            break
    walk.finish()
    running = core.state.running
    wanted = highest_acceptable(first, limit)
    if wanted is None:
        assert running is None
    else:
        assert running is not None
        assert (running.content, running.version) == (wanted.content, wanted.version)
    assert examined <= max(limit, HISTORY_READ_CAP) or not first

    # then a resync over more entries, from where the replay stopped
    entries = first + second
    before = core.state.running
    walk = core.walk(limit=limit, stop_at=core.cursor)
    for entry_id, fields in reversed(entries):
        if not walk.step(entry_id, fields):
            break
    walk.finish()
    after = core.state.running

    for text in validator.seen:
        assert verified(text, entries), f"callback saw unverified content {text[:40]!r}"
    if after is not None:
        assert after.sha256 == sha256_hex(after.content)
        assert after is before or verified(after.content.decode("utf-8"), entries)
        assert b"REJECT" not in after.content
    for ack in walk.acks:
        if ack.status == "applied":
            assert after is not None
            assert ack.sha256 == after.sha256
    # whatever happened, the core can still say what it runs
    core.worker_state(heartbeat_interval=1.0, started_at=0, pid=1, host="h")
    assert core.status() in {"starting", "applied", "rejected", "holding"}
    assert isinstance(core.cursor, Cursor)


# -- the daemon: arbitrary contents and sizes ---------------------------------------------------

file_contents = st.one_of(
    st.binary(max_size=4096),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogateescape")),
    st.builds(
        lambda size, byte: bytes([byte]) * size,
        st.sampled_from(
            [
                0,
                1,
                MAX_CONTENT_BYTES - 1,
                MAX_CONTENT_BYTES,
                MAX_CONTENT_BYTES + 1,
                1024 * 1024,
                1024 * 1024 + 1,
            ]
        ),
        st.integers(0, 255),
    ),
)


def test_the_daemon_publishes_every_content_within_the_limit_and_refuses_the_rest(
    redis_server: RedisServer, kubelet_mount: KubeletMount
) -> None:
    kubelet_mount.write({KEY: b"initial\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, metrics_port=0)
    thread = threading.Thread(target=daemon.run, name="fuzz-daemon")
    thread.start()
    client = connect(redis_server.url, socket_timeout=5.0)
    try:
        wait_until(lambda: events(client, KEY))

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(file_contents, min_size=1, max_size=3))
        def publish_each(batch: list[bytes]) -> None:
            for content in batch:
                counted("daemon_contents")
                check_one(content)

        def check_one(content: bytes) -> None:
            newest_before = events(client, KEY)[-1]
            kubelet_mount.set(KEY, content)
            digest = sha256_hex(content)
            if len(content) <= MAX_CONTENT_BYTES:
                wait_until(lambda: events(client, KEY)[-1].sha256 == digest)
                assert events(client, KEY)[-1].content == content  # events() verified the hash
            else:  # refused without being read (issue 23): the previous version stays
                wait_until(lambda: daemon._intake.unreadable().get(KEY) == "too_large")
                assert events(client, KEY)[-1] == newest_before

        publish_each()
        assert thread.is_alive()
        assert daemon.healthy() == (True, "ok")
    finally:
        client.close()
        daemon.request_stop()
        thread.join(10)


# -- the CLI: arbitrary arguments ---------------------------------------------------------------

COMMANDS = ["watch", "history", "show", "diff", "status", "wait", "demo", "help", "", "-h"]
FLAGS = [
    "--redis", "--prefix", "--json", "--limit", "--version", "--timeout", "--history",
    "--metrics-port", "--resync-interval", "--log-level", "--example-dir", "--help", "-h", "--",
]  # fmt: skip
URLS = [
    "unix:///nonexistent/hotreload-fuzz.sock", "http://h", "redis://", "redis://:pw@",
    "redis://h:notaport", "unix://", "rediss://", "", "redis://[::1", "unix:///",
]  # fmt: skip
TOKENS = [
    KEY, "missing.yaml", "a{b}", "bad key", "..", "-1", "0", "1", "2", "99999999999999999999",
    "nan", "inf", "-inf", "1e309", "0.1", "DEBUG", "LOUD", "/", "/nonexistent/dir", "\x00",
    "a" * 300,
]  # fmt: skip
_CONNECTABLE = re.compile(r"(?i)\s*(rediss?|unix)://.")


def safe_text(text: str) -> bool:
    """Random text never names a reachable Redis (port 6379 or any other): only the URLs
    listed above are used as URLs."""
    return not _CONNECTABLE.match(text)


argv_tokens = st.one_of(
    st.sampled_from(FLAGS),
    st.sampled_from(TOKENS),
    st.sampled_from(URLS),
    st.text(max_size=12).filter(safe_text),
)


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    rest = draw(st.lists(argv_tokens, max_size=7))
    return ([command] if command else []) + rest


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)`` -> (exit code, stderr); fails on any exception but argparse's exit."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
        assert status in (0, 2), f"{argv}: SystemExit({status!r})"
        code = int(status or 0)
    except BaseException as exc:
        raise AssertionError(f"hotreload {argv!r} raised {exc!r}") from exc
    err = capsys.readouterr().err
    assert isinstance(code, int)
    assert "Traceback" not in err, f"{argv}: {err}"
    return code, err


@pytest.fixture
def contained_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    """The CLI with no way to run for long: ``watch`` and ``demo`` get as far as running and
    return at once, Redis defaults to a socket that does not exist, ``wait`` gives up fast."""
    ran = {"n": 0}

    def no_run(self: Daemon) -> None:
        ran["n"] += 1

    monkeypatch.setenv("HOTRELOAD_REDIS_URL", "unix:///nonexistent/hotreload-fuzz.sock")
    monkeypatch.setattr(Daemon, "run", no_run)
    with mock.patch("publisher.demo.run_demo", return_value=0):
        yield lambda: ran["n"]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=argvs())
def test_cli_arguments_never_end_in_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str], contained_cli: Callable[[], int]
) -> None:
    counted("cli_argv")
    code, err = run_cli(argv, capsys)
    assert code in (0, 1, 2, 3, 130, 141), (argv, code)
    if code not in (0, 1):
        # (split on newlines only: arguments may hold other line breaks, echoed back as given)
        lines = [line for line in err.split("\n") if line.strip()]
        assert lines, f"{argv}: exit {code} without a word"
        assert lines[0].startswith("hotreload: error:"), (argv, err)


@pytest.fixture(scope="module")
def populated_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fz"))
    server.start()
    try:
        for version in (1, 2, 3):
            append_event(server.url, KEY, f"rev: {version}\n".encode(), version=version)
        client = connect(server.url, socket_timeout=5.0)
        try:  # a malformed entry and a wrongly typed key, as an operator might leave them
            client.xadd(stream_keys(KEY).events, {"version": "x", "content": b"\xff"})
            client.set(stream_keys("wrongtype.yaml").events, b"not a stream")
        finally:
            client.close()
        yield server
    finally:
        server.stop()


NUMBERS = ["1", "2", "3", "4", "0", "-3", "99999999999999999999", "1e3", "x", ""]


@st.composite
def query_argvs(draw: st.DrawFn) -> list[str]:
    """A query command, a key, positional versions and flags with values, in any order."""
    command = draw(st.sampled_from(["history", "show", "diff", "status", "wait"]))
    key = draw(st.sampled_from([KEY, KEY, KEY, "missing.yaml", "wrongtype.yaml", "x{y}", ""]))
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(NUMBERS).map(lambda n: [n]),
                st.just(["--json"]),
                st.tuples(st.sampled_from(["--limit", "--version"]), st.sampled_from(NUMBERS)),
                st.tuples(st.sampled_from(["--limit", "--version"]), st.sampled_from(NUMBERS)),
                st.tuples(st.just("--prefix"), st.sampled_from(["hotreload", "x y", "{", ""])),
            ),
            max_size=3,
        )
    )
    return [command, key, *(token for part in parts for token in part)]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=query_argvs())
def test_queries_against_a_real_redis_never_end_in_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str], populated_redis: RedisServer
) -> None:
    counted("cli_queries")
    # for `wait` --timeout comes last: argparse keeps the last one, so it never waits long
    bounded = ["--timeout", "0.2"] if argv[0] == "wait" else []
    code, err = run_cli([*argv, "--redis", populated_redis.url, *bounded], capsys)
    assert code in (0, 1, 2, 3), (argv, code, err)
    if code == 3:  # "Redis failed": only for the key that is not a stream; bad input is 2
        assert "WRONGTYPE" in err, (argv, err)
