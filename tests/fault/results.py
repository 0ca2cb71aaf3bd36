"""Measured figures of the reliability suites, printed and kept in bench-results/reliability.json.

Each suite records its section (``fault``, ``stress``, ``fuzz``), one entry per scenario, with a
read-modify-write of the file (under a lock: tests run in parallel), so a partial run (one
scenario, ``-k``) updates what it measured and keeps the rest. ``pytest -s`` shows the
printed lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "reliability.json"


def record(section: str, name: str, figures: dict[str, Any]) -> None:
    """Print ``figures`` and store them under ``section`` / ``name``."""
    print(f"\n[{section}] {name}: " + json.dumps(figures, sort_keys=True))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # test processes running in parallel (make test) each read, change and write the file:
    # one at a time, or one's figures would be lost
    with RESULTS.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data: dict[str, Any] = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault(section, {})[name] = {
            **figures,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(RESULTS)
