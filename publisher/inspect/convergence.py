"""Where a key's workers stand: their rows, who is live, and convergence on a target version.

Two rules decide what the operator sees, each in one function:

- :func:`liveness`: a worker is *live* while its last heartbeat is at most
  ``STALE_AFTER_BEATS`` heartbeat intervals old (intervals under 1 s count as 1 s), *stale*
  after that (SIGKILLed, frozen or partitioned: it runs no exit hook), and *gone* once it
  reported ``stopped``. Only live workers count for convergence.
- :func:`assess`: for one key and one target version, which live workers run it (same version
  and same sha256), which rejected it (their state says so, or an ``:acks`` entry does), and
  which are behind. ``wait`` polls it; ``status`` shows it for the newest version.

A worker state that does not decode is a row with status ``invalid`` that never counts.
States are decoded loosely (a status this version does not know, fields it does not have):
a worker newer than this CLI still shows. A worker ``holding`` (the stream is behind what it
has seen: Redis restored older, failed over, re-created, or an old entry replayed) keeps its
config and says why; ``assess`` counts it apart from those merely behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import msgspec
import redis

from publisher._floor import MAX_STATE_BYTES, read_workers
from publisher.inspect._liveness import Liveness, liveness, server_now_ms
from publisher.inspect.events import (
    ack_matches,
    acks_after,
    highest,
    list_keys,
    require_stream,
)
from publisher.inspect.rollout import NO_ROLLOUT, RolloutView, read_marks, view_of
from subscriber.defaults import STALE_AFTER_BEATS
from subscriber.keys import StreamKeys, stream_keys
from subscriber.protocol import Ack, Event

if TYPE_CHECKING:
    from redis.cluster import ClusterNode

    from publisher._admin import AnyRedis

__all__ = [
    "STALE_AFTER_BEATS",
    "AckReader",
    "Convergence",
    "ConvergenceState",
    "Expected",
    "Liveness",
    "StatusReport",
    "WorkerRejection",
    "WorkerRow",
    "ack_rejections",
    "assess",
    "liveness",
    "server_now_ms",
    "status",
    "worker_rows",
]


ConvergenceState = Literal[
    "converged", "behind", "holding", "rejected", "no-live-workers", "unpublished"
]


class _State(msgspec.Struct, frozen=True, kw_only=True):
    """A ``WorkerState`` decoded loosely: any status, fields it may not have yet (``seen``)."""

    status: str
    version: int = 0
    sha256: str = ""
    error: str = ""
    rejected_version: int = 0
    seen: int = 0
    heartbeat: int = 0
    heartbeat_interval: float = 0.0


_state_decoder = msgspec.json.Decoder(_State)


# ---------------------------------------------------------------------------- workers


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One field of a key's ``:workers`` hash as the operator sees it.

    ``status`` is the worker's own (starting / applied / rejected / fallback / stopped), or
    ``invalid`` when the hash value is not a ``WorkerState`` (``error`` then says why).
    ``heartbeat_age_s`` is ``None`` when the worker never sent one.
    """

    key: str
    worker: str
    status: str
    version: int
    sha256: str
    error: str
    rejected_version: int
    heartbeat_age_s: float | None
    liveness: Liveness
    seen: int = 0  # the highest version it processed, applied or rejected

    @property
    def live(self) -> bool:
        return self.liveness == "live"


def worker_rows(client: AnyRedis, key: str, keys: StreamKeys, now_ms: int) -> list[WorkerRow]:
    """The key's workers, read with the daemon's bounds (``publisher._floor.read_workers``:
    at most ``MAX_WORKERS`` fields, a value over ``MAX_STATE_BYTES`` is an ``invalid`` row)."""
    rows = []
    for raw_worker, raw_state in sorted(read_workers(client, keys.workers)):
        worker = raw_worker.decode("utf-8", "replace")
        try:
            if raw_state is None:
                raise ValueError(f"over {MAX_STATE_BYTES} bytes, not read")
            state = _state_decoder.decode(raw_state)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            # unreadable means unknown heartbeat: it cannot be shown live, so it never counts
            reason = f"unreadable state: {exc}"
            rows.append(WorkerRow(key, worker, "invalid", 0, "", reason, 0, None, "stale"))
            continue
        age = max(0, now_ms - state.heartbeat) / 1000 if state.heartbeat else None
        rows.append(
            WorkerRow(
                key=key,
                worker=worker,
                status=state.status,
                version=state.version,
                sha256=state.sha256,
                error=state.error,
                rejected_version=state.rejected_version,
                heartbeat_age_s=age,
                liveness=liveness(state, now_ms),
                seen=max(state.seen, state.version, state.rejected_version),
            )
        )
    return rows


# ---------------------------------------------------------------------------- convergence


@dataclass(frozen=True, slots=True)
class Expected:
    """The version a key's workers should run, identified by number and content hash."""

    version: int
    sha256: str

    @classmethod
    def of(cls, event: Event) -> Expected:
        return cls(event.version, event.sha256)


