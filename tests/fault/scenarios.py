"""The faults, each a function that injects it into a running :class:`Pod`, changes the config
while it lasts, and returns how long every live worker took to run the newest content after
the fault ended, and the CPU the waiting processes used meanwhile.

tests/fault/test_faults.py runs each once on a fresh pod; tests/fault/test_fault_soak.py runs
them in a seeded random order on one pod for ``SOAK_SECONDS``. So the assertions here hold on
any pod, whatever ran before. Fault windows are fixed durations on purpose: they are the fault;
everything else polls with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

from subscriber.keys import stream_keys
from subscriber.protocol import sha256_hex
from tests.fault.pod import BLOCK_MS, KEY, REJECT, Pod
from tests.helpers import published_long_ago, wait_until
from tests.workers.harness import acks, state_of

# While a dependency is away the processes left waiting must not spin: each stays under this
# share of one core (measured figures are far lower; the bound is loose for 2 busy cores).
IDLE_SHARE_PCT = 5.0


@dataclass
class Outcome:
    changed: str  # what changed in the config while the fault lasted
    reconverge_s: list[float]  # fault over -> every live worker runs the newest content
    cpu: dict[str, Any] | None  # while something was away; None if nothing was
    extra: dict[str, Any] = field(default_factory=dict)


def assert_idle(cpu: dict[str, Any], *, daemon: bool = True) -> None:
    assert cpu["worker_max_pct"] < IDLE_SHARE_PCT, cpu
    if daemon:
        assert cpu["daemon_pct"] < IDLE_SHARE_PCT, cpu


def newest_entry(pod: Pod) -> tuple[int, str]:
    _, fields = pod.stream()[-1]
    return int(fields[b"version"]), fields[b"content"].decode()


def rejected_by_all(pod: Pod) -> bool:
    states = [state_of(w, pod.redis.url, KEY) for w in pod.live_workers()]
    return all(s is not None and s.status == "rejected" for s in states)


# -- Redis away -------------------------------------------------------------------------------


def redis_kill9(pod: Pod, *, keep_data: bool) -> Outcome:
    """kill -9; two config changes while Redis is down; restarted empty or from its AOF."""
    version_before = newest_entry(pod)[0]
    entries_before = len(pod.stream())
    if keep_data:
        time.sleep(1.1)  # appendfsync everysec: what was written is on disk
    pod.redis.kill()
    if not keep_data:
        shutil.rmtree(pod.redis.directory / "appendonlydir", ignore_errors=True)
    cpu = pod.cpu_window()
    time.sleep(1.0)
    pod.write()
    pod.write()  # only the newest is published once Redis is back
    time.sleep(2.0)
    figures = cpu.finish()
    pod.redis.start()
    took = pod.reconverge()
    version, text = newest_entry(pod)
    assert text == pod.written[-1]
    # the daemon's version floor: numbering continues even after the data was lost
    assert version == version_before + 1
    if not keep_data:
        assert len(pod.stream()) == 1
    elif entries_before < 90:  # (approximate trimming keeps at least the last 100)
        assert len(pod.stream()) == entries_before + 1
    assert_idle(figures)
    return Outcome("2 updates while Redis was down (3 s); the newest published", [took], figures)


def redis_rollback(pod: Pod) -> Outcome:
    """Redis comes back with older data: its AOF from before the last update (a restored
    backup, a failover to a replica that lagged), and the config changed while it was away.
    The daemon publishes the new config above what anyone saw; a worker that reconnects
    first finds the stream behind it and holds its config (never the older entry)."""
    time.sleep(1.1)  # appendfsync everysec: on disk
    saved = pod.directory / f"aof-{pod.rev}"
    shutil.rmtree(saved, ignore_errors=True)  # (the soak may come back to this revision)
    shutil.copytree(pod.redis.directory / "appendonlydir", saved)
    newer = pod.write()
    pod.reconverge(newer)
    time.sleep(1.1)
    pod.redis.kill()
    cpu = pod.cpu_window()
    shutil.rmtree(pod.redis.directory / "appendonlydir")
    shutil.copytree(saved, pod.redis.directory / "appendonlydir")
    time.sleep(1.0)
    pod.write()  # and one more change while Redis is away
    time.sleep(1.0)
    figures = cpu.finish()
    pod.redis.start()
    took = pod.reconverge()
    assert_idle(figures)
    return Outcome(
        "1 update, then Redis killed and restarted from its AOF of before it; 1 more update "
        "while down (2 s)",
        [took],
        figures,
    )


def _restore_rdb(pod: Pod, backup: Path) -> None:
    """Start the stopped Redis from ``backup`` (an RDB), as an operator restores one: with
    AOF on, Redis would load its AOF and ignore the RDB, so it starts with AOF off and turns
    it on again (which rewrites the AOF from what it loaded)."""
    shutil.copyfile(backup, pod.redis.directory / "dump.rdb")
    appendonly = pod.redis.appendonly
    if appendonly:
        shutil.rmtree(pod.redis.directory / "appendonlydir", ignore_errors=True)
        pod.redis.appendonly = False
    try:
        pod.redis.start()
    finally:
        pod.redis.appendonly = appendonly
    if appendonly:
        admin = pod.client()
        try:
            admin.config_set("appendonly", "yes")
        finally:
            admin.close()


def redis_restore_older_rdb(pod: Pod, *, newer: int = 2) -> Outcome:
    """Redis stopped and started from an RDB saved ``newer`` revisions ago, while the
    workers run the newest; the mount unchanged. Twice: with the daemon running, then with
    the daemon stopped too and started again with Redis (it remembers nothing: only the
    workers know how far versions went). Each worker holds its config ("holding": the stream
    is behind it) until the mount's content is published above what it saw, and adopts that
    version without running its callback again. Every version published after the restore
    is above what the workers had seen (none at or below it, nor one content twice)."""
    times = []
    figures = None
    for restart_daemon in (False, True):
        backup = pod.directory / f"backup-{pod.rev}.rdb"
        admin = pod.client()
        try:
            admin.save()
        finally:
            admin.close()
        shutil.copyfile(pod.redis.directory / "dump.rdb", backup)
        restored = pod.highest_version()  # the backup's newest version
        for _ in range(newer):
            pod.reconverge(pod.write())
        above = pod.highest_version()
        applied = sum(len(w.applied()) for w in pod.workers)
        daemon = pod.live_daemons()[0]
        if restart_daemon:
            pod.kill(daemon.pid, signal.SIGTERM)
        pod.redis.stop()
        cpu = pod.cpu_window()
        time.sleep(1.0)
        window = cpu.finish()
        figures = figures or window
        _restore_rdb(pod, backup)
        began = time.monotonic()
        if restart_daemon:
            pod.start_daemon(*pod.daemon_args)
        pod.readopted(above)
        times.append(time.monotonic() - began)
        # published above what the workers had seen, never at or below it (a daemon restarted
        # with Redis waits for the workers' rows: publisher/_restored.py)
        since = [int(f[b"version"]) for _, f in pod.stream() if int(f[b"version"]) > restored]
        assert since, "nothing published after the restore"
        assert min(since) > above, f"v{min(since)} published, the workers at v{above}"
        assert pod.highest_version() > above
        assert sum(len(w.applied()) for w in pod.workers) == applied  # adopted, not re-applied
    assert figures is not None
    assert_idle(figures)
    return Outcome(
        f"none: Redis stopped (1 s) and started from an RDB {newer} updates old, the daemon "
        "running; again with the daemon restarted along with Redis",
        times,
        figures,
    )


def redis_freeze(pod: Pod) -> Outcome:
    """SIGSTOP for longer than the block time plus the socket timeout margin."""
    freeze_s = BLOCK_MS / 1000 + 3.0 + 1.5
    lost = {w.pid: w.log().count("lost Redis") for w in pod.live_workers()}
    pod.redis.freeze()
    try:
        cpu = pod.cpu_window()
        time.sleep(1.0)
        pod.write()
        time.sleep(freeze_s - 1.0)
        figures = cpu.finish()
    finally:
        pod.redis.thaw()
    took = pod.reconverge()
    # noticed by the socket timeout, not by luck: every worker logged the lost connection
    assert all(w.log().count("lost Redis") > lost[w.pid] for w in pod.live_workers())
    assert_idle(figures)
    return Outcome(
        f"1 update while Redis was frozen ({freeze_s:.1f} s; block {BLOCK_MS} ms)", [took], figures
    )


# -- Redis state lost or connections cut ---------------------------------------------------


def _all_connected(admin: redis.Redis, wanted: int) -> bool:
    """The daemon and the subscribers (they name their connections) are all connected."""
    names = [str(c.get("name", "")) for c in admin.client_list()]
    return sum(n.startswith(("hotreload-sub:", "hotreload-pub:")) for n in names) >= wanted


def client_kill(pod: Pod, rounds: int = 3) -> Outcome:
    times = []
    for _ in range(rounds):
        admin = pod.client()
        try:
            # every worker and the daemon connected again since the last round (a client
            # still in its reconnect backoff would not be killed, proving nothing)
            wanted = len(pod.live_workers()) + 1
            wait_until(partial(_all_connected, admin, wanted), "every client connected", 10)
            killed = admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            admin.close()
        assert killed >= wanted
        began = time.monotonic()
        pod.write()  # while everyone reconnects
        pod.reconverge()
        times.append(time.monotonic() - began)
    return Outcome("1 update right after each CLIENT KILL of every client", times, None)


def stream_deleted(pod: Pod) -> Outcome:
    admin = pod.client()
    events = stream_keys(KEY).events
    try:
        admin.delete(events)
        began = time.monotonic()
        pod.write()
        pod.reconverge()
        took = time.monotonic() - began
        applied = sum(len(w.applied()) for w in pod.workers)
        # deleted with no change: the daemon re-seeds the same content; nobody re-applies it
        admin.delete(events)
        wait_until(lambda: admin.exists(events), "re-seeded", 10)
        version, text = newest_entry(pod)
        assert text == pod.newest_valid()
        wait_until(
            lambda: all(
                (s := state_of(w, pod.redis.url, KEY)) is not None and s.version == version
                for w in pod.live_workers()
            ),
            "every worker adopted the re-seeded version",
        )
        assert sum(len(w.applied()) for w in pod.workers) == applied
    finally:
        admin.close()
    return Outcome(
        "1 update right after DEL; then a DEL with no change (re-seeded, adopted without "
        "a callback)",
        [took],
        None,
    )


def script_flush(pod: Pod, rounds: int = 2) -> Outcome:
    times = []
    for _ in range(rounds):
        admin = pod.client()
        try:
            admin.script_flush()
        finally:
            admin.close()
        began = time.monotonic()
        pod.write()  # the daemon's EVALSHA meets NOSCRIPT and must load the script again
        pod.reconverge()
        times.append(time.monotonic() - began)
    return Outcome("1 update after each SCRIPT FLUSH", times, None)


def signed_replay(pod: Pod) -> Outcome:
    """One XADD appending again the fields of an old entry the daemon signed (anyone who can
    write the stream can copy one from XRANGE): its signature verifies, but its version is
    not above what the workers saw. Every worker refuses it as a replay (an ack saying so)
    and keeps its config; the daemon publishes the mount's content above it."""
    assert pod.key_file is not None, "signed_replay needs a signed pod"
    current = pod.newest_valid()
    old = [(i, f) for i, f in pod.stream() if f[b"content"].decode() != current]
    if not old:  # (the soak: a stream re-seeded with one entry) one change gives an old one
        pod.reconverge(pod.write())
        current = pod.newest_valid()
        old = [(i, f) for i, f in pod.stream() if f[b"content"].decode() != current]
    _, fields = old[0]
    assert fields.get(b"sig"), "the daemon signs its entries"
    # as published an hour ago (signed with the pod's key for then): a genuinely old entry,
    # which a worker (re)started after the replay tells from the newest by its id
    fields = published_long_ago(fields, secret=pod.key_file.read_bytes())
    above = pod.highest_version()
    applied = sum(len(w.applied()) for w in pod.workers)
    admin = pod.client()
    try:
        raw_id = admin.xadd(stream_keys(KEY).events, fields)  # type: ignore[arg-type]
    finally:
        admin.close()
    replayed = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
    pod.replayed.add(replayed)
    took = pod.readopted(above)
    assert sum(len(w.applied()) for w in pod.workers) == applied  # nobody ran it
    version = int(fields[b"version"])
    refused = {
        a.worker
        for a in acks(pod.redis.url, KEY)
        if a.entry_id == replayed
        and a.status == "rejected"
        and a.error.startswith(f"replay: version {version} is not above version")
    }
    assert len(refused) >= len(pod.live_workers()), refused
    return Outcome(
        f"none: an old signed entry (v{version}) appended again on top of v{above}",
        [took],
        None,
        {"replay_refused_by": len(refused)},
    )


