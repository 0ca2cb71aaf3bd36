"""``hotreload check``: the workers' validation on files, before anything is applied.

``main(argv)`` in this process: exit 0 accepted, 1 rejected, 2 bad input (one line, no
traceback). The rejection text must be the one a worker reports, so it is compared with the
``error`` of a real worker's ack (a ``Subscriber`` on a real redis-server given the same
content and callback): typed configs, a plain validator, content that is not UTF-8, a
snapshot directory, a sensitive key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from publisher.cli import main
from subscriber import Subscriber, typed_subscriber
from subscriber.protocol import Ack, encode_snapshot
from subscriber.testing import RedisServer, append_event
from tests.conftest import REPO, Processes
from tests.helpers import wait_until
from tests.workers.check_app import Limits, Settings, refuse_zero
from tests.workers.harness import acks

APP = "tests.workers.check_app"
GOOD = b"requests_per_second: 5\n"
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # check puts the current directory on sys.path, as gunicorn does: not for other tests
    monkeypatch.setattr(sys, "path", list(sys.path))


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def checked_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any]]:
    code, out, err = check(capsys, *argv, "--json")
    assert err == ""
    return code, json.loads(out)


def write(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_accepted_and_rejected_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", GOOD)
    also = write(tmp_path, "also.yml", b"requests_per_second: 7\nburst: 1\n")
    assert check(capsys, good, also, "--type", f"{APP}:Limits") == (
        0, f"{good}: accepted\n{also}: accepted\n", ""
    )  # fmt: skip
    bad = write(tmp_path, "bad.yaml", b"requests_per_second: 0\n")
    code, out, err = check(capsys, good, bad, "--validator", f"{APP}:limits.apply")
    assert code == 1
    assert err == ""
    assert out.splitlines() == [
        f"{good}: accepted",
        f"{bad}: rejected: ValidationError: Expected `int` >= 1 - at `$.requests_per_second`",
    ]
    code, rows = checked_json(capsys, bad, "--validator", f"{APP}:refuse_zero")
    assert code == 1
    assert rows == [
        {"file": bad, "status": "rejected",
         "error": "ValueError: zero is not a rate: 'requests_per_second: 0'"}
    ]  # fmt: skip
    # --format overrides the extension; JSON content in a .txt file
    as_json = write(tmp_path, "limits.txt", b'{"requests_per_second": 3}')
    assert check(capsys, as_json, "--type", f"{APP}:Limits", "--format", "json")[0] == 0


def worker_error(url: str, key: str, make: Any, content: bytes, good: bytes, **extra: Any) -> str:
    """The ``error`` of a real worker's ack for ``content`` (after it started on ``good``)."""
    append_event(url, key, good, version=1)
    with make(url):
        entry_id = append_event(url, key, content, version=2, **extra)

        def ack() -> Ack | None:
            found = [a for a in acks(url, key) if a.entry_id == entry_id]
            return found[0] if found else None

        found = wait_until(ack, "the worker's ack")
    assert found.status == "rejected"
    return found.error


def test_a_rejection_reads_exactly_as_a_workers_ack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server: RedisServer
) -> None:
    url = redis_server.url
    cases: list[tuple[str, bytes, list[str], Any]] = [
        ("typed.yaml", b"requests_per_second: 0\nextra: 1\n", ["--type", f"{APP}:Limits"],
         lambda u: typed_subscriber("typed.yaml", Limits, redis_url=u, **FAST)[0]),
        ("plain.yaml", b"requests_per_second: 0\n", ["--validator", f"{APP}:refuse_zero"],
         lambda u: Subscriber("plain.yaml", refuse_zero, redis_url=u, **FAST)),
        ("binary.yaml", b"rate: \xff\xfe\n", ["--validator", f"{APP}:refuse_zero"],
         lambda u: Subscriber("binary.yaml", refuse_zero, redis_url=u, **FAST)),
        ("broken.yaml", b"requests_per_second: [1\n", ["--type", f"{APP}:Limits"],
         lambda u: typed_subscriber("broken.yaml", Limits, redis_url=u, **FAST)[0]),
    ]  # fmt: skip
    for name, content, how, make in cases:
        path = write(tmp_path, name, content)
        code, rows = checked_json(capsys, path, *how)
        assert code == 1, rows
        expected = worker_error(url, name, make, content, GOOD)
        assert rows[0]["error"] == expected, name


