"""``make demo`` (``hotreload demo``) as a smoke test: the whole system, end to end."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Processes


@pytest.mark.timeout(120)
def test_demo_walks_through_every_step_and_stops_what_it_started(processes: Processes) -> None:
    demo = processes.python("-m", "publisher", "demo", stdout=subprocess.PIPE)
    output, _ = demo.communicate(timeout=100)
    text = output.decode()
    assert demo.returncode == 0, text
    assert "good update: converged on all 4 workers" in text
    assert "bad update: rejected on all 4 workers" in text
    assert "every worker still serves the previous config: requests_per_second [50]" in text
    assert "fix: converged on all 4 workers" in text
    # the rollback's version: v7 when the promotion wrote an entry of its own, else v6
    rolled_back = re.search(r"rolled back: v(\d+)", text)
    assert rolled_back, text
    version = rolled_back.group(1)
    assert f"serves version {version} (requests_per_second 40)" in text
    assert "one canary worker runs it" in text
    assert "rollout: canary v5" in text
    assert "every worker serves burst 175" in text
    assert "rolled back on all 4 workers" in text
    assert f"rollout: rolled-back v{version}" in text
    # the rollback names the head it replaced: the promotion's entry, else the canary v5
    assert f"rollback from v{int(version) - 1}, pinned" in text
    assert "every process started was stopped" in text
    # Redis, publisher and gunicorn "(pid N)", and every worker "host:N" in the status tables
    pids = {int(p) for p in re.findall(r"\(pid (\d+)\)", text)}
    pids |= {int(p) for p in re.findall(r"^  \S+:(\d+) ", text, re.MULTILINE)}
    assert len(pids) >= 7
    assert not [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_without_an_example_app_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from publisher.cli import main

    assert main(["demo", "--example-dir", str(tmp_path)]) == 2
    assert "no example app found" in capsys.readouterr().err


def _imported(module: Path) -> set[str]:
    """Every module ``module`` imports, at any level (function-level imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_demo_does_not_import_the_cli() -> None:
    """One-way arrow: the CLI starts the demo, the demo runs `hotreload` as processes."""
    package = Path(__file__).resolve().parents[1] / "publisher"
    assert not {n for n in _imported(package / "demo.py") if n.startswith("publisher.cli")}
    importers = {
        path.name
        for path in (package / "cli").glob("*.py")
        if any(n.startswith("publisher.demo") for n in _imported(path))
    }
    assert importers == {"demo.py"}  # the `hotreload demo` command, and nothing else