# -- the daemon ------------------------------------------------------------------------------

BURST_PAD = 256 * 1024  # large contents: a publish takes long enough to be cut short


def daemon_kill9(pod: Pod, *, burst: int = 30, kill_at: int = 15) -> Outcome:
    daemon = pod.live_daemons()[0]
    cpu = None
    for i in range(burst):
        pod.write(pad=BURST_PAD)
        if i == kill_at:
            pod.kill(daemon.pid)
            cpu = pod.cpu_window()
        time.sleep(0.005)
    time.sleep(1.0)  # the daemon stays dead a while; workers keep their config
    assert cpu is not None
    figures = cpu.finish()
    restarted = pod.start_daemon(*pod.daemon_args)
    took = pod.reconverge(timeout=30)
    wait_until(lambda: "initial publish done" in restarted.output(), "restarted daemon ready")
    assert_idle(figures, daemon=False)
    return Outcome(
        f"{burst}-update burst (256 KiB each); the daemon SIGKILLed after update {kill_at + 1}, "
        f"{burst - kill_at - 1} more while it was dead",
        [took],
        figures,
    )


def two_daemons(pod: Pod, *, burst: int = 40) -> Outcome:
    second = pod.start_daemon(*pod.daemon_args)
    wait_until(lambda: "initial publish done" in second.output(), "second daemon ready", 15)
    for _ in range(burst):
        pod.write()
        time.sleep(0.01)
    took = pod.reconverge()
    publishers = {fields[b"publisher"] for _, fields in pod.stream()}
    pod.kill(second.pid, signal.SIGTERM)  # back to one, for whatever runs next
    return Outcome(
        f"{burst}-update burst watched by both (Pod.check: no duplicate entries)",
        [took],
        None,
        {"publishers": len(publishers)},
    )


