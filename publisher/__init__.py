"""hotreload publisher: the file watcher, the per-pod daemon and the operator CLI.

``FileWatcher`` is the single-process core (no Redis); ``MountWatcher`` reports the keys of a
whole mount directory; ``Publisher`` is compare-and-publish; ``Daemon`` is ``hotreload watch``.
"""

from publisher.daemon import Daemon
from publisher.publish import Publisher, PublishResult
from publisher.watcher import FileWatcher, MountWatcher, Snapshot

__all__ = ["Daemon", "FileWatcher", "MountWatcher", "PublishResult", "Publisher", "Snapshot"]
