"""The exit codes of ``hotreload`` and its one-line error, shared by every command.

== =========================================================================================
0  success (``wait``: every live worker runs the version)
1  ``wait``: a live worker rejected the version (each one's reason is printed)
2  bad flags or input: unknown key or version, malformed URL, invalid key name or prefix;
   ``wait`` timing out (the workers still behind are named); ``watch`` or ``demo`` without
   the ``[publisher]`` extra installed
3  Redis unreachable or failing (the query commands connect with a 2 s timeout)
== =========================================================================================
"""

from __future__ import annotations

import sys

__all__ = [
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "fail",
]

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 2  # as the issue specifies; "behind" and bad input are both "not done"
EXIT_UNAVAILABLE = 3


def fail(message: str, code: int) -> int:
    """Print ``hotreload: error: MESSAGE`` on stderr (never a traceback); return ``code``."""
    print(f"hotreload: error: {message}", file=sys.stderr)
    return code
