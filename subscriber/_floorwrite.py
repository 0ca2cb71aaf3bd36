"""A worker's ``:floor`` score: the highest version it has seen, where the publish reads it.

Every version is numbered above what the key's workers have seen (``publisher._floor``). The
daemon used to read that floor from ``:workers`` for each publish: every worker's JSON state,
decoded in Python -- at 128 workers ~2 ms of its main thread's CPU per publish, between
kubelet's rename and the entry (issue 21). So each report that writes the worker's state also
writes ``ZADD <prefix>:{key}:floor GT <seen> <worker>`` just before the state's ``HSET``, in
the same pipeline (no round trip or wake-up more; in Redis before the row, as both go in order
on one connection): the publish script reads the highest score, one ``O(log N)`` read.
``WorkerState.floor`` says the worker does so; the daemon trusts ``:floor`` only while every
row of ``:workers`` says it (``publisher._earlyfloor``).

Refused (``NOPERM``: an ACL from before ``:floor``, the workers upgraded first), it is not
sent again by this subscriber, and its state says ``floor: false`` from then on, so the
daemon keeps reading ``:workers`` for that key and the worker logs one warning, not one per
report. Seen 0 writes nothing: nothing to number above.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import redis

from subscriber._wire import Batch
from subscriber.protocol import WorkerState

__all__ = ["FloorWrite"]


class FloorWrite:
    """One subscriber's ``ZADD GT`` on its key's ``:floor``, queued with its state."""

    __slots__ = ("_key", "_queued", "refused")

    def __init__(self, floor_key: str) -> None:
        self._key = floor_key
        self._queued = False  # the last state's ZADD is in the batch being executed
        self.refused = False

    def queue(self, pipe: Batch, state: WorkerState) -> WorkerState:
        """Queue the ZADD of ``state``'s floor (before its ``HSET``); the state to write."""
        if self.refused:
            self._queued = False
            return msgspec.structs.replace(state, floor=False)
        seen = max(state.version, state.rejected_version, state.seen)
        self._queued = seen > 0
        if self._queued:
            pipe.zadd_gt(self._key, seen, state.worker)
        return state

    def answered(self, results: list[Any], writes: int, log: logging.Logger, key: str) -> None:
        """The replies of a batch of ``writes`` reports (the state last, its ZADD just
        before): the ZADD's refusal handled here, any other refusal logged (once a batch)."""
        queued, self._queued = self._queued, False
        if queued and 2 <= writes <= len(results):
            reply = results[writes - 2]
            if isinstance(reply, redis.exceptions.NoPermissionError):
                self.refused = True
                log.warning(
                    "%s: Redis refused this worker's ZADD on :floor (%s): not sent again; the "
                    "publisher reads its floor from :workers. Regenerate the ACL users "
                    "(deploy/redis/gen-users-acl.sh) to let it write :floor",
                    key,
                    reply,
                )
                results = [*results[: writes - 2], 0, *results[writes - 1 :]]
        for result in results[:writes]:
            if isinstance(result, Exception):
                # A report Redis refused (e.g. OOM under maxmemory) must not stop the
                # config from being followed; the state is rewritten with the next beat.
                log.warning("%s: Redis refused a report: %s", key, result)
                break