def inotify_overflow(pod: Pod) -> Outcome:
    """The daemon SIGSTOPped while its inotify queue overflows; then the config changes.

    Needs a daemon started with a short ``--resync-interval``: the resync repairs it."""
    daemon = pod.live_daemons()[0]
    with open("/proc/sys/fs/inotify/max_queued_events") as fh:
        limit = int(fh.read())
    overflows = daemon.output().lower().count("overflow")
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        cpu = pod.cpu_window()
        directory = pod.mount.directory
        # each file: IN_CREATE, IN_CLOSE_WRITE, IN_DELETE; dot names are never keys
        files = limit // 3 + 1000
        for i in range(files):
            noise = directory / f".noise-{i}"
            os.close(os.open(noise, os.O_CREAT | os.O_WRONLY, 0o600))
            os.unlink(noise)
        pod.write()  # its events are lost: the queue is full
        figures = cpu.finish()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    took = pod.reconverge(timeout=20)
    wait_until(
        lambda: daemon.output().lower().count("overflow") > overflows, "the queue overflowed"
    )
    after = pod.write()  # the watch still works afterwards
    pod.reconverge(after)
    assert_idle(figures, daemon=False)
    return Outcome(
        f"1 update after {3 * files} noise events (queue limit {limit}) with the daemon "
        "SIGSTOPped; resync interval 2 s",
        [took],
        figures,
    )


