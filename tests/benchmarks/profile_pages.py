"""Which inherited pages a running Subscriber copies in a forked worker, and why (issue 21).

    python -m tests.benchmarks.profile_pages [--mode running|imported] [--metrics on|off]
        [--trace] [--warm] [--children] [--json FILE] [--top N]

Emulates gunicorn's ``preload_app``: this process (the "master") imports the example app
(``deploy/example/app.py``: 2 subscribers, Prometheus metrics) and runs ``pre_fork``, then
forks one worker and waits, touching nothing. The worker runs ``post_worker_init`` (mode
``running``; ``imported`` starts nothing), applies 5 updates (published by a helper process
started before the fork), waits past a heartbeat, then compares every page of its writable
private mappings with the master's: a page whose frame differs (``/proc/PID/pagemap``, root
only) is private to the worker. Such a page is diffed word by word against the master's copy
(``/proc/PPID/mem``) and each changed 8-byte word is put down to the object lying there
(every object reachable from ``gc.get_objects()`` and ``sys.modules``, by ``id()`` and
size) and to what changed in it:

- ``refcnt``: the object's first word (its reference count);
- ``bytecode``: inside a code object's instructions (the adaptive interpreter quickens and
  specialises them in place, and writes its inline caches there);
- ``gc_head``: the two words before a container (a collection linking it);
- ``field``: any other word of an object (a dict's or list's contents pointer, a
  function's version, ...);
- ``untracked``: in no object found (the allocator's own words, a dict's key table, objects
  freed since, memory of C libraries);

and a page present in the worker only is ``new`` (its mapping: a thread stack, a new arena).
The private pages of every other mapping (a file mapped shared, as prometheus_client maps its
multiprocess files; read-only ones) are listed from ``/proc/PID/smaps``, by mapping.
Each page's 4 KiB is shared among its changed words; the table sums them per module of the
object (a function's or code's module; a constant's code's; anything else: its type's). A
page that differs from the master's frame but not in content was written and restored (a
reference count up and down again): ``transient``, shared among the objects starting on it.

``--metrics off`` as the bench's quiet app; ``--trace``: the worker's live allocations by
``tracemalloc``. Two experiments, not what a master may do: ``--warm``, a real start and stop
of throwaway subscribers in the master, against Redis; ``--children``, the metrics' counter
and histogram label children created in the master. Set ``PROMETHEUS_MULTIPROC_DIR`` (an
empty directory) to profile Prometheus' multiprocess mode, as the bench runs it. One run
varies by ~0.15 MiB: compare several.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "example"
UPDATES = 5

_UPDATER = r"""
import sys, time
from publisher.publish import Publisher
from subscriber._redis import connect
client = connect(sys.argv[1], socket_timeout=15)
pub = Publisher(client)
def limits(seq):
    return b"default:\n  requests_per_second: %d\n  burst: 10\n" % seq
pub.publish("rate_limits.yaml", limits(1))
pub.publish("flags.json", b'{"a": true}')
print("ready", flush=True)
for line in sys.stdin:
    pub.publish("rate_limits.yaml", limits(int(line)))
    print("done", flush=True)
