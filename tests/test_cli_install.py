"""The CLI as a worker's install has it: redis and msgspec, without the ``[publisher]`` extra.

Each test runs ``python -m publisher`` in a subprocess whose ``sys.meta_path`` starts with a
finder that reports watchdog and prometheus_client as not installed (``ModuleNotFoundError``,
as for a package that is absent), however they are imported. The query commands must work
against a real redis-server; ``watch`` and ``demo`` must say what to install, in one line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis

from publisher.publish import Publisher
from subscriber.testing import RedisServer
from tests.conftest import Processes

EXTRA = ("watchdog", "prometheus_client")

NOT_INSTALLED = f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""
# `python -m publisher ARGV`, after the finder is in place
WITHOUT_EXTRA = (
    NOT_INSTALLED
    + """
import runpy
sys.argv[0] = "hotreload"
runpy.run_module("publisher", run_name="__main__", alter_sys=True)
"""
)


def hotreload(processes: Processes, *argv: str) -> tuple[int, str, str]:
    proc = processes.python(
        "-c", WITHOUT_EXTRA, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def published(redis_server: RedisServer, client: redis.Redis) -> str:
    publisher = Publisher(client, publisher_id="pod:1")
    for content in (b"a: 1\n", b"a: 2\n"):
        publisher.publish("app.yaml", content)
    return redis_server.url


@pytest.mark.parametrize("module", ["watchdog.events", "prometheus_client", "publisher.daemon"])
def test_the_finder_really_hides_the_extra(processes: Processes, module: str) -> None:
    proc = processes.python("-c", f"{NOT_INSTALLED}\nimport {module}", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'watchdog'" in err.decode() or (
        "ModuleNotFoundError: No module named 'prometheus_client'" in err.decode()
    )


def test_query_commands_work_without_the_publisher_extra(
    processes: Processes, published: str
) -> None:
    code, out, err = hotreload(processes, "history", "app.yaml", "--json", "--redis", published)
    assert (code, err) == (0, "")
    assert [row["version"] for row in json.loads(out)] == [2, 1]

    code, out, err = hotreload(processes, "status", "--json", "--redis", published)
    assert (code, err) == (0, "")
    assert [s["newest_version"] for s in json.loads(out)["summary"]] == [2]

    code, out, err = hotreload(processes, "show", "app.yaml", "1", "--redis", published)
    assert (code, out, err) == (0, "a: 1\n", "")

    code, out, err = hotreload(processes, "--help")
    assert code == 0
    assert "watch" in out


@pytest.mark.parametrize("command", ["watch", "demo"])
def test_watch_and_demo_without_the_extra_say_what_to_install(
    processes: Processes, redis_server: RedisServer, tmp_path: Path, command: str
) -> None:
    argv = (
        [command, str(tmp_path), "--redis", redis_server.url] if command == "watch" else [command]
    )
    code, out, err = hotreload(processes, *argv)
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith(f"hotreload: error: `hotreload {command}` needs watchdog")
    assert "pip install 'configmap-hotreload[publisher]'" in err
