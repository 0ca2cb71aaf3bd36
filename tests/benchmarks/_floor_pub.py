"""The floor publisher: the least code that turns a kubelet ``..data`` swap into a stream entry.

    python -m tests.benchmarks._floor_pub MOUNT_DIR --url URL --key KEY [--stream NAME]

A watchdog observer on the mount directory (the only watch that sees kubelet's swap), asked
only for moves; when ``..data`` is renamed into place it reads the key, hashes it and
``XADD``s ``sha256`` and ``content`` when the hash changed. No settle, no resync, no
compare-and-publish script, no versions, no reconnects: what a measurement floor needs.
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import threading

import redis
from watchdog.events import DirMovedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class Publish(FileSystemEventHandler):
    def __init__(self, path: str, client: redis.Redis, stream: str) -> None:
        self.path, self.client, self.stream = path, client, stream
        self.last = ""

    def on_moved(self, event: FileSystemEvent) -> None:
        if os.path.basename(str(event.dest_path)) != "..data":
            return
        with open(self.path, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.last:
            self.client.xadd(
                self.stream, {"sha256": digest, "content": data}, maxlen=100, approximate=True
            )
            self.last = digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--stream", default="")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.url)
    handler = Publish(os.path.join(args.directory, args.key), client, args.stream or args.key)
    # the initial content, as a publisher starting on a mount would
    with open(handler.path, "rb") as fh:
        data = fh.read()
    handler.last = hashlib.sha256(data).hexdigest()
    client.xadd(handler.stream, {"sha256": handler.last, "content": data})
    observer = Observer()
    observer.schedule(
        handler, args.directory, recursive=False, event_filter=[FileMovedEvent, DirMovedEvent]
    )
    observer.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    observer.stop()
    observer.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