"""


def _writable_ranges(pid: int | str) -> list[tuple[int, int, str]]:
    found = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if parts[1][:2] != "rw" or parts[1][3] != "p":
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            found.append((lo, hi, parts[5].strip() if len(parts) > 5 else "[anon]"))
    return found


def other_private(pid: int | str) -> dict[str, float]:
    """USS (KiB, ``Private_Clean + Private_Dirty`` in smaps) of the mappings the page diff
    does not look at: shared ones (an ``mmap`` of a file: the kernel maps up to 16 pages
    around each fault, counted whole as the worker's) and read-only ones. Session 7's writer
    mapped its four metric files: 256 KiB of USS per worker that the diff never saw."""
    found: dict[str, float] = defaultdict(float)
    skip = True
    name = ""
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                skip = parts[1][:2] == "rw" and parts[1][3] == "p"
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif not skip and parts[0] in ("Private_Clean:", "Private_Dirty:") and parts[1] != "0":
                found[f"{name} ({parts[0][:-1]})"] += int(parts[1])
    return dict(found)


def snapshot() -> dict[str, Any]:
    """The worker's private pages, with its and the master's copies; first thing, before the
    analysis allocates anything much."""
    parent = os.getppid()
    ranges = _writable_ranges("self")
    mine = os.open("/proc/self/pagemap", os.O_RDONLY)
    theirs = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY)
    pages: list[tuple[int, str, bool]] = []  # (address, mapping, inherited)
    for lo, hi, name in ranges:
        count = (hi - lo) // PAGE
        a = os.pread(mine, 8 * count, 8 * (lo // PAGE))
        b = os.pread(theirs, 8 * count, 8 * (lo // PAGE))
        for i in range(count):
            e = int.from_bytes(a[8 * i : 8 * i + 8], "little")
            if not e >> 63:
                continue
            f = int.from_bytes(b[8 * i : 8 * i + 8], "little") if len(b) > 8 * i else 0
            pfn, ppfn = e & ((1 << 55) - 1), f & ((1 << 55) - 1)
            if f >> 63 and pfn == ppfn:
                continue  # shared
            pages.append((lo + i * PAGE, name, bool(f >> 63)))
    os.close(mine)
    os.close(theirs)
    pmem = os.open(f"/proc/{parent}/mem", os.O_RDONLY)
    smem = os.open("/proc/self/mem", os.O_RDONLY)
    copies = []
    for address, _name, inherited in pages:
        if inherited:
            copies.append((os.pread(smem, PAGE, address), os.pread(pmem, PAGE, address)))
        else:
            copies.append((b"", b""))
    os.close(pmem)
    os.close(smem)
    return {"pages": pages, "copies": copies}


def _module_of_file(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return "/".join(rest.split("/")[:2]) if marker == "site-packages/" else "stdlib:" + rest
    if str(REPO) in filename:
        return filename.replace(str(REPO) + "/", "")
    return filename


def _owner(obj: Any, inherited: str) -> str:
    if isinstance(obj, types.FunctionType):
        return _module_of_file(obj.__code__.co_filename)
    if isinstance(obj, types.CodeType):
        return _module_of_file(obj.co_filename)
    if isinstance(obj, type):
        name = obj.__module__
        if not isinstance(name, str):  # a metaclass' descriptor, not a module name
            return inherited
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        return _module_of_file(file) if file else name
    if isinstance(obj, types.ModuleType):
        file = getattr(obj, "__file__", None)
        return _module_of_file(file) if file else obj.__name__
    return inherited


_HAVE_GC = 1 << 14
_INLINE = (tuple, str, bytes, int, float, types.CodeType, complex)


def objects() -> tuple[list[int], list[tuple[int, int, Any, str]]]:
    """Every object found: (start, end, object, owner) sorted by start."""
    gc.unfreeze()
    roots = list(sys.modules.values()) + gc.get_objects()
    owner: dict[int, str] = {}
    keep: dict[int, Any] = {}
    stack = [(r, _owner(r, "?" + type(r).__name__)) for r in roots]
    while stack:
        obj, parent = stack.pop()
        if id(obj) in owner:
            continue
        mine = _owner(obj, parent)
        owner[id(obj)] = mine
        keep[id(obj)] = obj
        stack.extend((r, mine) for r in gc.get_referents(obj))
    spans = []
    for key, obj in keep.items():
        tp = type(obj)
        size = sys.getsizeof(obj) if isinstance(obj, _INLINE) else tp.__basicsize__
        gc_head = 16 if tp.__flags__ & _HAVE_GC else 0
        if isinstance(obj, _INLINE) and gc_head:
            size -= gc_head  # getsizeof counted the header
        spans.append((key - gc_head, key + size, obj, owner[key]))
    spans.sort(key=lambda s: s[0])
    return [s[0] for s in spans], spans


def classify(snap: dict[str, Any]) -> dict[str, Any]:
    starts, spans = objects()
    code_head = types.CodeType.__basicsize__ - 8
    per: dict[tuple[str, str], float] = defaultdict(float)
    new_maps: dict[str, float] = defaultdict(float)
    for (address, name, inherited), (now, then) in zip(snap["pages"], snap["copies"], strict=True):
        if not inherited:
            new_maps[name] += PAGE
            continue
        words = []
        for off in range(0, PAGE, 8):
            if now[off : off + 8] != then[off : off + 8]:
                words.append(address + off)
        if not words:
            # written and restored (a reference count up and down again), or written by the
            # master: shared among the objects starting on the page
            lo_i = bisect.bisect_left(starts, address)
            hi_i = bisect.bisect_left(starts, address + PAGE)
            owners = [spans[j][3] for j in range(lo_i, hi_i)] or ["(none)"]
            for owner in owners:
                per[(owner, "transient")] += PAGE / len(owners)
            continue
        share = PAGE / len(words)
        for word in words:
            i = bisect.bisect_right(starts, word) - 1
            # a big object may start before the nearest start: look back a little
            hit = None
            for j in range(i, max(i - 64, -1), -1):
                lo, hi, obj, owner = spans[j]
                if lo <= word < hi:
                    hit = spans[j]
                    break
            if hit is None:
                where = name if name.startswith("/") else ("heap" if name == "[heap]" else "anon")
                # pymalloc's pools are pages: a pool's header (48 bytes) is written by every
                # allocation and free in it
                if where == "anon" and word % PAGE < 48:
                    where = "pool header"
                per[("(untracked)", where)] += share
                continue
            lo, hi, obj, owner = hit
            key = id(obj)
            if word < key:
                kind = "gc_head"
            elif word == key:
                kind = "refcnt"
            elif isinstance(obj, types.CodeType) and word >= key + code_head:
                kind = "bytecode"
            else:
                kind = "field:" + type(obj).__name__
            per[(owner, kind)] += share
    return {
        "by": sorted(
            ([m, k, round(v / 1024, 1)] for (m, k), v in per.items()), key=lambda r: -r[2]
        ),
        "new": {k: round(v / 1024, 1) for k, v in new_maps.items()},
        "private_kib": len(snap["pages"]) * PAGE // 1024,
    }


def worker(mode: str, out: str, to_updater: int, from_updater: int, trace: bool = False) -> None:
    import subscriber.gunicorn as hooks

    class Log:
        def info(self, *a: Any) -> None: ...
        def error(self, *a: Any) -> None: ...

    class Worker:
        pid = os.getpid()
        log = Log()

    app = sys.modules["app"]
    if trace:
        import tracemalloc

        tracemalloc.start(6)
    if mode == "running":
        hooks.post_worker_init(Worker())
        reader = os.fdopen(from_updater, "rb", buffering=0)
        for seq in range(2, 2 + UPDATES):
            os.write(to_updater, b"%d\n" % seq)
            reader.readline()
            deadline = time.monotonic() + 10
            while app.subscribers[0].version < seq and time.monotonic() < deadline:
                time.sleep(0.01)
    else:
        gc.freeze()
    time.sleep(6)
    if trace:
        taken = tracemalloc.take_snapshot()
        tracemalloc.stop()
        lines = []
        for stat in taken.statistics("traceback")[:60]:
            frames = " < ".join(
                f"{f.filename.split('site-packages/')[-1].split('python3.11/')[-1]}:{f.lineno}"
                for f in stat.traceback[:4]
            )
            lines.append(f"{stat.size / 1024:8.1f} KiB {stat.count:6d}  {frames}")
        Path(out + ".trace").write_text("\n".join(lines))
    snap = snapshot()
    result = classify(snap)
    result["other"] = other_private("self")
    result["mode"] = mode
    Path(out).write_text(json.dumps(result))
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("running", "imported"), default="running")
    parser.add_argument("--metrics", choices=("on", "off"), default="on")
    parser.add_argument(
        "--warm", action="store_true", help="experiment: a real start/stop in the master (I/O)"
    )
    parser.add_argument("--trace", action="store_true", help="list the worker's live allocations")
    parser.add_argument(
        "--children", action="store_true", help="experiment: label children in the master"
    )
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    from subscriber.testing import RedisServer

    with (
        tempfile.TemporaryDirectory(prefix="hr-pages-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        updater = subprocess.Popen(
            [sys.executable, "-c", _UPDATER, server.url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        try:
            assert updater.stdout is not None
            assert updater.stdin is not None
            updater.stdout.readline()
            os.environ["HOTRELOAD_REDIS_URL"] = server.url
            os.environ["HOTRELOAD_CONFIG_DIR"] = str(EXAMPLE / "config")
            sys.path.insert(0, str(EXAMPLE))
            if args.metrics == "off":  # as the bench's "quiet" app
                from functools import partialmethod

                from subscriber import Subscriber

                quiet = partialmethod(Subscriber.__init__, metrics=False)
                Subscriber.__init__ = quiet  # type: ignore[method-assign,assignment]
            import app  # noqa: F401 -- preload_app

            import subscriber.gunicorn as hooks

            class Server:
                log = None

            if args.warm:
                from subscriber import Subscriber

                for _ in range(3):
                    for key in ("rate_limits.yaml", "flags.json"):
                        warm = Subscriber(key, lambda content: None, metrics=False)
                        warm.start()
                        warm.stop()
            hooks.pre_fork(Server(), None)
            if args.children:
                from subscriber.metrics import metrics_for

                m = metrics_for(None)
                assert m is not None
                for key in ("rate_limits.yaml", "flags.json"):
                    m.applied.labels(key)
                    m.rejected.labels(key)
                    m.apply_seconds.labels(key)
                    m.connection_errors.labels(key)
            out = str(Path(tmp) / "result.json")
            to_fd, from_fd = updater.stdin.fileno(), updater.stdout.fileno()
            pid = os.fork()
            if pid == 0:
                try:
                    worker(args.mode, out, to_fd, from_fd, args.trace)
                except BaseException:
                    import traceback

                    traceback.print_exc()  # the worker's own failure, not the missing result's
                finally:
                    os._exit(1)
            os.waitpid(pid, 0)
            result = json.loads(Path(out).read_text())
            if args.trace:
                print(Path(out + ".trace").read_text())
        finally:
            updater.kill()
            updater.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(f"mode {result['mode']}: private {result['private_kib']} KiB")
    print("new pages (KiB):", result["new"])
    print("private pages of shared or read-only mappings (KiB, smaps):", result["other"])
    totals: dict[str, float] = defaultdict(float)
    kinds: dict[str, float] = defaultdict(float)
    for module, kind, kib in result["by"]:
        totals[module] += kib
        kinds[kind.split(":")[0]] += kib
    print("by kind (KiB):", {k: round(v) for k, v in sorted(kinds.items(), key=lambda x: -x[1])})
    print("by module (KiB):")
    for module, kib in sorted(totals.items(), key=lambda x: -x[1])[: args.top]:
        print(f"  {kib:8.1f}  {module}")
    print("top (module, kind):")
    for module, kind, kib in result["by"][: args.top]:
        print(f"  {kib:8.1f}  {module}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
