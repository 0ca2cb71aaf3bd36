"""The dependency side of the build: what a run tests with, and the venvs beyond the locked one.

    python .ci/deps.py versions              Python, redis-py, redis-server, the lock's digest
    python .ci/deps.py end latest|oldest     the Redis-facing suites and mypy against the newest /
                                             the lowest runtime versions pyproject.toml admits
    python .ci/deps.py pythons PY [PY ...]   the whole suite on each interpreter, from the lock

The dev venv (``make venv``) installs ``requirements/dev.lock`` only: exact versions with hashes,
one universal lock for every Python the package claims. The two *ends* resolve anew on purpose —
that is their point — but only the runtime dependencies move: every other package (pytest, mypy,
hatchling, ...) is constrained to its locked version, so an end fails for the reason it exists to
find, never because a new test tool arrived. Run with the dev venv's Python (it has uv).
Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "dev.lock"
TOOLS_IN = ROOT / "requirements" / "tools.in"

# The suites that talk to Redis: subscribers (threaded and asyncio), the publisher's
# compare-and-publish, the daemon and CLI, Redis Cluster, Sentinel, TLS and real gunicorn;
# the reply cap (bytes and members), which subclasses redis-py's private parser internals;
# the parts that stand in for a dependency's own code and are compared with it: the worker's
# own connection (redis-py's handshake and errors), the one-pass reply parsers (redis-py's
# replies) and the multiprocess metrics writer (prometheus_client's file format).
REDIS_SUITES = [
    "tests/test_subscribers.py",
    "tests/test_subscriber.py",
    "tests/test_aio.py",
    "tests/test_subscriber_processes.py",
    "tests/test_publish.py",
    "tests/test_daemon.py",
    "tests/test_cli.py",
    "tests/test_cluster.py",
    "tests/test_cluster_publisher.py",
    "tests/test_sentinel.py",
    "tests/test_tls.py",
    "tests/test_gunicorn.py",
    "tests/test_reply_cap.py",
    "tests/test_reply_count.py",
    "tests/test_light.py",
    "tests/test_fastreply.py",
    "tests/test_aiopool.py",
    "tests/test_promfiles.py",
    "tests/test_publish_fast.py",
]

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(;[^\\]*)?")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, tuple[str, str]]:
    """name -> (version, marker) for every pin in the lock."""
    pins: dict[str, tuple[str, str]] = {}
    for line in LOCK.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[_canon(match[1])] = (match[2], (match[3] or "").strip())
    return pins


def lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def runtime_names() -> list[str]:
    """What a user's install pulls in directly: a worker's dependencies and the publisher's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["publisher"]]
    return [_canon(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]) for dep in wanted]


def run(*cmd: str | Path, cwd: Path = ROOT) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)


def versions() -> int:
    from importlib.metadata import PackageNotFoundError, version

    def have(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"Python        {sys.version.split()[0]} ({sys.executable})")
    print(f"redis-py      {have('redis')} (hiredis {have('hiredis')})")
    print(f"redis-server  {server or 'not found'}")
    print(f"msgspec {have('msgspec')}, watchdog {have('watchdog')}, ", end="")
    print(f"prometheus-client {have('prometheus-client')}, mypy {have('mypy')}")
    print(f"lock          {LOCK.relative_to(ROOT)} sha256:{lock_digest()}")
    return 0


def _venv(path: Path, python: str) -> Path:
    if path.exists():
        shutil.rmtree(path)
    run(python, "-m", "venv", path)
    py = path / "bin" / "python"
    # Python 3.11's venv brings setuptools; the lock does not hold it (3.12+ venvs lack it)
    run(py, "-m", "pip", "uninstall", "-qq", "-y", "setuptools")
    return py


