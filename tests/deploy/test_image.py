"""The image, at the text level (there is no Docker engine here): the Dockerfile's stages,
base, user and what it copies, and a .dockerignore that keeps exactly that.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch

from tests.deploy.render import (
    DEPLOY,
    REPO,
)


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage: (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_dockerfile_builds_in_stages_into_a_slim_non_root_image() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert re.fullmatch(r"python:3\.1\d-slim AS builder", builder[0][1])
    assert re.fullmatch(r"python:3\.1\d-slim", final[0][1])
    build_runs = " ".join(args for name, args in builder if name == "RUN")
    # everything from the hashed image lock, then the project with nothing resolved anew
    assert "pip install --require-hashes --no-deps -r requirements/image.lock" in build_runs
    assert "pip install --no-deps --no-build-isolation '.[publisher,yaml]'" in build_runs
    users = [args for name, args in final if name == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1])  # numeric: runAsNonRoot can verify it
    final_text = " ".join(args for _, args in final)
    for build_tool in ("gcc", "build-essential", "g++", "make ", "apt-get install", "pip install"):
        assert build_tool not in final_text, build_tool
    copies = [args for name, args in final if name == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "deploy/example/ /app/" in copies
    assert ("WORKDIR", "/app") in final
    (cmd,) = [args for name, args in final if name == "CMD"]
    assert "exec gunicorn -c /app/gunicorn.conf.py app:app" in cmd


def test_the_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch(p, body) or fnmatch(p.rsplit("/", 1)[-1], body) for p in prefixes):
                verdict = not negated
        return verdict

    sources = []
    for stage in dockerfile_stages():
        for name, args in stage:
            if name == "COPY" and not args.startswith("--from"):
                sources += args.split()[:-1]
    assert sources
    for source in sources:
        pattern = source.rstrip("/") + ("/**/*" if source.endswith("/") else "")
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                assert not ignored(str(path.relative_to(REPO))), path
    unwanted_paths = (".venv/bin/python", ".git/config", "tests/conftest.py", "deploy/k8s")
    # the compose placeholders never reach an image
    for unwanted in (*unwanted_paths, "deploy/local-secrets/publisher-password"):
        assert ignored(unwanted), unwanted
