"""The build is reproducible: the tests run with exactly what requirements/dev.lock pins.

A fresh clone installs the lock and nothing else (``make venv``), so an upstream release cannot
turn ``make test`` red; these tests catch the ways that promise breaks quietly — a package
installed beside the lock, a range in ``pyproject.toml`` edited without re-locking, a pin
without hashes, a Python claimed but not tested.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "dev.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


IMAGE_LOCK = ROOT / "requirements" / "image.lock"


def lock_entries(lock: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for each pin, joining the lock's continuation lines."""
    text = lock.read_text().replace("\\\n", " ")
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
            entries[canonicalize_name(match[1])] = (match[2].rstrip(";"), hashes)
    return entries


LOCKED = lock_entries()


@pytest.mark.parametrize("lock", [LOCK, IMAGE_LOCK], ids=lambda p: p.name)
def test_every_pin_carries_hashes(lock: Path) -> None:
    entries = lock_entries(lock)
    assert len(entries) > 10
    assert {name for name, (_, hashes) in entries.items() if not hashes} == set()


def test_the_image_lock_holds_what_the_sidecar_and_the_example_app_run() -> None:
    """deploy/Dockerfile installs requirements/image.lock with --no-deps: it must be complete."""
    image = lock_entries(IMAGE_LOCK)
    wanted = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["publisher"]]
    wanted += [*PROJECT["optional-dependencies"]["yaml"], "gunicorn>=23", "hatchling>=1.25"]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in image, f"{name} missing from {IMAGE_LOCK.name}: run make lock"
        assert requirement.specifier.contains(image[name][0], prereleases=True), requirement
    # the same versions as the tests ran with, where both hold a package
    differ = {
        n: (v, LOCKED[n][0]) for n, (v, _) in image.items() if n in LOCKED and v != LOCKED[n][0]
    }
    assert differ == {}, f"image.lock and dev.lock disagree: {differ} (make lock)"


def test_everything_installed_is_the_locked_version() -> None:
    """The venv holds the lock and the project, nothing else and no other version."""
    own = canonicalize_name(PROJECT["name"])
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in distributions()
        if canonicalize_name(dist.metadata["Name"]) != own
    }
    unlocked = sorted(set(installed) - set(LOCKED))
    assert unlocked == [], f"installed but not in {LOCK.name}: {unlocked} (make lock)"
    drifted = {n: (v, LOCKED[n][0]) for n, v in installed.items() if v != LOCKED[n][0]}
    assert drifted == {}, f"installed version differs from the lock: {drifted} (make venv)"


def declared_requirements() -> list[Requirement]:
    extras = PROJECT["optional-dependencies"]
    declared = [*PROJECT["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for extra in ("publisher", "dev", "lint", "yaml"):
        declared += extras[extra]
    own = canonicalize_name(PROJECT["name"])
    return [r for r in map(Requirement, declared) if canonicalize_name(r.name) != own]


@pytest.mark.parametrize("requirement", declared_requirements(), ids=str)
def test_the_lock_satisfies_pyproject(requirement: Requirement) -> None:
    """Editing a range in pyproject.toml without `make lock` fails here, not on a user."""
    name = canonicalize_name(requirement.name)
    assert name in LOCKED, f"{requirement} is not in {LOCK.name}: run make lock"
    version = LOCKED[name][0]
    assert requirement.specifier.contains(version, prereleases=True), (
        f"{LOCK.name} pins {name}=={version}, outside {requirement}: run make lock"
    )


def test_the_pythons_claimed_are_the_pythons_tested() -> None:
    """Classifiers, requires-python and `make test-pythons` name the same versions."""
    claimed = sorted(
        c.rsplit(":: ", 1)[1]
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^PYTHONS \?= (.+)$", makefile, re.MULTILINE)
    assert match is not None
    tested = sorted(word.removeprefix("python") for word in match[1].split())
    assert claimed == tested
    assert PROJECT["requires-python"] == f">={claimed[0]}"
