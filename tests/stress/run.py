"""A randomized run of the whole system with invariants checked while it goes.

``hotreload watch`` publishes a kubelet-style mount that a seeded random schedule keeps
changing: bursts and pauses, several keys, keys added and removed, a share of contents the
workers' validator refuses, and entries forged straight into Redis (a wrong hash, a missing
field). Worker processes (tests/workers/stress_worker.py, one Subscriber per followed key)
are SIGKILLed or SIGTERMed and replaced while it runs. Disturbances come in a seeded rotation:
every connection killed, the daemon paused, Redis stopped and restarted from an older RDB
backup (the mount changed meanwhile: workers must never go back to the backup's contents),
and an old genuine entry appended again (a replay: every worker refuses it).

A checker thread reads what the workers record (their JSON lines) and what they report
(``:acks``) as they go, and records a violation whenever

- a worker applied content the test never wrote as valid: forged, refused by the validator,
  another key's, unknown, or not intact (its own check line does not match);
- a worker's applied revision of a key (the content's ``seq``) is not newer than the one it
  applied before: a running worker never goes back, and only a fresh worker's first apply
  (the replay, which may walk back) may be anything;
- an ``applied`` ack of a worker carries a version lower than one it acknowledged before, or
  a hash the test never wrote as valid.

At checkpoints (the schedule pauses) and at the end, the daemon must have published the last
content of every key present in the mount, and every live worker must run the newest content
its validator accepts (the newest valid entry of the stream), reporting it in ``:workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import SCHEMA_VERSION, Ack, decode_ack, decode_worker_state, now_ms
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes

FOLLOWED_ALWAYS = ("alpha.yaml", "beta.json", "gamma.conf")
OPTIONAL = "delta.yaml"  # followed by every worker; removed from the mount and added again
FOLLOWED = (*FOLLOWED_ALWAYS, OPTIONAL)
CHURN = tuple(f"extra-{i}.yaml" for i in range(4))  # only the daemon sees these come and go
INVALID = "INVALID"
WORKERS = 6
TEST_CLIENT = "stress-test"  # the test's own connections, spared when clients are killed
WORKER_OPTIONS = ("--block-ms", "500", "--heartbeat", "1.0", "--resync-interval", "5")

# Forged entries go in atomically behind the newest, so versions stay strictly increasing.
_FORGE = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local version = 0
if #newest > 0 then
  local f = newest[1][2]
  for i = 1, #f, 2 do if f[i] == 'version' then version = tonumber(f[i + 1]) or 0 end end
end
local args = {'version', string.format('%d', version + 1)}
for i = 1, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call('XADD', KEYS[1], '*', unpack(args))
"""


