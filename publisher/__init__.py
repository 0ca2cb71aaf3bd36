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

from typing import TYPE_CHECKING

from subscriber._lazy import lazy_names

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

__getattr__, __dir__ = lazy_names(globals(), _HOMES, __all__)
