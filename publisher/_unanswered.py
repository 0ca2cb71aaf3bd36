"""The publish script's argument list, and what a publish whose answer was lost may have done.

``publish.lua`` takes its arguments by position (``publisher.publish`` builds them; the
script's header lists them). A lost connection (``redis.ConnectionError``, ``TimeoutError``)
may end a call after Redis ran the script: the entry was appended, and a worker connected
directly may run it already, while the publisher never learned its version. Should that Redis
then restart EMPTY (no persistence) before the workers report again, the publisher's floor
(``Publisher.highest_version``) and the workers' rows and ``:floor`` are all below that
version: the re-seed numbered the mount's next content the same (v3 = C2 applied, v3 = C3
re-seeded), each worker refused it as a replay of what it had seen, and ran the lost C2 until
the next change (the corner docs/operations.md "Failure behaviour" describes).

So a call that raised one of ``LOST`` after its command may have reached Redis counts as
written at the version it would have been given: ``max(floor, above) + 1`` (in extended mode
at least the version signed for), and the publisher's floor is raised to it before the error
goes on (``unanswered``). The re-seed is then numbered above it (v4 = C3), which the workers
apply. A call that failed connecting or writing (``may_have_run``: a publish on a Redis known
dead, an idle daemon's kubelet swap before its check found Redis gone) raises nothing, unless
the hand-packed ``EVALSHA`` of the same call lost its answer first (``publisher._fast``
retries that through redis-py's ``Script``, which then met the dead Redis: the common way
this corner comes). What that costs, case by case:

- the script ran and wrote, and Redis kept it (a connection lost, not Redis): the re-seed
  finds the content at the head, numbered exactly there: nothing is written;
- the script never ran (the connection died after the command went out, before Redis read
  it), or ran and found the content: a version is skipped (v4 follows v2). Nothing counts
  on consecutive versions: workers take anything above what they saw, and ``hotreload wait
  --version 3`` says at once that v3 can never appear (below the newest, not in the
  history), as for a trimmed one; no log line ever named the skipped number. The re-seed,
  or the sweep's "stream numbered below what this daemon wrote", may publish the content
  found at the head again once, as v4 above the v2 (the daemon passes its floor as
  ``above``, and a stream below ``above`` is written to whatever it holds): one entry the
  workers adopt without a callback (same hash), after which the floor is what Redis
  answered;
- the stream had moved past ``max(floor, above)`` (another publisher's entries): the guess is
  low, the collision remains possible; the workers detect it and the sweep ends it
  (``subscriber._walk``: a worker holds when the stream's version N is not the entry it
  applied as N; ``publisher.upkeep``: such a key is published above the stream's newest).

A call that passed the content the publisher's base already carries (``held``: a re-seed of an
unchanged key) leaves the floor: were it written, it carries the content the workers run
already, and a floor raised by a guess would hide, from the superseded rule (``publish.lua``:
"written by someone who had seen further" is a version above the floor), another publisher's
newer entry numbered exactly there: a lagging mount would publish its older content over it.
Each lost call raises the floor by one at most, and the daemon publishes again only once
reconnected (its checks go first; a publish that cannot connect raises nothing), so a Redis
that stays down skips no more versions.
A key whose first publish was lost is in ``highest_version`` from then on: the daemon's first
publish wait (``publisher._restored``) is over for it, as it already ended before that call.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import redis

__all__ = ["LOST", "Arg", "may_have_run", "unanswered", "with_seen"]

Arg = bytes | str | int | float  # one of the script's arguments
# The answer may be lost: Redis may have run the script (refusals such as READONLY did not).
LOST = (redis.ConnectionError, redis.TimeoutError, OSError)
_DIGEST, _FLOOR, _HELD, _ABOVE, _EXPECTED = 0, 7, 9, 10, 11  # positions in the argument list


def with_seen(*args: Arg, seen: str) -> list[Arg]:
    """The script's arguments, ``seen`` as ARGV[12] after the plain ones, ARGV[24] after the
    extended ones (the rollout ones padded), when known: older arguments lists stay valid."""
    if not seen:
        return list(args)
    return [*args, *[""] * (23 - len(args) if len(args) > 11 else 0), seen]


def may_have_run(exc: BaseException) -> bool:
    """Whether the command may have reached Redis whole before ``exc``: not when redis-py
    failed connecting (``Error 111 connecting to ...``, ``Timeout connecting to server``) or
    writing (``... while writing to socket``, ``Timeout writing to socket``); Redis runs only
    a whole command. Any other error (the answer unread: ``Connection closed by server``,
    ``Timeout reading from ...``, or a wording not known here): it may have."""
    text = str(exc)
    return "connecting to" not in text and "writing to socket" not in text


def unanswered(
    highest: MutableMapping[str, int],
    key: str,
    args: Sequence[Arg],
    exc: BaseException,
    *,
    lost_before: bool = False,
) -> None:
    """A call with ``args`` for ``key`` raised ``exc``: unless it never reached Redis (nor an
    earlier attempt of the same call: ``lost_before``), raise ``highest[key]`` to the version
    the script would have written (see the module docstring)."""
    if not (lost_before or may_have_run(exc)):
        return
    if args[_HELD] and args[_HELD] == args[_DIGEST]:
        return
    guess = max(int(args[_FLOOR] or 0), int(args[_ABOVE] or 0)) + 1
    expected = args[_EXPECTED] if len(args) > 12 else ""  # extended: the version signed for
    if isinstance(expected, int):
        guess = max(guess, expected)
    highest[key] = max(highest.get(key, 0), guess)