@dataclass(frozen=True, slots=True)
class WorkerRejection:
    """A live worker that refused the expected version, with its reason."""

    worker: str
    version: int
    error: str


@dataclass(frozen=True, slots=True)
class Convergence:
    """Where one key's live workers stand with respect to ``target``."""

    key: str
    target: Expected | None  # None: nothing (well-formed) published yet
    live: tuple[str, ...]
    current: tuple[str, ...]  # live workers running the target
    behind: tuple[WorkerRow, ...]  # live, not running it, not rejecting it
    rejected: tuple[WorkerRejection, ...]  # live workers that rejected it
    stale: tuple[str, ...]
    gone: tuple[str, ...]
    # live workers holding: the stream is behind what they have seen (their error says why)
    holding: tuple[WorkerRow, ...] = ()
    # the rollout state (inspect.rollout); during a canary, ``target`` is the version every
    # worker outside the canary runs, and the canary workers are expected on the canary
    rollout: RolloutView = NO_ROLLOUT
    # workers that stopped with an error (their follower ended: the process may still serve
    # its old config, following nothing) without running the target; gone, yet never fine
    failed: tuple[WorkerRejection, ...] = ()

    @property
    def state(self) -> ConvergenceState:
        if self.target is None:
            return "unpublished"
        if self.rejected:
            return "rejected"
        if not self.live:
            return "no-live-workers"
        if self.holding:
            return "holding"
        return "behind" if self.behind else "converged"


def _runs(row: WorkerRow, target: Expected) -> bool:
    return row.version == target.version and (not row.sha256 or row.sha256 == target.sha256)


def assess(
    key: str,
    target: Expected | None,
    workers: Iterable[WorkerRow],
    rejected_by_ack: Mapping[str, str],
    *,
    rollout: RolloutView | None = None,
) -> Convergence:
    """Classify workers for ``target``; ``rejected_by_ack`` maps worker -> error for it.

    A rejection counts only from a live worker that does not run the target now (a retry
    may have applied it since); acks of stale or unknown workers are history, not a verdict.
    A worker ``stopped`` with an error (its follower ended on it, "restart it") that does not
    run the target is ``failed``: gone, yet its process may still serve its old config.
    """
    rows = list(workers)
    live = [r for r in rows if r.live]
    current, behind, rejected, holding = [], [], [], []
    canary = rollout.newest if rollout is not None and rollout.state == "canary" else None
    audience = set(rollout.canary) if canary is not None and rollout is not None else set()
    general = target
    for row in live:
        target = general
        if canary is not None and row.worker in audience:
            target = Expected(canary.version, canary.sha256)
        if target is None:
            continue
        if _runs(row, target):
            current.append(row.worker)
        elif row.status == "holding" or row.seen > target.version:
            holding.append(row)
        elif row.status == "rejected" and row.rejected_version == target.version:
            rejected.append(WorkerRejection(row.worker, target.version, row.error))
        elif row.worker in rejected_by_ack:
            rejected.append(
                WorkerRejection(row.worker, target.version, rejected_by_ack[row.worker])
            )
        else:
            behind.append(row)
    failed = []
    for row in rows:
        target = general
        if canary is not None and row.worker in audience:
            target = Expected(canary.version, canary.sha256)
        if row.status == "stopped" and row.error and target and not _runs(row, target):
            failed.append(WorkerRejection(row.worker, row.version, row.error))
    return Convergence(
        key=key,
        target=general,
        live=tuple(r.worker for r in live),
        current=tuple(current),
        behind=tuple(behind),
        rejected=tuple(rejected),
        stale=tuple(r.worker for r in rows if r.liveness == "stale"),
        gone=tuple(r.worker for r in rows if r.liveness == "gone"),
        holding=tuple(holding),
        rollout=rollout or NO_ROLLOUT,
        failed=tuple(failed),
    )


def ack_rejections(acks: Iterable[Ack], target: Expected) -> dict[str, str]:
    return {
        a.worker: a.error
        for a in acks
        if a.status == "rejected" and ack_matches(a, target.version, target.sha256)
    }


@dataclass(frozen=True, slots=True)
class StatusReport:
    workers: tuple[WorkerRow, ...]
    summaries: tuple[Convergence, ...]
    # why Redis refuses writes now ("OOM ..."), "" when it does not or cannot be told: the
    # newest version shown may then be behind the mounts (see refused_writes)
    refuses_writes: str = ""
    # keys whose streams could not be read (e.g. WRONGTYPE): key -> Redis' answer
    unreadable: tuple[tuple[str, str], ...] = ()


def refused_writes(client: AnyRedis) -> str:
    """Why Redis refuses writes now, from ``INFO memory``: used memory at ``maxmemory`` with
    ``maxmemory-policy noeviction`` (publishes fail until history gives way, workers' reports
    fail). On a Redis Cluster every master is asked, and each one refusing is named (the
    keys of its slots cannot be published). "" when it accepts them, or when this user may
    not run ``INFO`` (the shipped ``operator`` user may not: then nothing is said)."""
    if isinstance(client, redis.Redis):
        return _refusing(client, None)
    nodes = client.nodes_manager.get_nodes_by_server_type("primary")
    refusing = [reason for node in nodes if (reason := _refusing(client, node))]
    if not refusing:
        return ""
    return (
        f"{'; '.join(refusing)}: new versions of their keys may not be published (the "
        "publisher trims history to make room) and workers' reports are refused"
    )