def test_a_snapshot_directory_and_a_sensitive_key_read_as_a_worker_reports_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server: RedisServer
) -> None:
    url = redis_server.url
    env = tmp_path / "env"
    env.mkdir()
    (env / "TIMEOUT_S").write_text("soon")
    (env / "DEBUG").write_text("true")
    code, rows = checked_json(capsys, str(env), "--snapshot", "--type", f"{APP}:Settings")
    assert code == 1

    def make(u: str) -> Subscriber:
        return typed_subscriber("env", Settings, redis_url=u, format="snapshot", **FAST)[0]

    soon = encode_snapshot({"TIMEOUT_S": b"soon", "DEBUG": b"true"})
    expected = worker_error(url, "env", make, soon, encode_snapshot({"TIMEOUT_S": b"30"}))
    assert rows[0]["error"] == expected
    assert "TIMEOUT_S" in expected
    (env / "TIMEOUT_S").write_text("30")
    assert check(capsys, str(env), "--snapshot", "--type", f"{APP}:Settings")[0] == 0

    secret = b"password: hunter2hunter2 0\n"
    path = write(tmp_path, "secret.yaml", secret)
    code, rows = checked_json(capsys, path, "--validator", f"{APP}:refuse_zero", "--sensitive")
    assert code == 1
    assert "hunter2" not in rows[0]["error"]
    sensitive = worker_error(
        url, "secret.yaml", lambda u: Subscriber("secret.yaml", refuse_zero, redis_url=u, **FAST),
        secret, GOOD, sensitive=True,
    )  # fmt: skip
    assert rows[0]["error"] == sensitive


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/missing.yaml", "--type", f"{APP}:Limits"], "cannot read"),
        (["{good}", "--validator", "tests.workers.no_such_module:f"], "cannot import"),
        (["{good}", "--validator", "raising_module:f"], "RuntimeError: boom at import"),
        (["{good}", "--validator", f"{APP}:nothing.here"], "has no attribute nothing.here"),
        (["{good}", "--validator", f"{APP}:not_callable"], "not callable"),
        (["{good}", "--validator", f"{APP}"], "is not MODULE:NAME"),
        (["{good}", "--type", f"{APP}:refuse_zero"], "not a type msgspec decodes into"),
        (["{tmp}/limits.txt", "--type", f"{APP}:Limits"], "cannot tell the format"),
        (["{good}", "--validator", f"{APP}:refuse_zero", "--format", "json"], "goes with --type"),
        (["{good}", "--snapshot", "--type", f"{APP}:Settings"], "takes a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    good = write(tmp_path, "good.yaml", GOOD)
    write(tmp_path, "limits.txt", GOOD)
    (tmp_path / "raising_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)  # check imports from the current directory
    monkeypatch.delitem(sys.modules, "raising_module", raising=False)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{good}", good) for a in argv]
    code, out, err = check(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err
    assert err.startswith("hotreload: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_without_a_validator_or_a_type_argparse_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "app.yaml"])
    assert exit_info.value.code == 2
    assert "one of the arguments --validator --type is required" in capsys.readouterr().err


def test_the_current_directory_is_importable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_app_for_check.py").write_text(
        "def validate(text):\n    if 'bad' in text:\n        raise ValueError('bad config')\n"
    )
    write(tmp_path, "ok.yaml", b"fine\n")
    write(tmp_path, "no.yaml", b"bad\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_app_for_check", raising=False)
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)
    code, out, _ = check(capsys, "ok.yaml", "no.yaml", "--validator", "my_app_for_check:validate")
    assert (code, out) == (1, "ok.yaml: accepted\nno.yaml: rejected: ValueError: bad config\n")
    assert "HOTRELOAD_REDIS_URL" not in os.environ  # the import-time placeholder is gone


def test_the_example_app_is_checked_from_its_directory_without_a_redis(
    tmp_path: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a CI job runs it: a separate process, in the app's directory, no Redis anywhere."""
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)  # spawn starts from os.environ
    bad = write(tmp_path, "bad.yaml", b"default:\n  requests_per_second: 0\n  burst: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "HOTRELOAD_REDIS_URL"}
    env["PYTHONPATH"] = str(REPO)
    process = processes.spawn(
        [sys.executable, "-m", "publisher", "check", "config/rate_limits.yaml", bad,
         "--validator", "app:rate_limits.apply"],
        cwd=str(REPO / "deploy" / "example"), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert out.decode().splitlines() == [
        "config/rate_limits.yaml: accepted",
        f"{bad}: rejected: ValidationError: Expected `int` >= 1 - at "
        "`$.default.requests_per_second`",
    ]
