"""What every benchmark shares: process bookkeeping, the report pipe, statistics, tables.

Clocks: every timestamp that crosses a process boundary is ``time.monotonic_ns()``
(CLOCK_MONOTONIC, one clock for every process on the machine), like the vendored kubelet
writer's ``t_rename_ns``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results"
REPORT_FD_ENV = "HR_BENCH_FD"

KIB = 1024
MIB_512 = 1024 * 1024 - 512  # the largest content the publisher accepts


def size_label(size: int) -> str:
    if size == MIB_512:
        return "1 MiB-512"
    if size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


# -- content that says which update it is --------------------------------------------------

SEQ_PREFIX = b"seq="
SEQ_DIGITS = 10


def content(seq: int, size: int) -> bytes:
    """UTF-8 text of exactly ``size`` bytes whose first line names ``seq``."""
    head = SEQ_PREFIX + str(seq).zfill(SEQ_DIGITS).encode() + b"\n"
    line = b"# padding padding padding padding padding padding padding padding padding\n"
    body = head + line * ((size - len(head)) // len(line) + 1)
    return body[:size]


def seq_of(text: str | bytes) -> int:
    start = len(SEQ_PREFIX)
    return int(text[start : start + SEQ_DIGITS])


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, int(q * len(ordered) + 0.999999))  # ceil, at least the first
    return ordered[min(len(ordered), rank) - 1]


def summary(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5), 3),
        "p99": round(percentile(values, 0.99), 3),
        "max": round(max(values), 3),
        "min": round(min(values), 3),
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(float(a) / float(b), 2)


# -- tables --------------------------------------------------------------------------------


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=True, timeout=5
        ).stdout
        redis_version = out.split("v=", 1)[1].split()[0] if "v=" in out else out.strip()
    packages: dict[str, str | None] = {}
    for name in ("redis", "msgspec", "watchdog", "gunicorn", "hiredis"):
        try:
            packages[name] = version(name)
        except Exception:
            packages[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "redis_server": redis_version,
        "packages": packages,
    }


def describe_machine(info: dict[str, Any]) -> str:
    packages = info["packages"]
    hiredis = packages.get("hiredis") or "not installed"
    return (
        f"{info['cpus']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, Python "
        f"{info['python']}, redis-server {info['redis_server']}, redis-py {packages['redis']} "
        f"(hiredis {hiredis}), msgspec {packages['msgspec']}, watchdog {packages['watchdog']}, "
        f"gunicorn {packages['gunicorn']}"
    )


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{stamp}-{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# -- processes -----------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None if gone;
    with the PID it names one process, so a recycled PID is never signalled by mistake."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int, started: int | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


@dataclass
class Processes:
    """Every process a benchmark starts, stopped by PID (SIGTERM, then SIGKILL) at the end.

    ``spawn`` starts a child; ``adopt`` records a grandchild (a forked worker that reported
    its PID and start time), which is signalled only while the same process holds that PID.
    """

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    adopted: dict[int, int | None] = field(default_factory=dict)

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # the repository first, then whatever the caller had (e.g. a directory with hiredis)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, **kwargs.pop("env", {})}
        process: subprocess.Popen[bytes] = subprocess.Popen(list(argv), env=env, **kwargs)
        self.started.append(process)
        return process

    def python(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, *args], **kwargs)

    def adopt(self, pid: int, started: int | None) -> None:
        self.adopted[pid] = started

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)
        self.started.clear()
        deadline = time.monotonic() + 5
        for pid, started in list(self.adopted.items()):
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pid, started in list(self.adopted.items()):
            while alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.02)
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.adopted.clear()


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


# -- the report pipe -----------------------------------------------------------------------


class Reports:
    """A pipe every worker process writes one-line reports into (writes under PIPE_BUF are
    atomic, so lines of concurrent writers never interleave); the benchmark reads it.

    Pass ``fd`` to the children (``pass_fds=[reports.fd]`` and ``env={REPORT_FD_ENV: ...}``).
    """

    def __init__(self) -> None:
        self._read, self.fd = os.pipe()
        os.set_blocking(self._read, False)
        self._buffer = b""

    @property
    def env(self) -> dict[str, str]:
        return {REPORT_FD_ENV: str(self.fd)}

    def lines(self, timeout: float) -> list[list[str]]:
        """The complete lines available within ``timeout`` (at least one unless it expired),
        each split on spaces."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        if not ready:
            return []
        while True:
            try:
                chunk = os.read(self._read, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        return [line.decode().split() for line in complete if line]

    def close(self) -> None:
        for fd in (self._read, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Reports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def report(fd: int, *fields: object) -> None:
    """Write one report line (from a worker process)."""
    os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (/proc/PID/task/*/schedstat): utime+stime
    would round an idle process's few milliseconds to 0 or one 10 ms tick."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def smaps_rollup(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return {
        "rss": values.get("Rss", 0) / 1024,
        "pss": values.get("Pss", 0) / 1024,
        "uss": uss / 1024,
    }


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def wait_for(predicate: Any, what: str, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)
