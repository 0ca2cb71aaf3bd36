"""Public names loaded on first use (PEP 562), for the packages' ``__init__`` modules.

``from publisher import FileWatcher`` must cost a file watcher, and ``import subscriber`` no
Redis client, until the name is used: each ``__init__`` lists where its names live and takes
its module ``__getattr__`` and ``__dir__`` from :func:`lazy_names`. Imports nothing itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(
    namespace: dict[str, object], homes: Mapping[str, str], public: list[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the module whose globals are ``namespace``."""
    module = namespace["__name__"]

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # the next lookup does not come here
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *public})

    return __getattr__, __dir__
