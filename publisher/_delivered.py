"""What a ``MountWatcher`` reported last, and what a new read changes of it.

Split from ``publisher.watcher`` (which decides when to read and on which thread) because it
answers a question of its own: given one consistent read (``publisher._mount.MountRead``),
which keys changed, appeared, disappeared or became unreadable since the last report.
Content is compared byte for byte, except keys the pre-read already found equal to what
was reported (``publisher._preread``): a 1,000-key volume's swap compares only what changed.
``UnreadKeys`` says, once per reason, which keys a read left out.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from types import MappingProxyType

from publisher._mount import MountContent, MountRead, resolve_target
from publisher._printable import printable

__all__ = ["Delivered", "UnreadKeys"]


class Delivered:
    """The content reported last (``accept``); the watcher's reading thread alone uses it.
    ``files`` is replaced, never changed, by ``accept``: the pre-read's baseline is the very
    mapping it compared with (``read.same``), so a report in between voids its comparison."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self.files: dict[str, bytes] = {}
        self.target: str | None = None  # the ..data target of what was delivered
        self.unreadable: dict[str, OSError] = {}

    def accept(self, content: MountContent) -> None:
        self.target = content.target
        self.files = dict(content.files)
        self.unreadable = dict(content.unreadable)

    def same_target(self) -> bool:
        """Whether a resync of a still watched directory may skip reading: a kubelet volume
        whose ``..data`` still points at the target all was delivered from, no key unreadable.
        A target never changes once swapped in: 1,000 keys took 20 ms every 30 s to find
        nothing. A lost swap event changes the target, and is read as before."""
        if self.target is None or self.unreadable:
            return False
        try:
            return resolve_target(self._directory) == self.target
        except OSError:
            return False

    def compare(self, read: MountRead, kept: Collection[str]) -> MountContent | None:
        """A ``MountContent`` of ``read`` if anything differs from what was delivered, else
        None; ``kept`` keys were not read (or not trusted yet) and stay as delivered."""
        delivered = self.files
        files = {n: d for n, d in read.files.items() if n not in kept} if kept else read.files
        unreadable = dict(read.unreadable)
        for name in {*kept, *read.unreadable}:
            if name in delivered:
                files[name] = delivered[name]
            if name in kept and name in self.unreadable:  # not read: as it was
                unreadable[name] = self.unreadable[name]
        baseline, same = read.same  # found equal to what is delivered by the pre-read
        unsure = files.keys() - (same if baseline is delivered else ())
        changed = frozenset(n for n in unsure if delivered.get(n) != files[n])
        removed = frozenset(delivered.keys() - files.keys())
        if not changed and not removed and self.unreadable.keys() == unreadable.keys():
            return None
        return MountContent(
            directory=self._directory,
            target=read.target,
            files=MappingProxyType(files),
            changed=changed,
            removed=removed,
            unreadable=MappingProxyType(unreadable),
        )


class UnreadKeys:
    """Says, once, which keys a directory's reads left out and why (a WARNING each); again
    only when the reason changes. An unreadable key's reason is its errno, not the text: a
    file over the limit that keeps growing is one line, not one per append."""

    def __init__(self, directory: str, log: logging.Logger) -> None:
        self._directory = directory
        self._log = log
        self._said: dict[str, str] = {}  # key -> the reason last logged

    def report(self, read: MountRead, held: Collection[str]) -> None:
        """Log what ``read`` left out that was not said yet; ``held`` keys were not read."""
        said: dict[str, str] = {}
        for name, reason in read.skipped.items():
            said[name] = reason
            if self._said.get(name) != reason:
                self._log.warning(
                    "%s: %s is not read: %s", self._directory, printable(name, limit=None), reason
                )
        for name, exc in read.unreadable.items():
            said[name] = f"errno {exc.errno}"
            if self._said.get(name) != said[name]:
                self._log.warning(
                    "%s: %s cannot be read: %s; its previous content, if any, stays in use",
                    self._directory,
                    printable(name, limit=None),
                    exc.strerror or exc,
                )
        # a held key was not read at all: what was said about it still holds
        self._said = {n: r for n, r in self._said.items() if n in held} | said
