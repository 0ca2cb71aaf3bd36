"""hotreload publisher: the file watcher, the per-pod daemon and the operator CLI.

``FileWatcher`` is the single-process core (no Redis); ``MountWatcher`` reports the keys of a
whole mount directory; ``Publisher`` is compare-and-publish; ``Daemon`` is ``hotreload watch``.

The names are loaded on first use (PEP 562): importing ``publisher.cli`` or
``publisher.inspect`` must not load watchdog or prometheus-client, which only the
``[publisher]`` extra installs (the query commands run where only redis and msgspec are).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publisher.daemon import Daemon
    from publisher.publish import Publisher, PublishResult
    from publisher.watcher import FileWatcher, MountWatcher, Snapshot

__all__ = ["Daemon", "FileWatcher", "MountWatcher", "PublishResult", "Publisher", "Snapshot"]

_MODULE_OF = {
    "Daemon": "publisher.daemon",
    "FileWatcher": "publisher.watcher",
    "MountWatcher": "publisher.watcher",
    "PublishResult": "publisher.publish",
    "Publisher": "publisher.publish",
    "Snapshot": "publisher.watcher",
}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'publisher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value
