"""The subscriber's metric values written straight into prometheus_client's multiprocess files.

Why: under gunicorn's ``preload_app`` a worker shares the master's pages until it writes to
them, and CPython 3.11 writes the reference counts (and quickening caches) of every code
object, function and constant it runs. Recording one value through prometheus_client runs
``labels()``, ``MmapedValue``, ``MmapedDict``, ``json.dumps`` and their locks: measured, the
worker copies 0.57-0.72 MiB of inherited pages for it (docs/performance.md, memory per gunicorn
worker), whatever the number of values. This module is the few lines that do the same writes.

The format is prometheus_client's ``MmapedDict`` (checked byte for byte against it in
tests/test_promfiles.py): a file preallocated to 64 KiB and doubled when full; a 4-byte
``used`` header, 4 bytes of padding, then entries -- a 4-byte key length, the UTF-8 key padded
with spaces to 8-byte alignment, an 8-byte value and an 8-byte timestamp (0.0). The key is
``json.dumps([metric_name, sample_name, labels, help], sort_keys=True)``.

Written with ``pread``/``pwrite``, not through an ``mmap`` as prometheus_client writes them.
A shared file mapping the worker touches is counted whole in its RSS and USS: the kernel maps
the 16 pages around a faulting page at once (fault-around, 64 KiB) and they are the worker's
alone (``Private_Clean``). Measured in ``/proc/PID/smaps`` of the example app's workers: each
of the four files (counters, histogram, two live gauges) was a 64 KiB mapping, Rss = USS = 64
KiB, 256 of the 381 KiB that metrics on added over metrics off (2 rounds x 4 workers);
with ``pwrite`` no mapping is left and the difference was 110 KiB. The readers are content:
``MultiProcessCollector`` reads the files with ``read()``, and an ``mmap`` of the same file
(an app's own gauge in this process) sees the same page cache. The cost is a system call per
value read or written: ``record_applied`` (a counter, the histogram, the two gauges) took 7.0-7.5
µs instead of 4.0-4.1 through the mapping (20,000 calls, 2 runs each).

Which files. prometheus_client keeps one open ``MmapedDict`` per file and process, with its own
idea of where the file ends: two writers appending to one file would overwrite each other's
entries. So the counters and the histogram go to files of their own,
``counter_hotreload_<pid>.db`` and ``histogram_hotreload_<pid>.db`` (``MultiProcessCollector``
reads every ``*.db``, takes the type from the name's first part and sums counters and
histograms over files). The live gauges must keep their names, ``gauge_livemax_<pid>.db`` and
``gauge_livemin_<pid>.db``, or ``mark_process_dead`` (``subscriber.gunicorn.child_exit``) would
not drop a dead worker's; an entry is appended to them only under prometheus_client's own
multiprocess lock and only while prometheus_client has not opened that file in this process
(an app's own ``livemax`` gauge); otherwise that sample goes through prometheus_client.
"""

from __future__ import annotations

import os
import struct
import threading
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

__all__ = ["PromFiles", "sample_key"]

_INITIAL = 1 << 16  # prometheus_client's _INITIAL_MMAP_SIZE
_INT = struct.Struct("i")
_TWO = struct.Struct("dd")


def sample_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> bytes:
    """``prometheus_client.mmap_dict.mmap_key`` without running json's Python code."""
    pairs = ", ".join(f"{_quote(k)}: {_quote(labels[k])}" for k in sorted(labels))
    text = f"[{_quote(metric)}, {_quote(sample)}, {{{pairs}}}, {_quote(help_text)}]"
    return text.encode("utf-8")


class _File:
    """One MmapedDict file of this process (prometheus_client's layout and growth), written
    with ``pwrite``, not through a mapping (see the module: a mapping costs the worker 64 KiB
    of USS per file)."""

    def __init__(self, path: str) -> None:
        # a bare descriptor: open() would allocate an 8 KiB buffer per file in each worker;
        # not O_APPEND (prometheus_client's "a+b"): Linux's pwrite appends under it
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        capacity = os.fstat(self._fd).st_size
        if capacity == 0:
            os.ftruncate(self._fd, _INITIAL)
            capacity = _INITIAL
        self.capacity = capacity
        self.positions: dict[bytes, int] = {}
        self.used = _INT.unpack(os.pread(self._fd, 4, 0))[0]
        if self.used == 0:
            self.used = 8
            os.pwrite(self._fd, _INT.pack(8), 0)
        else:  # a previous process with this pid left it (counters carry on from its values)
            self.rescan()

    def rescan(self) -> None:
        """Read ``used`` and every entry's position (someone else may have appended)."""
        used = _INT.unpack(os.pread(self._fd, 4, 0))[0]
        self.capacity = max(self.capacity, os.fstat(self._fd).st_size)
        self.used = used
        data = os.pread(self._fd, used, 0)
        pos = 8
        while pos < used:
            length = _INT.unpack_from(data, pos)[0]
            key = data[pos + 4 : pos + 4 + length]
            pos += 4 + length + (8 - (length + 4) % 8)
            self.positions[key] = pos
            pos += 16

    def slot(self, key: bytes) -> int:
        """The position of ``key``'s value, appended (0.0, 0.0) when new."""
        pos = self.positions.get(key)
        if pos is None:
            padded = key + b" " * (8 - (len(key) + 4) % 8)
            entry = _INT.pack(len(key)) + padded + _TWO.pack(0.0, 0.0)
            while self.used + len(entry) > self.capacity:
                self.capacity *= 2
                os.ftruncate(self._fd, self.capacity)
            # the entry first, then ``used``: a reader never sees a half-written entry
            os.pwrite(self._fd, entry, self.used)
            self.used += len(entry)
            os.pwrite(self._fd, _INT.pack(self.used), 0)
            pos = self.positions[key] = self.used - 16
        return pos

    def read(self, pos: int) -> float:
        value: float = _TWO.unpack(os.pread(self._fd, 16, pos))[0]
        return value

    def write(self, pos: int, value: float) -> None:
        # the 16 bytes in one write, as prometheus_client assigns them in one slice
        os.pwrite(self._fd, _TWO.pack(value, 0.0), pos)

    def close(self) -> None:
        os.close(self._fd)


