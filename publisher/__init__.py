"""hotreload publisher: the file watcher, the per-pod daemon and the operator CLI.

``FileWatcher`` is the single-process core (no Redis); ``MountWatcher`` reports the keys of a
whole mount directory as ``MountContent``; ``Publisher`` is compare-and-publish; ``Daemon`` is
``hotreload watch``.

The public names are loaded lazily, on first use (a module ``__getattr__``, as stamina does):
``from publisher import FileWatcher`` must cost a single-process user a file watcher, not Redis,
prometheus_client and the daemon; and importing ``publisher.cli`` or ``publisher.inspect`` must
not load watchdog or prometheus_client, which only the ``[publisher]`` extra installs (the query
commands run where only redis and msgspec are).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publisher.daemon import Daemon
    from publisher.filewatcher import FileWatcher
    from publisher.publish import Publisher, PublishResult
    from publisher.watcher import MountContent, MountWatcher

__all__ = ["Daemon", "FileWatcher", "MountContent", "MountWatcher", "PublishResult", "Publisher"]

_HOMES = {
    "Daemon": "publisher.daemon",
    "FileWatcher": "publisher.filewatcher",
    "MountContent": "publisher.watcher",
    "MountWatcher": "publisher.watcher",
    "PublishResult": "publisher.publish",
    "Publisher": "publisher.publish",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
