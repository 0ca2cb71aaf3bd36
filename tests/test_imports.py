"""What importing a public name costs: each user pays only for what they use.

A single-process user of ``from publisher import FileWatcher`` must load neither redis-py nor
prometheus_client (nor the daemon); importing ``subscriber.errors`` must not load redis-py.
Both packages therefore resolve their public names lazily, and every name in their
``__all__`` must still resolve. Checked in fresh interpreters: this test process has long
imported everything.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

HEAVY = ("redis", "prometheus_client", "publisher.daemon", "publisher.publish")


def fresh_modules(code: str) -> object:
    """Run ``code`` in a new interpreter; it prints a JSON report on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_file_watcher_loads_neither_redis_nor_prometheus() -> None:
    report = fresh_modules(
        f"""
        import json, os, sys, tempfile
        from publisher import FileWatcher
        after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "app.yaml")
        with open(path, "w") as file:
            file.write("v1")
        with FileWatcher(path, lambda content: None) as watcher:
            content = watcher.content
        after_use = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps({{"after_import": after_import, "after_use": after_use,
                          "content": content}}))
        """
    )
    assert report == {"after_import": [], "after_use": [], "content": "v1"}


def test_subscriber_errors_load_no_redis() -> None:
    report = fresh_modules(
        """
        import json, sys
        from subscriber.errors import ConfigurationError
        import subscriber
        subscriber.HotReloadError
        print(json.dumps({"redis": "redis" in sys.modules}))
        """
    )
    assert report == {"redis": False}


def test_subscriber_names_still_resolve_on_first_use() -> None:
    report = fresh_modules(
        """
        import json, sys
        import subscriber
        before = "redis" in sys.modules
        cls = subscriber.Subscriber
        print(json.dumps({"before": before, "after": "redis" in sys.modules,
                          "name": cls.__module__ + "." + cls.__qualname__}))
        """
    )
    assert report == {"before": False, "after": True, "name": "subscriber.client.Subscriber"}


@pytest.mark.parametrize("package", ["publisher", "subscriber"])
def test_every_public_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__name__", name) == name, (package, name)
        assert name in dir(module)
    exec(f"from {package} import *", {})  # noqa: S102 - the star import uses __all__ too
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(module, "nonexistent")  # noqa: B009 - the lazy lookup's failure is the test


def test_submodules_still_import_from_the_package() -> None:
    report = fresh_modules(
        """
        import json
        from publisher import daemon, filewatcher, watcher
        from subscriber import client, errors
        print(json.dumps([m.__name__ for m in (daemon, filewatcher, watcher, client, errors)]))
        """
    )
    assert report == [
        "publisher.daemon",
        "publisher.filewatcher",
        "publisher.watcher",
        "subscriber.client",
        "subscriber.errors",
    ]