def sha(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def make_content(key: str, seq: int, *, invalid: bool, size: int) -> str:
    body = f"key: {key}\nseq: {seq}\n"
    if invalid:
        body += f"mark: {INVALID}\n"
    body += "pad: " + "abcdefghij"[seq % 10] * size + "\n"
    return body + f"check: {sha(body)}\n"


@dataclass(frozen=True)
class Written:
    key: str
    seq: int
    kind: str  # "valid", "invalid" (the validator refuses it), "forged" (never published)


class Truth:
    """What the test wrote, by content hash; read by the checker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_sha: dict[str, Written] = {}
        self.seq: dict[str, int] = {}
        self.last: dict[str, str] = {}  # the newest content written per key (present or not)

    def new(self, key: str, *, invalid: bool, size: int) -> str:
        with self.lock:
            seq = self.seq[key] = self.seq.get(key, 0) + 1
            text = make_content(key, seq, invalid=invalid, size=size)
            self.by_sha[sha(text)] = Written(key, seq, "invalid" if invalid else "valid")
            self.last[key] = text
        return text

    def forged(self, key: str) -> str:
        with self.lock:
            text = make_content(key, 10**9 + len(self.by_sha), invalid=False, size=8)
            self.by_sha[sha(text)] = Written(key, -1, "forged")
        return text

    def get(self, digest: str) -> Written | None:
        with self.lock:
            return self.by_sha.get(digest)


@dataclass
class StressWorker:
    process: Any  # subprocess.Popen[bytes]
    out: Path
    kind_of_end: str = ""  # "" while meant to run; "kill" / "term" once ended on purpose

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        complete = self.out.read_text().split("\n")[:-1]  # not a line being appended now
        return [json.loads(line) for line in complete if line]

    def log(self) -> str:
        path = Path(str(self.out) + ".log")
        return path.read_text() if path.exists() else ""


@dataclass
class Checker:
    """Checks the invariants continuously; violations are collected, the test asserts none."""

    truth: Truth
    url: str
    workers: Callable[[], list[StressWorker]]
    violations: list[str] = field(default_factory=list)
    checks: int = 0
    lines_read: int = 0
    acks_read: int = 0
    passes: int = 0
    _offsets: dict[Path, int] = field(default_factory=dict)
    _last_seq: dict[tuple[int, str], int] = field(default_factory=dict)
    _ack_cursor: dict[str, str] = field(default_factory=dict)
    _ack_version: dict[tuple[str, str], int] = field(default_factory=dict)
    _last_ack: dict[tuple[str, str], Ack] = field(default_factory=dict)
    # what the run did last (disturbances, restarts, reused pids): named in a violation
    context: Callable[[], str] = lambda: ""
    _stop: threading.Event = field(default_factory=threading.Event)
    away: threading.Event = field(default_factory=threading.Event)  # Redis stopped on purpose
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stress-checker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.check_once()  # whatever arrived last

    def _run(self) -> None:
        client = connect(self.url, socket_timeout=5.0, client_name=TEST_CLIENT)
        failures = 0
        try:
            while not self._stop.wait(0.1):
                if self.away.is_set():
                    continue
                try:
                    self.check_once(client)
                    failures = 0
                except (redis.RedisError, OSError) as exc:
                    failures += 1  # the run cuts connections on purpose: read again
                    client.close()
                    client = connect(self.url, socket_timeout=5.0, client_name=TEST_CLIENT)
                    if failures >= 5:
                        self.violate(f"checker could not read Redis: {exc!r}")
        finally:
            client.close()

    def violate(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"{message} [{self.context()}]")

    def check_once(self, client: redis.Redis | None = None) -> None:
        for worker in self.workers():
            self._check_lines(worker)
        own = client is None
        client = client or connect(self.url, socket_timeout=5.0)
        try:
            for key in FOLLOWED:
                self._check_acks(client, key)
        finally:
            if own:
                client.close()
        self.passes += 1

    # -- the workers' own records ------------------------------------------------------------

    def _check_lines(self, worker: StressWorker) -> None:
        try:
            with worker.out.open("rb") as fh:
                fh.seek(self._offsets.get(worker.out, 0))
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for next time
        self._offsets[worker.out] = self._offsets.get(worker.out, 0) + len(complete)
        for raw in complete.splitlines():
            self.lines_read += 1
            self._check_line(worker, json.loads(raw))

    def _check_line(self, worker: StressWorker, row: dict[str, Any]) -> None:
        event, pid = row["event"], worker.pid
        if event == "failed":
            self.violate(f"worker {pid} failed to start {row}")
        if event not in {"applied", "refused", "started"}:
            return
        self.checks += 1
        key, digest = row["key"], row["sha256"]
        known = self.truth.get(digest)
        where = f"worker {pid} {event} {key} {digest[:12]}"
        if known is None:
            self.violate(f"{where}: content the test never wrote")
            return
        if known.key != key:
            self.violate(f"{where}: content of {known.key}")
        if event == "refused":
            if known.kind != "invalid":
                self.violate(f"{where}: the validator refused {known.kind} content")
            return
        if known.kind != "valid":
            self.violate(f"{where}: {known.kind} content (seq {known.seq}) is running")
        if event == "started":
            return
        if not row["intact"] or row["seq"] != known.seq:
            self.violate(f"{where}: content not intact ({row})")
        previous = self._last_seq.get((pid, key))
        if previous is not None and row["seq"] <= previous:
            self.violate(f"{where}: applied seq {row['seq']} after seq {previous}")
        self._last_seq[(pid, key)] = row["seq"]

    # -- what they report in :acks -----------------------------------------------------------

    def _check_acks(self, client: redis.Redis, key: str) -> None:
        acks_key = stream_keys(key).acks
        low = self._ack_cursor.get(key)
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            client.xrange(acks_key, min=f"({low}" if low else "-", max="+"),
        )
        for entry_id, fields in entries:
            self.acks_read += 1
            self._ack_cursor[key] = entry_id.decode()
            ack = decode_ack(fields)
            if ack.status != "applied":
                continue
            self.checks += 1
            known = self.truth.get(ack.sha256)
            if known is None or known.kind != "valid" or known.key != key:
                self.violate(f"ack {ack.worker} {key} v{ack.version}: applied {known}")
            wk = (ack.worker, key)
            if ack.version < self._ack_version.get(wk, 0):
                self.violate(
                    f"ack {ack.worker} {key}: applied v{ack.version} after v{self._ack_version[wk]}"
                    f" (this: {_described(entry_id.decode(), ack)}; "
                    f"the one before: {_described('', self._last_ack[wk])})"
                )
            self._ack_version[wk] = max(ack.version, self._ack_version.get(wk, 0))
            self._last_ack[wk] = ack


def _described(ack_id: str, ack: Ack) -> str:
    """An ack as a violation names it: where it is in :acks, the entry it is about, when it
    was decided, and whether it was an adoption (unchanged, no callback)."""
    where = f"ack id {ack_id}, " if ack_id else ""
    return (
        f"{where}v{ack.version} entry {ack.entry_id} decided at {ack.at} "
        f"published at {ack.published_at}{' unchanged' if ack.unchanged else ''}"
    )


@dataclass
class Figures:
    updates: int = 0
    bursts: int = 0
    pauses: int = 0
    invalid: int = 0
    forged: int = 0
    keys_added: int = 0
    keys_removed: int = 0
    kills: int = 0
    terms: int = 0
    client_kills: int = 0
    daemon_pauses: int = 0
    restores: int = 0
    replays: int = 0
    checkpoints: list[float] = field(default_factory=list)
    after_restore: list[float] = field(default_factory=list)  # restart -> converged, s
    after_replay: list[float] = field(default_factory=list)
    published: int = 0


class StressRun:
    def __init__(
        self, directory: Path, redis_dir: Path, processes: Processes, *, seed: int
    ) -> None:
        self.directory = directory
        self.processes = processes
        self.rng = random.Random(seed)
        self.seed = seed
        self.redis = RedisServer(redis_dir)
        self.mount = KubeletMount(directory / "config")
        self.truth = Truth()
        self.payload: dict[str, bytes] = {}
        self.workers: list[StressWorker] = []
        self.figures = Figures()
        self.daemon: Any = None
        self.daemon_log = directory / "daemon.log"
        self.checker = Checker(self.truth, self.redis.url, lambda: list(self.workers))
        self._spawned = 0
        # the run's last doings, each with the update count and time: a violation names them
        self.doings: list[str] = []
        self.checker.context = lambda: "; ".join(self.doings[-6:])

    def did(self, what: str) -> None:
        self.doings.append(f"{what} at update {self.figures.updates} {time.strftime('%H:%M:%S')}")

    # -- processes ------------------------------------------------------------------------

    def start(self) -> None:
        self.redis.start()
        for key in (*FOLLOWED, *CHURN[:2]):
            self.payload[key] = self.truth.new(key, invalid=False, size=64).encode()
        self.mount.write(self.payload)
        with self.daemon_log.open("ab") as fh:
            self.daemon = self.processes.python(
                "-m", "publisher", "watch", str(self.mount.directory), "--redis", self.redis.url,
                "--metrics-port", "0", "--history", "200",
                stdout=fh, stderr=fh,
            )  # fmt: skip
        self.wait_published(30)
        self.backup = self.directory / "backup.rdb"
        self.save_backup()
        self.checker.start()
        for _ in range(WORKERS):
            self.spawn()

    def spawn(self) -> StressWorker:
        self._spawned += 1
        out = self.directory / f"worker-{self._spawned}.jsonl"
        mode = ("--async",) if self._spawned % 2 else ()  # every other one asyncio
        process = self.processes.python(
            "-m", "tests.workers.stress_worker", "--url", self.redis.url,
            "--keys", ",".join(FOLLOWED), "--out", str(out), *WORKER_OPTIONS, *mode,
        )  # fmt: skip
        worker = StressWorker(process, out)
        if any(w.pid == worker.pid for w in self.workers):  # pid_max is 32768 on small VMs
            self.did(f"pid {worker.pid} reused (its worker id host:pid too)")
        self.workers.append(worker)
        return worker

    def live(self) -> list[StressWorker]:
        return [w for w in self.workers if not w.kind_of_end]

    def restart_one(self) -> None:
        victim = self.rng.choice(self.live())
        if self.rng.random() < 0.5:
            victim.kind_of_end = "kill"
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            self.figures.kills += 1
            self.did(f"SIGKILL {victim.pid}")
        else:
            victim.kind_of_end = "term"
            victim.process.send_signal(signal.SIGTERM)
            self.figures.terms += 1
            code = victim.process.wait(10)
            self.did(f"SIGTERM {victim.pid}")
            # SIGTERM before the worker blocked it (still importing, nothing recorded yet)
            # ends it by the default action, as it would any process
            cut_short = code == -signal.SIGTERM and not victim.lines()
            if code != 0 and not cut_short:
                self.checker.violate(f"worker {victim.pid} exited {code} on SIGTERM")
        self.spawn()

    def stop(self) -> None:
        self.checker.stop()
        for worker in self.live():
            worker.process.send_signal(signal.SIGTERM)
        for worker in self.live():
            code = worker.process.wait(10)
            assert code == 0, f"worker {worker.pid} exited {code}: {worker.log()[-2000:]}"
        self.daemon.send_signal(signal.SIGTERM)
        assert self.daemon.wait(10) == 0
        self.redis.stop()

    # -- changes ----------------------------------------------------------------------------

    def change(self) -> None:
        """One kubelet write that changes something, chosen at random."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            self._toggle(OPTIONAL)
        elif roll < 0.12:
            self._toggle(rng.choice(CHURN))
        else:
            present = [k for k in self.payload if k != OPTIONAL or OPTIONAL in self.payload]
            for key in rng.sample(present, k=min(len(present), rng.choice((1, 1, 1, 2, 3)))):
                self.payload[key] = self._content(key).encode()
        self.mount.write(self.payload)
        self.figures.updates += 1

    def _content(self, key: str) -> str:
        invalid = self.rng.random() < 0.1
        self.figures.invalid += invalid
        size = self.rng.choice((16, 64, 256, 1024, 1024, 4096, 65536 if key in CHURN else 2048))
        return self.truth.new(key, invalid=invalid, size=size)

    def _toggle(self, key: str) -> None:
        if key in self.payload:
            del self.payload[key]
            self.figures.keys_removed += 1
        else:
            self.payload[key] = self._content(key).encode()
            self.figures.keys_added += 1

    def kill_clients(self, client: redis.Redis) -> None:
        """CLIENT KILL every connection of the daemon and the workers (not the test's)."""
        clients = cast("list[dict[str, Any]]", client.client_list())
        for info in clients:
            if info["name"] != TEST_CLIENT:
                client.client_kill_filter(_id=info["id"])
        self.figures.client_kills += 1

    def pause_daemon(self) -> None:
        """SIGSTOP the daemon while the mount keeps changing; SIGCONT a moment later."""
        self.daemon.send_signal(signal.SIGSTOP)
        try:
            for _ in range(self.rng.randrange(3, 15)):
                self.change()
                time.sleep(0.02)
        finally:
            self.daemon.send_signal(signal.SIGCONT)
        self.figures.daemon_pauses += 1

    def forge(self, client: redis.Redis) -> None:
        """An entry no publisher wrote: a wrong hash, or a missing content field."""
        key = self.rng.choice(FOLLOWED)
        text = self.truth.forged(key)
        fields: list[str | bytes] = [
            "schema", str(SCHEMA_VERSION), "key", key, "published_at", str(now_ms()),
            "publisher", "forger:0",
        ]  # fmt: skip
        if self.rng.random() < 0.7:  # claims another content's hash
            fields += ["sha256", sha(text + "tampered"), "content", text.encode()]
        else:  # no content at all
            fields += ["sha256", sha(text)]
        client.eval(_FORGE, 1, stream_keys(key).events, *fields)
        self.figures.forged += 1

    def save_backup(self) -> None:
        client = connect(self.redis.url, socket_timeout=10.0, client_name=TEST_CLIENT)
        try:
            client.save()
        finally:
            client.close()
        shutil.copyfile(self.redis.directory / "dump.rdb", self.backup)

    def restore_older(self) -> None:
        """Stop Redis; while it is away, a kubelet write giving every followed key a new
        valid content; start it from the backup (saved at the previous restore or at the
        start, hundreds of updates ago); a new backup for next time."""
        self.checker.away.set()
        try:
            self.redis.stop()
            for key in FOLLOWED:
                self.payload[key] = self.truth.new(key, invalid=False, size=64).encode()
            self.mount.write(self.payload)
            self.figures.updates += 1
            shutil.copyfile(self.backup, self.redis.directory / "dump.rdb")
            self.redis.start()
        finally:
            self.checker.away.clear()
        self.save_backup()
        self.figures.restores += 1

    def replay(self, client: redis.Redis) -> None:
        """XADD the fields of the oldest genuine entry of a followed key again."""
        key = self.rng.choice([k for k in FOLLOWED if k in self.payload])
        events = stream_keys(key).events
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(events, count=20))
        for _, fields in entries:
            if fields.get(b"publisher") != b"forger:0" and b"content" in fields:
                client.xadd(events, fields)  # type: ignore[arg-type]
                self.figures.replays += 1
                return

    # -- waiting ----------------------------------------------------------------------------

    def _newest(self, client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            client.xrevrange(stream_keys(key).events, count=300),
        )

    def wait_published(self, timeout: float) -> None:
        """The daemon published the last content of every key present in the mount."""
        client = connect(self.redis.url, socket_timeout=5.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                pending = []
                for key, data in self.payload.items():
                    # a forged entry may sit on top: the daemon has no reason to publish again
                    published = self._newest_published(client, key)
                    if published != data:
                        pending.append(key)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon did not publish {pending}\n{self.tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def _newest_published(self, client: redis.Redis, key: str) -> bytes | None:
        """The content of the highest version the daemon wrote (not the last appended: an old
        entry may have been appended again, and a forged one may sit on top)."""
        best, content = -1, None
        for _, fields in self._newest(client, key):
            raw = fields.get(b"version", b"")
            if fields.get(b"publisher") == b"forger:0" or not raw.isdigit():
                continue
            if int(raw) > best:
                best, content = int(raw), fields.get(b"content")
        return content

    def expected(self, client: redis.Redis) -> dict[str, str]:
        """Per followed key: the content of the stream's highest version that the validator
        accepts (not the last appended: an old entry may have been appended again)."""
        wanted = {}
        for key in FOLLOWED:
            best = -1
            for _, fields in self._newest(client, key):
                digest = fields.get(b"sha256", b"").decode()
                content = fields.get(b"content")
                known = self.truth.get(digest)
                if (
                    content is not None
                    and known is not None
                    and known.kind == "valid"
                    and sha(content.decode()) == digest
                    and int(fields[b"version"]) > best
                ):
                    wanted[key], best = digest, int(fields[b"version"])
            if best < 0:
                raise AssertionError(f"no acceptable entry in {key}'s stream")
        return wanted

    def checkpoint(self, timeout: float = 30.0) -> float:
        """Pause, then: the daemon published everything, every live worker runs the newest
        acceptable content of every key (its records and :workers agree). Returns the
        seconds from the last change until the workers converged."""
        began = time.monotonic()
        self.wait_published(timeout)
        client = connect(self.redis.url, socket_timeout=5.0)
        try:
            wanted = self.expected(client)
            deadline = time.monotonic() + timeout
            while True:
                behind = self._behind(client, wanted)
                if not behind:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"not converged: {behind}\n{self.tail()}")
                time.sleep(0.05)
        finally:
            client.close()
        took = time.monotonic() - began
        self.figures.checkpoints.append(took)
        return took

    def _behind(self, client: redis.Redis, wanted: dict[str, str]) -> list[str]:
        behind = []
        states: dict[str, dict[int, str]] = {}
        for key in FOLLOWED:
            raw = cast("dict[bytes, bytes]", client.hgetall(stream_keys(key).workers))
            states[key] = {}
            for value in raw.values():
                state = decode_worker_state(value)
                states[key][state.pid] = state.sha256
        for worker in self.live():
            if worker.process.poll() is not None:
                raise AssertionError(f"worker {worker.pid} died: {worker.log()[-3000:]}")
            running: dict[str, str] = {}
            for row in worker.lines():
                if row["event"] in {"applied", "started"}:
                    running[row["key"]] = row["sha256"]
            for key, digest in wanted.items():
                if running.get(key) != digest or states[key].get(worker.pid) != digest:
                    behind.append(f"{worker.pid}:{key}")
        return behind

    def tail(self) -> str:
        return self.daemon_log.read_text()[-3000:]

    # -- the schedule ---------------------------------------------------------------------

    def run(self, *, updates: int | None = None, seconds: float | None = None) -> None:
        """Change the mount until ``updates`` changes were made or ``seconds`` passed."""
        rng, f = self.rng, self.figures
        client = connect(self.redis.url, socket_timeout=5.0, client_name=TEST_CLIENT)
        began = time.monotonic()
        next_restart = 25 + rng.randrange(20)
        next_disturbance = 100 + rng.randrange(100)
        next_checkpoint = 300
        disturbances = ["clients", "daemon", "restore", "replay"]
        rng.shuffle(disturbances)
        done_disturbances = 0
        try:
            while True:
                done = self.figures.updates
                if updates is not None and done >= updates:
                    break
                if seconds is not None and time.monotonic() - began >= seconds:
                    break
                if self.checker.violations:
                    break  # fail fast with the first ones
                if rng.random() < 0.06:  # a burst: kubelet back to back, nothing in between
                    self.figures.bursts += 1
                    for _ in range(rng.randrange(10, 40)):
                        self.change()
                else:
                    self.change()
                    if rng.random() < 0.02:
                        self.forge(client)
                    if rng.random() < 0.03:
                        self.figures.pauses += 1
                        time.sleep(rng.uniform(0.2, 0.6))
                    else:
                        time.sleep(rng.choice((0.0, 0.002, 0.01, 0.02, 0.04)))
                if self.figures.updates >= next_restart:
                    self.restart_one()
                    next_restart += 30 + rng.randrange(30)
                if self.figures.updates >= next_disturbance:
                    kind = disturbances[done_disturbances % len(disturbances)]
                    done_disturbances += 1
                    self.did(kind)
                    if kind == "clients":
                        self.kill_clients(client)
                    elif kind == "daemon":
                        self.pause_daemon()
                    elif kind == "replay":
                        self.replay(client)
                        f.after_replay.append(self.checkpoint())
                    else:
                        client.close()
                        self.restore_older()
                        client = connect(
                            self.redis.url, socket_timeout=5.0, client_name=TEST_CLIENT
                        )
                        f.after_restore.append(self.checkpoint())
                    next_disturbance += 100 + rng.randrange(150)
                if self.figures.updates >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint += 300 + rng.randrange(100)
            self.checkpoint()
        finally:
            client.close()

    def report(self) -> dict[str, Any]:
        f = self.figures
        client = connect(self.redis.url, socket_timeout=5.0)
        try:
            published = 0
            for key in (*FOLLOWED, *CHURN):
                published += client.xlen(stream_keys(key).events)
        finally:
            client.close()
        return {
            "seed": self.seed,
            "updates": f.updates,
            "keys": len(FOLLOWED) + len(CHURN),
            "keys_followed_by_workers": len(FOLLOWED),
            "bursts": f.bursts,
            "pauses": f.pauses,
            "invalid_contents": f.invalid,
            "forged_entries": f.forged,
            "keys_added": f.keys_added,
            "keys_removed": f.keys_removed,
            "worker_sigkills": f.kills,
            "worker_sigterms": f.terms,
            "client_kills": f.client_kills,
            "daemon_sigstops": f.daemon_pauses,
            "redis_restored_from_older_rdb": f.restores,
            "old_entries_replayed": f.replays,
            "worker_processes": len(self.workers),
            "stream_entries_kept": published,
            "invariant_checks": self.checker.checks,
            "checker_passes": self.checker.passes,
            "acks_read": self.checker.acks_read,
            "worker_lines_read": self.checker.lines_read,
            "checkpoints": len(f.checkpoints),
            "checkpoint_converge_max_s": round(max(f.checkpoints, default=0.0), 3),
            "restore_converge_s": [round(t, 3) for t in f.after_restore],
            "replay_converge_s": [round(t, 3) for t in f.after_replay],
        }


def seed_from_env(default: int = 1) -> int:
    return int(os.environ.get("SOAK_SEED", default))
