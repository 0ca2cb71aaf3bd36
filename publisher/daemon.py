"""``hotreload watch``: one process per pod turning file changes into versioned events.

Watchers (one per mount directory) report content changes from their own threads; they only
record the newest content per key and wake the publishing loop. The loop, on the caller's
thread, runs compare-and-publish for every key whose newest content is not yet known to be in
Redis. That split gives the behaviour Redis failures need:

- while Redis is away, files keep being watched and only the newest content per key is kept,
  so the first publish after Redis returns is the current config, not every intermediate one;
- after every (re)connection every key is compare-and-published again: a Redis that restarted
  empty (or lost its AOF tail) holds the current config again within one check interval;
- every ``check_interval`` one round trip (``EXISTS`` on every events stream) detects a dead,
  frozen or restarted Redis and a deleted stream; backoff is capped and jittered, never a spin.

Redis Cluster (``publisher._admin.connect_any``: the URL may name any node): the client is
redis-py's cluster client, made on the first connection. Each key's events go to its slot's
master (the ``{KEY}`` hash tag keeps the script's keys in one slot); the check pipelines
``EXISTS`` per node. The cluster's own errors that outlast the client's retry (CLUSTERDOWN,
TRYAGAIN, MASTERDOWN, a slot not served, no node reachable) count as a lost connection:
reconnect, then re-seed every key. Replication is asynchronous, so a failover may lose the
last writes of the dead master; the re-seed puts the current content back. Since the client
may also follow a failover by itself (it reloads the slot map and retries), every check also
compares each key's master with the one it had: a key whose slot changed hands is
compare-and-published again.

Security (see ``subscriber.protocol`` for the fields):

- ``signing_key_file``: every event is signed with the key in that file (itself a mounted
  Secret, watched like a mount): when it changes, the new key signs from then on and every
  key is published again, signed with it, so subscribers that hold only the new key can
  start. A file that becomes unreadable, empty or too short keeps the current key (logged).
- sensitive keys (``sensitive``, and every key of a memory-backed mount: a Secret volume, see
  ``publisher._sensitive``) are published with ``sensitive=1``. Content is never logged,
  sensitive or not: only names, versions, sizes and hash prefixes.

Snapshots (``snapshots``, ``hotreload watch --snapshot NAME[=DIR]``): a directory is also
published as ONE config key ``NAME`` whose content is every key of the directory, all read
from the same resolved ``..data`` target, encoded by ``subscriber.protocol.encode_snapshot``
(deterministic, so an unchanged ConfigMap is skipped by compare-and-publish). One kubelet
swap is one snapshot event: a worker never sees half of an update. A swap that leaves some
file unreadable publishes nothing (the previous snapshot stays; logged). Per-key publishing
of the same directory (when it is also a PATH) goes on alongside. The snapshot key then
shares everything with per-key ones: versions, history, signing, ``sensitive``, the size
limit (on the encoded size), re-seeding, acks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec
import redis
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    TryAgainError,
)

from publisher._admin import connect_any
from publisher._mount import ConcurrentSwaps, read_mount, resolve_target
from publisher._sensitive import memory_backed
from publisher.ackwatch import AckFollower
from publisher.endpoints import EndpointServer
from publisher.metrics import DaemonMetrics
from publisher.publish import DEFAULT_HISTORY, PublishConflict, Publisher, PublishResult
from publisher.watcher import MountContent, MountWatcher
from subscriber._redis import Backoff, client_name, describe_failure
from subscriber._target import redacted
from subscriber.defaults import DEFAULT_PREFIX
from subscriber.errors import ConfigurationError, ContentTooLarge
from subscriber.keys import stream_keys, validate_key
from subscriber.protocol import (
    decode_worker_state,
    encode_snapshot,
    key_id,
    process_identity,
    sha256_hex,
)
from subscriber.protocol import signing_key as normalized_key

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["Daemon", "MountSpec", "plan_mounts"]

logger = logging.getLogger(__name__)

# Errors after which the connection is presumed gone: reconnect, then re-seed every key. In a
# Redis Cluster also what outlasts the client's retry: CLUSTERDOWN / MASTERDOWN (a failover
# under way), TRYAGAIN, a redirect loop, a slot no node serves or no node reachable
# (``RedisClusterException``, SlotNotCoveredError among them); re-seeding then restores what
# the failover lost. READONLY: the node became a replica.
# A worker not heard of for an hour is forgotten (see Daemon); checked every minute at most.
DEFAULT_FORGET_WORKERS_AFTER = 3600.0
_FORGET_CHECK_INTERVAL = 60.0

_CONNECTION_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ReadOnlyError,
    ClusterDownError,
    ClusterError,
    TryAgainError,
    MovedError,
    RedisClusterException,
    OSError,
)


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
        names = spec.keys if spec.keys is not None else _keys_in(spec.directory)
        for name in names:
            if name in owner:
                raise ConfigurationError(
                    f"key {name!r} would be published from both {owner[name]} and "
                    f"{spec.directory}; keys must be unique across PATHs"
                )
            owner[name] = spec.directory
    return specs


def _plan_snapshots(
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
        names = spec.keys if spec.keys is not None else _keys_in(spec.directory)
        for name in sorted(planned.keys() & set(names)):
            raise ConfigurationError(
                f"snapshot name {name!r} is also a key published from {spec.directory}; "
                "pick another --snapshot name"
            )
    return planned


def _keys_in(directory: str) -> list[str]:
    return [name for name in os.listdir(directory) if not name.startswith(".")]


@dataclass
class KeyState:
    """What the daemon knows about one key: the newest content seen and what is in Redis."""

    content: bytes
    sha256: str
    directory: str
    published_sha256: str = ""  # confirmed newest in Redis (as of our last publish)
    refused_sha256: str = ""  # too large: reported once, not retried until it changes
    version: int = 0
    published_count: int = 0
    skipped_count: int = 0
    snapshot: bool = False  # a whole directory as one key (``--snapshot``)
    target: str | None = None  # the ``..data`` target the content was read from (kubelet)


@dataclass
class DaemonStats:
    """Counters for health endpoints and metrics (read without locks: plain ints/bools)."""

    redis_connected: bool = False
    initial_publish_done: bool = False
    publish_errors: int = 0
    reconnects: int = 0
    last_publish_time: float = 0.0


class Daemon:
    """Watches ``paths`` and publishes each key's content to Redis until ``stop`` is set.

    Settings (keyword arguments):

    - ``redis_url``: where to publish (``redis://``, ``rediss://``, ``unix://``).
    - ``prefix`` (``"hotreload"``): the first part of every Redis key.
    - ``history`` (100): events kept per key (approximate trimming).
    - ``settle`` (0.1 s), ``resync_interval`` (30 s): passed to each ``MountWatcher``.
    - ``check_interval`` (1 s): how often Redis and the streams are checked while idle.
    - ``metrics_port`` (0): serve ``/metrics``, ``/healthz``, ``/readyz`` there; 0 disables.
    - ``forget_workers_after`` (3600 s): remove a worker's entry from ``:workers`` once it has
      not sent a heartbeat for this long (stopped, SIGKILLed, or of a pod long gone), so the
      hash does not grow with every worker restart and rollout; 0 keeps every entry.
    - ``on_publish``: called with every ``PublishResult`` (written or not).
    - ``signing_key_file``: sign every event with the key in this file, re-read when it
      changes (``ConfigurationError`` if it cannot be read or is too short at start).
    - ``sensitive``: keys published as sensitive, besides those of memory-backed mounts.
    - ``snapshots``: snapshot key name -> directory: each directory is also published as one
      key whose content is its whole key -> value map (see the module docstring). A
      directory may be a PATH too (its keys are then published one by one as well) or not.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        redis_url: str,
        prefix: str = DEFAULT_PREFIX,
        history: int = DEFAULT_HISTORY,
        settle: float = 0.1,
        resync_interval: float = 30.0,
        check_interval: float = 1.0,
        metrics_port: int = 0,
        forget_workers_after: float = DEFAULT_FORGET_WORKERS_AFTER,
        on_publish: Callable[[PublishResult], None] | None = None,
        signing_key_file: str | os.PathLike[str] | None = None,
        sensitive: Collection[str] = (),
        snapshots: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        stream_keys("probe", prefix)  # validates the prefix before anything starts
        self.mounts = plan_mounts(paths) if paths or not snapshots else []
        self.snapshots = _plan_snapshots(snapshots or {}, self.mounts)
        # directory -> the keys published one by one (None: all of them)
        self._per_key: dict[str, frozenset[str] | None] = {
            spec.directory: spec.keys for spec in self.mounts
        }
        # directory -> the snapshot names it is published as
        self._snapshots_of: dict[str, list[str]] = {}
        for name, directory in sorted(self.snapshots.items()):
            self._snapshots_of.setdefault(directory, []).append(name)
        named = {validate_key(name) for name in sensitive}
        # directories of Secret (memory-backed) mounts: every key in them is sensitive
        self.secret_dirs: dict[str, str] = {}
        for spec in self.mounts:
            fstype = memory_backed(spec.directory)
            if fstype is not None:
                self.secret_dirs[spec.directory] = fstype
            for name in spec.keys or ():  # a file mounted on its own (subPath) from a Secret
                if memory_backed(os.path.join(spec.directory, name)):
                    named.add(name)
        for directory in self.snapshots.values():
            fstype = memory_backed(directory)
            if fstype is not None:
                self.secret_dirs[directory] = fstype
        self.sensitive_keys = frozenset(named)
        self.signing_key_file = (
            os.path.abspath(signing_key_file) if signing_key_file is not None else None
        )
        self._signing_key = self._initial_signing_key()  # changed under self._lock
        self.redis_url = redis_url
        self.prefix = prefix
        self.history = history
        self.settle = settle
        self.resync_interval = resync_interval
        self.check_interval = check_interval
        if forget_workers_after < 0:
            raise ValueError(f"forget_workers_after must be >= 0, not {forget_workers_after}")
        self.forget_workers_after = forget_workers_after
        self.on_publish = on_publish
        self.metrics_port = metrics_port
        self.metrics = DaemonMetrics()
        self.stats = DaemonStats()
        self._started_at = time.monotonic()
        self.keys: dict[str, KeyState] = {}
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watchers: list[MountWatcher] = []
        # made on the first connection (``_admin``): whether the URL names a cluster node is
        # only known by asking it; then kept for the daemon's life, as is the Publisher
        # (versions and bases it remembers per key)
        self._redis_client: AnyRedis | None = None
        self._publisher: Publisher | None = None
        self._owners: dict[str, str] = {}  # cluster: key -> its slot's master at the last check
        self._key_watcher: MountWatcher | None = None
        self._setup_error = ""  # the last connection failure logged as an error

    # ------------------------------------------------------------------ watching
    def _accept(self, directory: str, snapshot: MountContent) -> None:
        """Record the newest content of each changed key (called from watcher threads)."""
        wanted = self._per_key.get(directory)
        with self._lock:
            for name in self._snapshots_of.get(directory, ()):
                self._accept_snapshot(name, directory, snapshot)
            for name in snapshot.files:
                state = self.keys.get(name)
                if state is not None and state.directory == directory and not state.snapshot:
                    state.target = snapshot.target  # changed or not: read from this target
            for name in snapshot.changed if directory in self._per_key else ():
                if wanted is not None and name not in wanted:
                    continue  # watched for a snapshot; only the named files per key
                content = snapshot.files.get(name)
                if content is None or not self._claim(name, directory):
                    continue
                state = self.keys.get(name)
                digest = sha256_hex(content)
                if state is None:
                    self.keys[name] = KeyState(content, digest, directory, target=snapshot.target)
                elif state.sha256 != digest:
                    state.content, state.sha256 = content, digest
                else:
                    continue
                self._dirty.add(name)
        for name in snapshot.removed if directory in self._per_key else ():
            logger.info("%s disappeared from %s; its last version stays in Redis", name, directory)
        self._wake.set()

    def _accept_snapshot(self, name: str, directory: str, snapshot: MountContent) -> None:
        """Record the whole directory as snapshot ``name`` (with ``self._lock`` held)."""
        if snapshot.unreadable:
            # files then holds the previous content of those keys: a mix, never published
            logger.error(
                "snapshot %s: %s in %s could not be read (%s); the previous snapshot stays",
                name,
                ", ".join(sorted(snapshot.unreadable)),
                directory,
                "; ".join(str(e.strerror or e) for e in snapshot.unreadable.values()),
            )
            return
        content = encode_snapshot(snapshot.files)
        digest = sha256_hex(content)
        state = self.keys.get(name)
        if state is None:
            self.keys[name] = KeyState(
                content, digest, directory, snapshot=True, target=snapshot.target
            )
            self._dirty.add(name)
            return
        state.target = snapshot.target
        if state.sha256 != digest:
            state.content, state.sha256 = content, digest
        else:
            return
        self._dirty.add(name)

    def _claim(self, name: str, directory: str) -> bool:
        if name in self.snapshots:
            logger.error(
                "%s appeared in %s but is the name of a snapshot (--snapshot); ignored",
                name,
                directory,
            )
            return False
        state = self.keys.get(name)
        if state is not None and state.directory != directory:
            logger.error(
                "%s appeared in %s but is already published from %s; ignored",
                name,
                directory,
                state.directory,
            )
            return False
        try:
            validate_key(name)
        except ConfigurationError as exc:
            logger.warning("%s: not published: %s", directory, exc)
            return False
        return True

    def _start_watchers(self) -> None:
        per_key, snapshots_of = self._per_key, self._snapshots_of
        for directory in [*per_key, *(d for d in snapshots_of if d not in per_key)]:
            # a snapshot needs every key of its directory, whatever is published per key
            keys = None if directory in snapshots_of else per_key[directory]
            watcher = MountWatcher(
                directory,
                lambda snap, d=directory: self._accept(d, snap),  # type: ignore[misc]
                keys=keys,
                settle=self.settle,
                resync_interval=self.resync_interval,
            )
            initial = watcher.start()
            self._watchers.append(watcher)
            self._accept(directory, initial)
            as_snapshot = "".join(f"; as snapshot {n}" for n in snapshots_of.get(directory, ()))
            logger.info(
                "watching %s (%s%s)",
                directory,
                ", ".join(sorted(initial.files)) or "no keys yet",
                as_snapshot,
            )

    # ------------------------------------------------------------------ signing key
    def _initial_signing_key(self) -> bytes | None:
        path = self.signing_key_file
        if path is None:
            return None
        for spec in self.mounts:
            inside = spec.keys is None or os.path.basename(path) in spec.keys
            if os.path.dirname(path) == spec.directory and inside:
                raise ConfigurationError(
                    f"--signing-key-file {path} is inside the watched {spec.directory}: it "
                    "would be published as a config key; mount the key Secret elsewhere"
                )
        for directory in self.snapshots.values():
            if os.path.dirname(path) == directory:
                raise ConfigurationError(
                    f"--signing-key-file {path} is inside {directory}, published as a "
                    "snapshot: it would be published; mount the key Secret elsewhere"
                )
        try:
            with open(path, "rb") as fh:
                return normalized_key(fh.read())
        except OSError as exc:
            raise ConfigurationError(
                f"--signing-key-file: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"--signing-key-file {path}: {exc}") from None

    def _start_key_watcher(self) -> None:
        """Watch the signing key file's directory (a Secret mount: kubelet swaps ``..data``)."""
        path = self.signing_key_file
        if path is None:
            return
        directory, name = os.path.split(path)
        watcher = MountWatcher(
            directory,
            self._key_file_changed,
            keys={name},
            settle=self.settle,
            resync_interval=self.resync_interval,
        )
        initial = watcher.start()
        self._key_watcher = watcher
        logger.info("signing events with key id %s (from %s)", self._key_id(), path)
        self._key_file_changed(initial)  # a change between __init__ and the watch

    def _key_file_changed(self, snapshot: MountContent) -> None:
        """Called by the key watcher's thread: adopt a new valid key, keep the old otherwise."""
        path = self.signing_key_file
        name = os.path.basename(path or "")
        current = self._key_id()
        error = snapshot.unreadable.get(name)
        raw = snapshot.files.get(name)
        if error is not None or raw is None:
            reason = f"cannot read it ({error})" if error is not None else "it is missing"
            logger.error(
                "signing key file %s: %s; still signing with key id %s", path, reason, current
            )
            return
        try:
            key = normalized_key(raw)
        except ValueError as exc:
            logger.error(
                "signing key file %s: %s; still signing with key id %s", path, exc, current
            )
            return
        if key_id(key) == current:
            return
        with self._lock:
            self._signing_key = key
            if self._publisher is not None:
                self._publisher.set_signing_key(key)
        logger.info(
            "signing key changed (key id %s -> %s): publishing every key again, signed with it",
            current,
            self._key_id(),
        )
        with self._lock:
            self._dirty.update(self.keys)
        self._wake.set()

    def _key_id(self) -> str:
        key = self._signing_key
        return key_id(key) if key is not None else ""

    def is_sensitive(self, name: str, directory: str) -> bool:
        return name in self.sensitive_keys or directory in self.secret_dirs

    def key_names(self) -> list[str]:
        with self._lock:
            return sorted(self.keys)

    def healthy(self) -> tuple[bool, str]:
        """Watchers alive and resyncing; Redis does not matter here (see endpoints)."""
        if not self._watchers:
            return False, "watchers not started"
        # a resync older than a few intervals means its thread is wedged
        limit = 3 * self.resync_interval + 5
        for watcher in self._watchers:
            if not watcher.alive:
                return False, f"watcher of {watcher.directory} is dead"
            last = watcher.last_resync or self._started_at
            if time.monotonic() - last > limit:
                return False, f"watcher of {watcher.directory} has not resynced for {limit:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.stats.redis_connected:
            return False, "Redis is not reachable"
        if not self.stats.initial_publish_done:
            return False, "initial publish not done yet"
        return True, "ok"

    # ------------------------------------------------------------------ publishing
    def _redis(self) -> tuple[AnyRedis, Publisher]:
        """The client and the Publisher, made on first use (``connect_any`` asks the URL's
        node whether it is a cluster node: raises what a failed connection raises)."""
        client, publisher = self._redis_client, self._publisher
        if client is not None and publisher is not None:
            return client, publisher
        client = connect_any(
            self.redis_url,
            socket_timeout=5.0,
            connect_timeout=2.0,
            client_name=client_name("hotreload-pub", process_identity()),
        )
        with self._lock:
            publisher = Publisher(
                client,  # type: ignore[arg-type]  # RedisCluster too: same commands
                prefix=self.prefix,
                history=self.history,
                signing_key=self._signing_key,
            )
            self._redis_client, self._publisher = client, publisher
        if not isinstance(client, redis.Redis):
            logger.info("%s is a Redis Cluster node", redacted(self.redis_url))
        return client, publisher

    @property
    def _client(self) -> AnyRedis:
        """The client (made now if it was not yet: I/O)."""
        return self._redis()[0]

    def _publish_dirty(self) -> bool:
        """Publish every dirty key; False if Redis refused some (retried after a backoff)."""
        _client, publisher = self._redis()
        refused_by_redis = False
        with self._lock:
            pending = [(name, self.keys[name]) for name in sorted(self._dirty)]
        for name, state in pending:
            with self._lock:
                content, digest = state.content, state.sha256
            if digest == state.refused_sha256:
                self._done(name, digest)
                continue
            fresh = self._reread_if_stale(name, state)
            if fresh is not None:
                content, digest = fresh
            try:
                result = publisher.publish(
                    name,
                    content,
                    sensitive=self.is_sensitive(name, state.directory),
                    sha256=digest,  # hashed in _accept: not again for every publish
                )
            except ContentTooLarge as exc:
                logger.error("%s; version %d stays the newest", exc, state.version)
                state.refused_sha256 = digest
                self.stats.publish_errors += 1
                self.metrics.errors.labels(name, "too_large").inc()
                self._done(name, digest)
                continue
            except _CONNECTION_ERRORS:
                raise  # READONLY, CLUSTERDOWN, ... are ResponseErrors too: reconnect, re-seed
            except (redis.ResponseError, PublishConflict) as exc:  # e.g. OOM: retried later
                logger.error("publishing %s failed: %s", name, exc)
                self.stats.publish_errors += 1
                self.metrics.errors.labels(name, "redis").inc()
                refused_by_redis = True
                continue
            state.published_sha256, state.version = result.sha256, result.version
            self.metrics.record_publish(result)
            if result.written:
                state.published_count += 1
                self.stats.last_publish_time = time.time()
                logger.info(
                    "published %s v%d sha256=%s (%d bytes)",
                    name,
                    result.version,
                    result.sha256[:12],
                    result.size,
                )
            else:
                state.skipped_count += 1
                if result.superseded:  # e.g. re-seeding after Redis restarted empty
                    logger.info(
                        "skipped %s: superseded by v%d, which another publisher wrote after "
                        "this mount's content (this mount lags)",
                        name,
                        result.version,
                    )
                else:
                    # v is the entry carrying this content: the newest, or for a daemon
                    # whose kubelet lags another pod's, the one it is catching up with
                    logger.info("skipped %s: already published as v%d", name, result.version)
            if self.on_publish is not None:
                self.on_publish(result)
            self._done(name, digest)
        return not refused_by_redis

    def _reread_if_stale(self, name: str, state: KeyState) -> tuple[bytes, str] | None:
        """The content the mount holds now, when kubelet swapped ``..data`` since ``state`` was
        read and the watcher has not reported it yet; None while ``state`` is current.

        Publishing what the mount held a moment ago could put an older content over a newer
        one: a second daemon on the same mount (or a pod of the same Deployment sharing the
        Redis) may already have published the newer one, and workers would briefly go back.
        One readlink per publish; a re-read only when a swap raced the publish.
        """
        if state.target is None:
            return None
        try:
            current = resolve_target(state.directory)
            if current is None or current == state.target:
                return None
            read = read_mount(state.directory, None if state.snapshot else [name], ())
        except (OSError, ConcurrentSwaps):
            return None  # the watcher will report whatever happened
        if state.snapshot:
            if read.unreadable:
                return None
            content: bytes | None = encode_snapshot(read.files)
        else:
            content = read.files.get(name)
        if content is None:
            return None
        digest = sha256_hex(content)
        with self._lock:
            state.content, state.sha256, state.target = content, digest, read.target
        logger.debug("%s: the mount moved on to %s before publishing; read again", name, current)
        return content, digest

    def _done(self, name: str, digest: str) -> None:
        with self._lock:
            # a newer content may have arrived while we published: then it stays dirty
            if self.keys[name].sha256 == digest:
                self._dirty.discard(name)

    def _check_streams(self, *, reseeding: bool = False) -> None:
        """One round trip (per cluster node): re-seed any key whose stream vanished (deleted,
        Redis reset) or, in a cluster, whose slot changed hands (see the module docstring).
        ``reseeding``: every key is published next anyway (a new connection): no warning."""
        client, _publisher = self._redis()
        with self._lock:
            names = sorted(self.keys)
        if not names:
            client.ping()
            return
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(stream_keys(name, self.prefix).events)
        missing = [name for name, present in zip(names, pipe.execute(), strict=True) if not present]
        if missing and not reseeding:
            logger.warning("events stream missing for %s: publishing again", ", ".join(missing))
        moved = self._moved_slots(client, names)
        if moved and not reseeding:
            logger.warning(
                "a failover or resharding gave %s a new master: publishing again (writes the "
                "old master had not replicated are lost)",
                ", ".join(moved),
            )
        if missing or moved:
            with self._lock:
                self._dirty.update(missing, moved)

    def _forget_workers(self) -> None:
        """HDEL the ``:workers`` entries whose last heartbeat (by Redis's clock) is older than
        ``forget_workers_after``; an entry that does not decode is left for the operator.
        Several daemons sharing a Redis may all do it: HDEL of a gone field is a no-op."""
        client, _publisher = self._redis()
        with self._lock:
            names = sorted(self.keys)
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        limit_ms = self.forget_workers_after * 1000
        for name in names:
            workers_key = stream_keys(name, self.prefix).workers
            raw = cast("dict[bytes, bytes]", client.hgetall(workers_key))
            old = []
            for field, value in raw.items():
                try:
                    heartbeat = decode_worker_state(value).heartbeat
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if heartbeat and now_ms - heartbeat > limit_ms:
                    old.append(field)
            if not old:
                continue
            try:
                client.hdel(workers_key, *old)
            except redis.ResponseError as exc:  # e.g. NOPERM: an ACL without HDEL
                if not self._forget_refused:
                    logger.warning("cannot forget old workers of %s: %s", name, exc)
                    self._forget_refused = True
                continue
            logger.info(
                "forgot %d worker(s) of %s not heard of for over %g s",
                len(old),
                name,
                self.forget_workers_after,
            )

    _forget_refused = False  # warned once that Redis refused HDEL

    def _moved_slots(self, client: AnyRedis, names: list[str]) -> list[str]:
        """Cluster: the keys whose slot has another master than at the previous check (as the
        client's slot map says, which any error or redirect reloads)."""
        if isinstance(client, redis.Redis):
            return []
        moved = []
        for name in names:
            events = stream_keys(name, self.prefix).events
            owner = client.nodes_manager.get_node_from_slot(key_slot(events.encode())).name
            if self._owners.setdefault(name, owner) != owner:
                moved.append(name)
                self._owners[name] = owner
        return moved

    # ------------------------------------------------------------------ main loop
    def request_stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler or another thread)."""
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Start the watchers, then publish until ``request_stop()``; stops everything."""
        endpoints: EndpointServer | None = None
        acks: AckFollower | None = None
        try:
            if self.metrics_port:
                endpoints = EndpointServer(
                    self.metrics_port,
                    registry=self.metrics.registry,
                    healthy=self.healthy,
                    ready=self.ready,
                )
                endpoints.start()
            self._start_watchers()
            self._start_key_watcher()
            for directory, fstype in sorted(self.secret_dirs.items()):
                logger.info(
                    "%s is on %s (a Secret, projected or downwardAPI volume): its keys are "
                    "published as sensitive",
                    directory,
                    fstype,
                )
            if endpoints is not None:
                # after the watchers: it knows the keys at once, so it follows their acks
                # from before the first publish
                acks = AckFollower(self.redis_url, self.key_names, self.metrics, prefix=self.prefix)
                acks.start()
            self._loop()
        finally:
            if endpoints is not None:
                endpoints.stop()
            if acks is not None:
                acks.stop()
            for watcher in self._watchers:
                watcher.stop()
            if self._key_watcher is not None:
                self._key_watcher.stop()
            if self._redis_client is not None:
                self._redis_client.close()
            logger.info("stopped")

    def _loop(self) -> None:
        backoff = Backoff(base=0.2, cap=3.0)
        next_check = 0.0
        next_forget = 0.0
        url = redacted(self.redis_url)
        while not self._stop.is_set():
            try:
                if not self.stats.redis_connected:
                    # every key's stream, not only a PING: in a cluster, the node of each
                    # key's slot (a dead master's keys stay disconnected until a failover)
                    self._check_streams(reseeding=True)
                    next_check = time.monotonic() + self.check_interval
                    self.stats.redis_connected = True
                    self.metrics.redis_up.set(1)
                    logger.info("connected to Redis at %s; publishing every key", url)
                    with self._lock:
                        self._dirty.update(self.keys)
                if not self._publish_dirty():
                    self._stop.wait(backoff.next_delay())
                    continue
                backoff.reset()
                if not self.stats.initial_publish_done and not self._dirty:
                    self.stats.initial_publish_done = True
                    logger.info("initial publish done (%d keys)", len(self.keys))
                if time.monotonic() >= next_check:
                    self._check_streams()
                    next_check = time.monotonic() + self.check_interval
                if self.forget_workers_after and time.monotonic() >= next_forget:
                    self._forget_workers()
                    # often enough that an entry outlives the limit by at most a few percent
                    interval = min(_FORGET_CHECK_INTERVAL, self.forget_workers_after / 4)
                    next_forget = time.monotonic() + interval
            except _CONNECTION_ERRORS as exc:
                if self.stats.redis_connected:
                    logger.warning("lost Redis at %s: %s; retrying", url, exc)
                    self.stats.reconnects += 1
                    self.metrics.reconnects.inc()
                elif describe_failure(exc, self.redis_url) != str(exc):
                    # TLS verification and the like: a wrong setup, not a Redis still
                    # starting; said once per distinct reason, retried all the same
                    reason = describe_failure(exc, self.redis_url)
                    if reason != self._setup_error:
                        logger.error("cannot connect to Redis at %s: %s", url, reason)
                        self._setup_error = reason
                else:
                    logger.debug("Redis at %s still unreachable: %s", url, exc)
                self.stats.redis_connected = False
                self.metrics.redis_up.set(0)
                _disconnect(self._redis_client)
                self._stop.wait(backoff.next_delay())
                continue
            with self._lock:
                more = bool(self._dirty) and self.stats.redis_connected
            if not more:
                self._wake.wait(max(0.0, next_check - time.monotonic()))
                self._wake.clear()


def _disconnect(client: AnyRedis | None) -> None:
    """Close every pooled connection; a cluster client reloads its slot map on the next error
    or redirect anyway (redis-py does, before raising or retrying)."""
    if client is None:
        return
    if isinstance(client, redis.Redis):
        client.connection_pool.disconnect()
    else:
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
