"""What ``hotreload watch`` watches and publishes, decided once, before anything runs.

The command line names PATHs (directories, or single files) and ``--snapshot NAME[=DIR]``s;
the daemon needs them as one watch per directory, each directory's keys published one by
one and/or as one snapshot key, and which keys are secrets. Deciding that up front, from the
file system as it is at start, lets every mistake that cannot work (a missing path, a key
name two PATHs would both publish, a snapshot named like a published key) be refused with a
``ConfigurationError`` before the daemon touches Redis, and leaves the running parts (intake,
publishing, the signing key file) plain lookups in a frozen ``Plan``.

Sensitive keys: those named by ``--sensitive`` and every key of a memory-backed directory (a
Secret volume; see ``publisher._sensitive``) -- also a single file mounted on its own from a
Secret (``subPath``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from publisher._sensitive import memory_backed
from subscriber.errors import ConfigurationError
from subscriber.keys import validate_key

__all__ = ["MountSpec", "Plan", "keys_in", "plan_mounts", "plan_snapshots"]


@dataclass(frozen=True, slots=True)
class MountSpec:
    """One directory to watch: every key in it (``keys is None``) or only the named files."""

    directory: str
    keys: frozenset[str] | None


def plan_mounts(paths: Sequence[str | os.PathLike[str]]) -> list[MountSpec]:
    """Group PATH arguments into one watch per directory; refuse what cannot work.

    A directory publishes all its keys; a file publishes itself (several files of one
    directory share one watch). Raises ``ConfigurationError`` for a missing path or a key name
    that two paths would both publish.
    """
    if not paths:
        raise ConfigurationError("no PATH given: name a ConfigMap mount directory or a file")
    whole: dict[str, None] = {}
    single: dict[str, set[str]] = {}
    for raw in paths:
        path = Path(raw).absolute()
        if path.is_dir():
            whole[str(path)] = None
        elif path.is_file():
            validate_key(path.name)
            real, parent = os.path.realpath(path), os.path.realpath(path.parent)
            if not real.startswith(parent.rstrip(os.sep) + os.sep):
                # the watcher reads only inside the directory (see publisher._mount)
                raise ConfigurationError(
                    f"{raw} is a symlink leading out of its directory (to {real}); "
                    "name the file it leads to instead"
                )
            single.setdefault(str(path.parent), set()).add(path.name)
        else:
            raise ConfigurationError(f"{raw}: no such file or directory")
    specs = [MountSpec(directory, None) for directory in whole]
    specs += [
        MountSpec(directory, frozenset(names))
        for directory, names in single.items()
        if directory not in whole  # a file inside a watched directory is already covered
    ]
    owner: dict[str, str] = {}
    for spec in specs:
        names = spec.keys if spec.keys is not None else keys_in(spec.directory)
        for name in names:
            if name in owner:
                raise ConfigurationError(
                    f"key {name!r} would be published from both {owner[name]} and "
                    f"{spec.directory}; keys must be unique across PATHs"
                )
            owner[name] = spec.directory
    return specs


def plan_snapshots(
    snapshots: Mapping[str, str | os.PathLike[str]], mounts: Sequence[MountSpec]
) -> dict[str, str]:
    """Validate snapshot name -> directory; ``ConfigurationError`` for what cannot work."""
    planned: dict[str, str] = {}
    for name, raw in snapshots.items():
        validate_key(name)
        directory = Path(raw).absolute()
        if not directory.is_dir():
            raise ConfigurationError(f"--snapshot {name}: {raw} is not a directory")
        planned[name] = str(directory)
    for spec in mounts:
        names = spec.keys if spec.keys is not None else keys_in(spec.directory)
        for name in sorted(planned.keys() & set(names)):
            raise ConfigurationError(
                f"snapshot name {name!r} is also a key published from {spec.directory}; "
                "pick another --snapshot name"
            )
    return planned


def keys_in(directory: str) -> list[str]:
    """The config keys a directory holds now (kubelet's ``..data`` and the like excluded)."""
    return [name for name in os.listdir(directory) if not name.startswith(".")]


@dataclass(frozen=True, slots=True)
class Plan:
    """Every directory the daemon watches and what it publishes from each (see ``make``)."""

    mounts: tuple[MountSpec, ...]
    snapshots: Mapping[str, str]
    """Snapshot key name -> the directory published as that one key."""
    per_key: Mapping[str, frozenset[str] | None]
    """Directory -> the keys published one by one from it (None: all of them)."""
    snapshots_of: Mapping[str, tuple[str, ...]]
    """Directory -> the snapshot names it is published as."""
    secret_dirs: Mapping[str, str]
    """Memory-backed (Secret) directory -> its filesystem type: all its keys are sensitive."""
    sensitive_keys: frozenset[str]
    """Keys sensitive wherever they come from (``--sensitive``, single files from a Secret)."""

    @classmethod
    def make(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        snapshots: Mapping[str, str | os.PathLike[str]] | None = None,
        sensitive: Collection[str] = (),
    ) -> Plan:
        """Plan PATHs and snapshots (PATHs may be empty when there are snapshots)."""
        mounts = plan_mounts(paths) if paths or not snapshots else []
        planned = plan_snapshots(snapshots or {}, mounts)
        snapshots_of: dict[str, list[str]] = {}
        for name, directory in sorted(planned.items()):
            snapshots_of.setdefault(directory, []).append(name)
        named = {validate_key(name) for name in sensitive}
        secret_dirs: dict[str, str] = {}
        for spec in mounts:
            fstype = memory_backed(spec.directory)
            if fstype is not None:
                secret_dirs[spec.directory] = fstype
            for name in spec.keys or ():  # a file mounted on its own (subPath) from a Secret
                if memory_backed(os.path.join(spec.directory, name)):
                    named.add(name)
        for directory in planned.values():
            fstype = memory_backed(directory)
            if fstype is not None:
                secret_dirs[directory] = fstype
        return cls(
            mounts=tuple(mounts),
            snapshots=planned,
            per_key={spec.directory: spec.keys for spec in mounts},
            snapshots_of={d: tuple(names) for d, names in snapshots_of.items()},
            secret_dirs=secret_dirs,
            sensitive_keys=frozenset(named),
        )

    def watches(self) -> list[tuple[str, frozenset[str] | None]]:
        """Each directory to watch and the keys to watch in it (None: every key)."""
        per_key, snapshots_of = self.per_key, self.snapshots_of
        return [
            # a snapshot needs every key of its directory, whatever is published per key
            (directory, None if directory in snapshots_of else per_key[directory])
            for directory in [*per_key, *(d for d in snapshots_of if d not in per_key)]
        ]

    def is_sensitive(self, name: str, directory: str) -> bool:
        return name in self.sensitive_keys or directory in self.secret_dirs

    def publishing(self, path: str) -> str | None:
        """Why the file ``path`` (absolute) could be published, or None if it cannot be.

        Not only a key of a watched directory: a symlink in one may lead to any file below it
        (``publisher._mount`` reads what stays inside), so nothing under a watched directory,
        by its path or by where it really is, is safe from being published.
        """
        directory, name = os.path.split(path)
        for spec in self.mounts:
            if directory == spec.directory and (spec.keys is None or name in spec.keys):
                return f"inside the watched {directory}: it would be published as a config key"
        if directory in self.snapshots_of:
            return f"inside {directory}, published as a snapshot: it would be published"
        places = {path, os.path.realpath(path)}
        for watched in [*self.per_key, *self.snapshots_of]:
            for top in {watched, os.path.realpath(watched)}:
                if any(place.startswith(top.rstrip(os.sep) + os.sep) for place in places):
                    return (
                        f"under the watched {watched}: a symlink there could publish it as a "
                        "config key"
                    )
        return None