def _install_project(py: Path) -> None:
    run(py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", ".")
    run(py, "-m", "pip", "check")


def end(which: str) -> int:
    if which not in ("latest", "oldest"):
        print(f"deps.py end: expected 'latest' or 'oldest', not {which!r}", file=sys.stderr)
        return 2
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        print("deps.py end: run it with the dev venv's Python (it has uv)", file=sys.stderr)
        return 2
    venv = ROOT / f".venv-{which}"
    py = _venv(venv, os.environ.get("PYTHON", "python3"))
    moving = set(runtime_names())
    constraints = venv / "constraints.txt"
    constraints.write_text(
        "".join(
            f"{name}=={ver}{' ' + marker if marker else ''}\n"
            for name, (ver, marker) in sorted(lock_pins().items())
            if name not in moving
        )
    )
    resolved = venv / "requirements.txt"
    mode = ["--upgrade"] if which == "latest" else ["--resolution", "lowest-direct"]
    run(
        uv, "pip", "compile", "pyproject.toml", TOOLS_IN, "--extra", "dev", "--python", py,
        "--constraint", constraints, *mode, "--quiet", "--no-header", "-o", resolved,
    )  # fmt: skip
    # compiled as pip compiles the dev venv's: without .pyc (the environment sets
    # PYTHONDONTWRITEBYTECODE=1) a gunicorn worker's running Subscriber measured +2.01-2.10 MiB
    # USS against +1.79-1.87 with them (tests/test_gunicorn.py's bound is 1.95; session 11)
    run(uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", py, "-r", resolved)
    _install_project(py)
    got = {_canon(m[1]): m[2] for m in map(_PIN.match, resolved.read_text().splitlines()) if m}
    print(f"{which}: " + ", ".join(f"{name} {got[name]}" for name in sorted(moving)), flush=True)
    run(venv / "bin" / "mypy")
    run(py, "-m", "pytest", "-p", "no:cacheprovider", "-q", *REDIS_SUITES)
    print(f"{which}: passed with " + ", ".join(f"{n} {got[n]}" for n in sorted(moving)))
    return 0


def _interpreter(name: str) -> str | None:
    """``name`` as a working command, or pyenv's copy of it (pyenv's shim for a version that is
    installed but not selected answers 127)."""
    found = shutil.which(name)
    works = found and subprocess.run([found, "-c", ""], capture_output=True, check=False)
    if found and works and works.returncode == 0:
        return found
    minor = name.removeprefix("python")
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(
        pyenv_root.glob(f"versions/{minor}.*/bin/{name}"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.parent.name.split(".")],
    )
    return str(candidates[-1]) if candidates else None


def pythons(names: list[str]) -> int:
    interpreters = [_interpreter(name) or name for name in names]
    missing = [p for p in interpreters if _interpreter(p) is None]
    if missing:
        print(
            f"deps.py pythons: {', '.join(missing)} not found; install them (e.g. pyenv install)"
            " or name others: make test-pythons PYTHONS='python3.12 python3.13'",
            file=sys.stderr,
        )
        return 2
    digest = lock_digest()
    for interpreter in interpreters:
        out = subprocess.run(
            [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        venv = ROOT / f".venv-python{out.stdout.strip()}"
        stamp = venv / ".lock-sha256"
        py = venv / "bin" / "python"
        if not stamp.exists() or stamp.read_text() != digest:
            py = _venv(venv, interpreter)
            run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--require-hashes", "--no-deps", "-r", LOCK)  # fmt: skip
            _install_project(py)
            stamp.write_text(digest)
        run(py, "-c", "import sys; print('testing on Python', sys.version)")
        run(py, "-m", "pytest", "-p", "no:cacheprovider", "-q")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["versions"]:
        return versions()
    if argv[:1] == ["end"] and len(argv) == 2:
        return end(argv[1])
    if argv[:1] == ["pythons"] and len(argv) > 1:
        return pythons(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        command = " ".join(map(str, exc.cmd))
        print(f"deps.py: {command} failed (exit {exc.returncode})", file=sys.stderr)
        sys.exit(1)