def mount_removed(pod: Pod) -> Outcome:
    directory = pod.mount.directory
    times = []
    figures = None
    for gap in (1.2, 0.0):  # missing for a while; replaced at once (a new inode)
        shutil.rmtree(directory)
        cpu = pod.cpu_window()
        time.sleep(gap)
        window = cpu.finish()
        figures = figures or window
        directory.mkdir()
        began = time.monotonic()
        pod.write()  # kubelet's first write into an empty directory
        pod.reconverge()
        times.append(time.monotonic() - began)
    assert figures is not None
    assert_idle(figures)
    return Outcome(
        "removed for 1.2 s, recreated with a new revision; removed and recreated at once "
        "with another",
        times,
        figures,
    )


# -- workers ---------------------------------------------------------------------------------


def worker_replaced(pod: Pod) -> Outcome:
    """kill -9 a worker; a valid then a rejected update; a new worker replays (walks back)."""
    victim = pod.live_workers()[0]
    pod.kill(victim.pid)
    good = pod.write()
    pod.reconverge(good)  # published (two back-to-back swaps would be coalesced)
    pod.write(invalid=True)  # the newest is rejected by every validator
    wait_until(lambda: rejected_by_all(pod), "every live worker rejected it")
    began = time.monotonic()
    (fresh,) = pod.spawn(1)
    spawn_to_started = time.monotonic() - began
    started = fresh.lines("started")[0]
    assert fresh.applied() == [good]
    assert started["status"] == "rejected"
    assert started["sha256"] == sha256_hex(good.encode())
    state = state_of(fresh, pod.redis.url, KEY)
    assert state is not None
    assert state.rejected_version == started["version"] + 1
    assert REJECT not in good
    fix = pod.write()
    took = pod.reconverge(fix)
    # the SIGKILLed worker ran no exit hook: its entry stays as it was (it goes stale)
    dead = state_of(victim, pod.redis.url, KEY)
    assert dead is not None
    assert dead.status in {"applied", "rejected"}
    assert dead.sha256 != sha256_hex(fix.encode())
    return Outcome(
        "1 valid and 1 rejected update while the worker was dead; the new one walked back "
        "to the valid one; then a fix",
        [took],
        None,
        {
            "replay_start_s": round(float(started["start_s"]), 4),
            "spawn_to_started_s": round(spawn_to_started, 3),
        },
    )


SCENARIOS: dict[str, Callable[[Pod], Outcome]] = {
    "redis_kill9_restart_empty": lambda pod: redis_kill9(pod, keep_data=False),
    "redis_kill9_restart_with_aof": lambda pod: redis_kill9(pod, keep_data=True),
    "redis_restarted_from_older_aof": redis_rollback,
    "redis_restored_from_older_rdb": redis_restore_older_rdb,
    "signed_replay_of_an_old_entry": signed_replay,
    "redis_sigstop": redis_freeze,
    "client_kill_all": client_kill,
    "events_stream_deleted": stream_deleted,
    "script_flush": script_flush,
    "daemon_kill9_mid_burst": daemon_kill9,
    "two_daemons": two_daemons,
    "inotify_overflow": inotify_overflow,
    "mount_directory_removed": mount_removed,
    "worker_kill9_replay": worker_replaced,
}
