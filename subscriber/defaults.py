"""The defaults the publisher and the subscribers share, in one place.

Both sides must agree on these: a subscriber finds what the publisher wrote under the same key
prefix and URL variable, walks back at most the history the publisher keeps, and the CLI
judges a worker stale by the same heartbeat rule the worker was told about. So each value is
defined once, here, and imported by both packages (workers install only ``subscriber``, hence
the module lives in it). It imports nothing: reading a default loads no Redis client.

The wire contract's limits (``MAX_CONTENT_BYTES``, ``SCHEMA_VERSION``) are not defaults but
part of the contract, and stay in ``protocol``.
"""

from __future__ import annotations

__all__ = [
    "ACK_HISTORY",
    "BACKOFF_CAP",
    "BLOCK_MS",
    "CONNECT_TIMEOUT",
    "DEFAULT_FORGET_WORKERS_AFTER",
    "DEFAULT_HISTORY",
    "DEFAULT_PREFIX",
    "ENV_URL",
    "FAILOVER_BACKOFF_CAP",
    "FINAL_WRITE_TIMEOUT",
    "HEARTBEAT_INTERVAL",
    "HISTORY_READ_CAP",
    "MALFORMED_LOG_INTERVAL",
    "MALFORMED_TOLD_ONE_BY_ONE",
    "MIN_HEARTBEAT_INTERVAL",
    "REPLAY_LIMIT",
    "REPLAY_TOLERANCE_MS",
    "SLOW_CALLBACK",
    "SOCKET_TIMEOUT_MARGIN",
    "STALE_AFTER_BEATS",
    "STOP_TIMEOUT",
]

# -- where: the Redis URL and the key names ---------------------------------------------------

# The environment variable holding the Redis URL when none is given (--redis, redis_url=).
ENV_URL = "HOTRELOAD_REDIS_URL"
# Key prefix: a config key's stream is ``{prefix}:{{KEY}}:events`` (see ``keys``).
DEFAULT_PREFIX = "hotreload"

# -- how much history ---------------------------------------------------------------------------

# Events the publisher keeps per config key (approximate trimming) ...
DEFAULT_HISTORY = 100
# ... and entries a subscriber examines walking back (start(), a resync): all of them.
REPLAY_LIMIT = DEFAULT_HISTORY
# Entries read at most to find the highest version of a history whose versions do not
# decrease newest first (old entries appended again): the newest is not the last appended.
HISTORY_READ_CAP = 1000
# An entry whose stream id (Redis's clock at XADD, in ms) is at most this far after its
# ``published_at`` (the publisher's clock, signed in signed mode) was appended when it was
# published: a fresh walk that finds the newest entry on time takes it without reading the
# rest of the history. An old entry appended again carries its old ``published_at`` and is
# late, and so is everything a publisher retried long after signing: the walk then reads on
# for the highest version. The clock skew between the publisher and Redis must stay below
# this; a larger skew only makes every fresh walk read on (costs reads, never a wrong
# choice). An entry appended again within this long of its signing is not told from the
# original by a fresh worker; running workers refuse it by version anyway.
REPLAY_TOLERANCE_MS = 2000
# Approximate length the ``:acks`` stream is trimmed to by the workers that write it.
ACK_HISTORY = 1000

# -- timeouts and backoff ---------------------------------------------------------------------

# XREAD BLOCK time of a follower (the subscriber's, the daemon's ack follower).
BLOCK_MS = 5000
# The socket timeout of a blocking reader sits this far above its block time: long enough that
# a slow reply to a blocking read is not mistaken for a dead server, short enough to notice a
# frozen one.
SOCKET_TIMEOUT_MARGIN = 3.0
# Connect timeout of every connection (at most: a shorter socket timeout lowers it).
CONNECT_TIMEOUT = 2.0
# Cap of the jittered exponential backoff between reconnects.
BACKOFF_CAP = 3.0
# In a Redis Cluster or behind Sentinel other nodes keep answering while a replica takes over
# (a few seconds): retry sooner, so workers find the new master soon after it is promoted
# (measured by tests/benchmarks/bench_failover.py). Asking costs one CLUSTER SLOTS or one
# question to a sentinel.
FAILOVER_BACKOFF_CAP = 1.0
# stop() writes the final "stopped" state with these timeouts, so it stays prompt even when
# Redis is frozen or gone.
FINAL_WRITE_TIMEOUT = 0.5
# stop() waits at most this long (seconds) for the follower to end; a callback that never
# returns would otherwise hang the process's exit (atexit) or a gunicorn worker's. It then
# logs which callback it gave up on and records "stopped" with the reason itself.
STOP_TIMEOUT = 5.0

# -- callbacks and junk -----------------------------------------------------------------------

# A callback running longer than this (seconds) shows: the subscriber's ``status`` says
# "stalled" (its heartbeat stops too, so ``hotreload status`` soon calls the worker stale).
SLOW_CALLBACK = 10.0
# Malformed entries a subscriber acks and logs one by one per interval of this many seconds;
# beyond them, one ack per read and one summary line per interval (see subscriber._junk).
MALFORMED_TOLD_ONE_BY_ONE = 10
MALFORMED_LOG_INTERVAL = 5.0

# -- heartbeats -----------------------------------------------------------------------------

# Seconds between a worker's refreshes of its ``:workers`` entry.
HEARTBEAT_INTERVAL = 5.0
# A worker whose entry was not refreshed for this many of its intervals is stale (hung or
# SIGKILLed) ...
STALE_AFTER_BEATS = 3
# ... counting an interval shorter than this (or none) as this long.
MIN_HEARTBEAT_INTERVAL = 1.0
# The publisher removes workers not heard of for this long from ``:workers`` (gunicorn recycles
# and rollouts would otherwise grow the hash forever); 0 keeps them.
DEFAULT_FORGET_WORKERS_AFTER = 3600.0
