"""``hotreload console``: a local, read-only web page of what the query commands show.

Every key with its newest version and state; its workers (version, status, error, heartbeat,
live / stale / gone); a timeline of the versions published and of when each worker applied or
rejected them; the history with diffs; rejection reasons; rollout state when the status
carries one. The page follows changes live (it polls once a second) and is served by the
standard library from three files shipped in the package, so it works offline and where only
the worker's dependencies (redis, msgspec) are installed.

- :mod:`.model`: the JSON documents, built from ``publisher.inspect`` and the CLI's ``--json``
  renderings (no query of its own), with the reads one refresh can keep for the next;
- :mod:`.server`: the HTTP server (loopback by default, GET only, a strict CSP);
- :mod:`.options`: its flags; :mod:`.command`: the flags -> a running server.

Nothing here writes to Redis: the ``operator`` ACL user (read-only) is enough, and the tests
run the console as such a user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from subscriber._lazy import lazy_names

if TYPE_CHECKING:
    from publisher.console.model import Model
    from publisher.console.server import Console

__all__ = ["Console", "Model"]

# lazy: the parser imports .options, which must not load redis with it
_HOMES = {"Console": "publisher.console.server", "Model": "publisher.console.model"}
__getattr__, __dir__ = lazy_names(globals(), _HOMES, __all__)
