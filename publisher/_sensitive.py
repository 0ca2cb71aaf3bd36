"""Which mounted keys are secrets: the daemon marks their events ``sensitive``.

kubelet backs the volumes it writes with an ``emptyDir`` of its own, and the medium tells
them apart: a **Secret** volume (and a ``projected`` or ``downwardAPI`` one, which can carry
Secrets and service account tokens) is ``Medium: Memory`` -- a ``tmpfs`` mounted on the
volume directory, so secrets never touch the node's disk -- while a **ConfigMap** volume is
disk-backed (the node's filesystem: ext4, xfs, overlay). Inside the container the volume
directory is a bind mount whose filesystem type ``/proc/self/mountinfo`` states. So a watched
directory on ``tmpfs`` or ``ramfs`` is treated as a Secret mount and all its keys as
sensitive. This over-marks rather than under-marks: a ConfigMap projected through a
``projected`` volume, or files in a memory ``emptyDir``, are marked too, which only means that
``hotreload show/diff`` need ``--reveal`` for them. ``--sensitive KEY`` marks any other key.
"""

from __future__ import annotations

import os

from publisher._mount import MOUNTINFO, unescape_mountinfo

__all__ = ["MEMORY_FILESYSTEMS", "filesystem_type", "memory_backed"]

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_type(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> str | None:
    """The filesystem type of the mount holding ``path`` (``None``: cannot tell).

    The mount is the one with the longest mount point that contains the resolved path; of
    mounts stacked on one mount point the last listed (the visible one) wins.
    """
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                fields = line.split()
                try:
                    separator = fields.index("-", 6)
                    mount_point, fstype = unescape_mountinfo(fields[4]), fields[separator + 1]
                except (ValueError, IndexError):
                    continue  # not a mountinfo line
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and (best is None or len(mount_point) >= best[0]):
                    best = (len(mount_point), fstype)
    except OSError:
        return None
    return best[1] if best is not None else None


def memory_backed(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> str | None:
    """The filesystem type if ``path`` is on a memory filesystem (a Secret mount), else None."""
    fstype = filesystem_type(path, mountinfo)
    return fstype if fstype in MEMORY_FILESYSTEMS else None
