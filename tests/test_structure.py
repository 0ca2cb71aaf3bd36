"""The shape the code keeps: one-way arrows, small modules, one error root.

Issue 17 restructured a codebase whose 867-line daemon module, 500-870-line modules and import
cycles made every next capability expensive; these tests keep it from growing back. They read
the source (AST), so a function-level import counts as an arrow like a top-level one; imports
under ``if TYPE_CHECKING:`` do not run and are not arrows, except that the worker package never
names the publisher at all.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import publisher
import subscriber
from subscriber.errors import HotReloadError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("publisher", "subscriber")
MAX_MODULE_LINES = 500
MAX_TEST_MODULE_LINES = 800


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(name: str, path: Path, *, type_checking: bool) -> set[str]:
    """The project modules ``name`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {module for module in found if module in MODULES and module != name}


def test_no_import_cycle() -> None:
    graph = {name: imported(name, path, type_checking=False) for name, path in MODULES.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_worker_package_never_names_the_publisher() -> None:
    backwards = {
        name: sorted(
            m for m in imported(name, path, type_checking=True) if m.startswith("publisher")
        )
        for name, path in MODULES.items()
        if name.startswith("subscriber")
    }
    assert {name: found for name, found in backwards.items() if found} == {}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name]} has {lines} lines: split it by job"


def test_test_modules_stay_readable() -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if "_vendor" not in path.parts
        and (n := len(path.read_text().splitlines())) > MAX_TEST_MODULE_LINES
    }
    assert big == {}


def test_every_public_error_is_a_hotreload_error() -> None:
    """One root: `except HotReloadError` catches everything the library raises on purpose."""
    strays: list[str] = []
    for package in (publisher, subscriber):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(".__main__"):
                continue  # runs the CLI on import
            module = importlib.import_module(info.name)
            for attr, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                    and not attr.startswith("_")
                    and not issubclass(value, HotReloadError)
                ):
                    strays.append(f"{module.__name__}.{attr}")
    assert strays == []