def _cells(value_class: Any) -> tuple[Any, dict[str, Any], dict[str, int]] | None:
    """prometheus_client's multiprocess lock, open files and pid (closure cells of its
    ``MmapedValue``), or None when this version keeps them elsewhere."""
    try:
        found: dict[str, Any] = {}
        for function in (value_class.__init__, value_class._MmapedValue__reset):
            code = function.__code__
            for name, cell in zip(code.co_freevars, function.__closure__, strict=True):
                found[name] = cell.cell_contents
        lock, files, pid = found["lock"], found["files"], found["pid"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not (hasattr(lock, "acquire") and isinstance(files, dict) and isinstance(pid, dict)):
        return None
    return lock, files, pid


class PromFiles:
    """This process's subscriber samples in the multiprocess directory (see the module).

    A value is read from its file, changed and written back under one lock: no process but
    this one writes its own files' subscriber samples, and nothing is allocated per write."""

    def __init__(self, directory: str, value_class: Any, alone: bool = False) -> None:
        self._dir = directory
        # alone: a directory no prometheus_client writes to (the master's warm-up)
        self._cells = (threading.Lock(), {}, {"value": -1}) if alone else _cells(value_class)
        self._lock = threading.Lock()
        self._pid = -1
        self._files: dict[str, _File] = {}
        self._theirs: set[tuple[str, bytes]] = set()  # live gauges prometheus_client writes

    def _file(self, prefix: str) -> _File:
        pid = os.getpid()
        if pid != self._pid:  # forked since: the parent's files are not ours
            self._pid, self._files, self._theirs = pid, {}, set()
        file = self._files.get(prefix)
        if file is None:
            # not os.path.join: code the master runs only a few times is quickened in the
            # worker, on its 8th call, which copies the page (see subscriber._warm)
            file = self._files[prefix] = _File(f"{self._dir}/{prefix}_{pid}.db")
        return file

    def _gauge_slot(self, file: _File, prefix: str, key: bytes) -> int | None:
        """A new live gauge's position, appended under prometheus_client's lock while it
        does not hold the file open; None (and from then on) when it does."""
        if (prefix, key) in self._theirs or self._cells is None:
            return None
        lock, files, pid = self._cells
        with lock:
            if pid.get("value") == self._pid and prefix in files:
                self._theirs.add((prefix, key))
                return None
            file.rescan()  # what prometheus_client appended before it closed the file
            return file.slot(key)

    def add(self, prefix: str, key: bytes, amount: float) -> None:
        """Add ``amount`` to a counter's sample (created at 0.0 when new)."""
        with self._lock:
            file = self._file(prefix)
            pos = file.positions.get(key)
            if pos is None:
                pos = file.slot(key)
            file.write(pos, file.read(pos) + amount)

    def set(self, prefix: str, key: bytes, value: float) -> bool:
        """Set a live gauge's sample; False when prometheus_client must write it."""
        with self._lock:
            file = self._file(prefix)
            pos = file.positions.get(key)
            if pos is None:
                pos = self._gauge_slot(file, prefix, key)
                if pos is None:
                    return False
            file.write(pos, value)
            return True

    def observe(self, prefix: str, keys: list[bytes], bounds: list[float], amount: float) -> None:
        """A histogram observation: ``keys`` are ``_sum`` then each bucket's, ``bounds`` the
        buckets' upper bounds (the last infinite); all created together, as prometheus_client
        creates a labelled histogram's values."""
        with self._lock:
            file = self._file(prefix)
            pos = file.positions.get(keys[0])
            if pos is None:
                for key in keys:
                    file.slot(key)
                pos = file.positions[keys[0]]
            file.write(pos, file.read(pos) + amount)
            for index, bound in enumerate(bounds, 1):
                if amount <= bound:
                    pos = file.positions[keys[index]]
                    file.write(pos, file.read(pos) + 1.0)
                    break

    def close(self) -> None:
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files = {}
