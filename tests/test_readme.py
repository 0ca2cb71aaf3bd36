"""Every example in README.md runs: Python blocks execute, CLI lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from publisher.cli import build_parser
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.testing import RedisServer
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
CLI_LINES = re.findall(r"^\$ (hotreload .*?)(?:\s+#.*)?$", README, re.MULTILINE)


def test_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 5
    assert len(CLI_LINES) >= 6


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.strip().splitlines()[0][:40])
def test_python_example_runs(
    code: str, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(redis_server.url, socket_timeout=5)
    try:
        publisher = Publisher(client)
        publisher.publish("flags.json", b'{"dark_mode": true}')
        publisher.publish("limits.yaml", b"requests_per_second: 5\n")
    finally:
        client.close()
    monkeypatch.setenv("HOTRELOAD_REDIS_URL", redis_server.url)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102


@pytest.mark.parametrize("line", CLI_LINES)
def test_cli_example_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)  # raises SystemExit on a wrong flag or command