def _refusing(client: AnyRedis, node: ClusterNode | None) -> str:
    """``OOM[ on NODE]: used memory ..., maxmemory ... (noeviction)`` of a Redis (a cluster's
    ``node``) at its limit, else ""."""
    try:
        if node is None:
            info = cast(dict[str, object], client.info("memory"))
        else:
            info = cast(dict[str, object], client.info("memory", target_nodes=node))
    except redis.RedisError:
        return ""
    try:
        limit = int(cast(int, info.get("maxmemory", 0)))
        used = int(cast(int, info.get("used_memory", 0)))
        used -= int(cast(int, info.get("mem_not_counted_for_evict", 0)))
    except (TypeError, ValueError, AttributeError):
        return ""
    if not limit or used < limit or info.get("maxmemory_policy") != "noeviction":
        return ""
    memory = f"used memory {used / 1048576:.1f} MiB, maxmemory {limit / 1048576:.1f} MiB"
    if node is not None:
        return f"OOM on {node.name}: {memory} (noeviction)"
    return (
        f"OOM: {memory} (noeviction): new versions may not be published (the publisher "
        "trims history to make room) and workers' reports are refused"
    )


# Reads every decodable ack of an ``:acks`` stream, oldest first, as ``events.acks_after``
# does; the daemon passes one that keeps what it read before (publisher.ackwatch).
AckReader = Callable[["AnyRedis", str], list[Ack]]


def _key_status(
    client: AnyRedis,
    key: str,
    prefix: str,
    now_ms: int,
    *,
    read_acks: AckReader | None = None,
    signing_key: bytes | None = None,
) -> tuple[Convergence, list[WorkerRow]]:
    keys = stream_keys(key, prefix)
    newest: Event | None = highest(client, keys.events, signing_key)
    target = Expected.of(newest) if newest else None
    rollout = view_of(read_marks(client, keys.events))
    if rollout.state == "canary" and rollout.stable is not None:
        target = Expected(rollout.stable.version, rollout.stable.sha256)  # everyone else's
    workers = worker_rows(client, key, keys, now_ms)
    rejected_by_ack: dict[str, str] = {}
    if target is not None:
        acks = read_acks(client, keys.acks) if read_acks is not None else None
        if acks is None:
            acks = acks_after(client, keys.acks)[0]
        rejected_by_ack = ack_rejections(acks, target)
    return assess(key, target, workers, rejected_by_ack, rollout=rollout), workers


def status(
    client: AnyRedis,
    key: str | None = None,
    *,
    prefix: str,
    read_acks: AckReader | None = None,
    signing_key: bytes | None = None,
    check_memory: bool = False,
) -> StatusReport:
    """Every worker of ``key`` (default: of every key under ``prefix``) and a summary per key.

    A named key is unknown only when it has neither events nor workers: workers that started
    before the first publish are worth seeing. ``read_acks`` replaces reading each ``:acks``
    stream whole (the daemon's status pass keeps the acks it read before). The target is
    the highest version (with ``signing_key``: the highest that verifies with it). A key
    whose streams cannot be read (WRONGTYPE: something else wrote there) is named in
    ``unreadable`` and the other keys are reported all the same. ``check_memory``: ask
    Redis (``INFO``) whether it refuses writes (``refused_writes``); the daemon, which knows
    from its own publishes, does not.
    """
    if key is None:
        names = list_keys(client, prefix)
    else:
        keys = stream_keys(key, prefix)
        if not client.exists(keys.events, keys.workers):
            require_stream(client, key, keys, prefix)
        names = (key,)
    now_ms = server_now_ms(client)
    summaries = []
    workers: list[WorkerRow] = []
    unreadable: list[tuple[str, str]] = []
    for name in names:
        try:
            summary, rows = _key_status(
                client, name, prefix, now_ms, read_acks=read_acks, signing_key=signing_key
            )
        except (redis.ResponseError, msgspec.DecodeError) as exc:  # e.g. WRONGTYPE: this key
            if isinstance(exc, _REFUSALS_OF_THE_CONNECTION):
                raise
            unreadable.append((name, str(exc)))
            continue
        summaries.append(summary)
        workers += rows
    refusing = refused_writes(client) if check_memory else ""
    return StatusReport(tuple(workers), tuple(summaries), refusing, tuple(unreadable))


# Errors about the connection or this user, not about one key: status fails as a whole.
_REFUSALS_OF_THE_CONNECTION = (
    redis.exceptions.NoPermissionError,
    redis.exceptions.AuthenticationError,
    redis.exceptions.ReadOnlyError,
)
