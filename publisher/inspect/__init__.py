"""Read-only queries behind ``hotreload history / show / diff / status / wait``.

Everything here returns frozen value objects and prints nothing; ``publisher.cli`` renders.
Malformed stream entries and worker states become rows that say what is wrong with them,
never exceptions: an operator inspects a broken system precisely when it is broken.

- :mod:`.events`: a key's events and acks streams -- ``history``, ``find_event`` (which
  guards sensitive content), ``list_keys``;
- :mod:`.convergence`: the workers' rows, the liveness rule and :func:`assess`, ``status``;
- :mod:`.wait`: ``wait_for``, polling ``assess`` until the workers run a version.

Every function takes a standalone client or redis-py's ``RedisCluster``
(``publisher._admin.connect_any``): one key's commands go to its slot's node (the ``{KEY}``
hash tag), :func:`list_keys` scans every master, and no transaction spans two keys.
Nothing here imports watchdog or prometheus_client: the query commands run where only the
worker's dependencies (redis, msgspec) are installed.
"""

from publisher.inspect.convergence import (
    STALE_AFTER_BEATS,
    AckReader,
    Convergence,
    ConvergenceState,
    Expected,
    Liveness,
    StatusReport,
    WorkerRejection,
    WorkerRow,
    assess,
    liveness,
    status,
)
from publisher.inspect.events import (
    HistoryRow,
    MalformedVersion,
    NotFound,
    SensitiveContent,
    find_event,
    history,
    list_keys,
)
from publisher.inspect.wait import WaitResult, wait_for

__all__ = [
    "STALE_AFTER_BEATS",
    "AckReader",
    "Convergence",
    "ConvergenceState",
    "Expected",
    "HistoryRow",
    "Liveness",
    "MalformedVersion",
    "NotFound",
    "SensitiveContent",
    "StatusReport",
    "WaitResult",
    "WorkerRejection",
    "WorkerRow",
    "assess",
    "find_event",
    "history",
    "list_keys",
    "liveness",
    "status",
    "wait_for",
]
