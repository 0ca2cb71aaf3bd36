"""``hotreload rollback | promote | halt KEY``: a request to the daemons, and their answer.

The CLI writes no event: it appends a request to the key's ``:control`` stream (the operator
ACL user may XADD there and nowhere else) and waits, reading the same stream after its
request, for the first reply naming it (``publisher.control`` is the daemon's side). Exit
codes as ``wait``'s: 0 done, 1 refused (the reply says why: no canary to promote, the key
moved on, no earlier content...), 2 bad input or no reply within ``--timeout`` (no daemon
running for the key, or one of a release without rollout control), 3 Redis failing.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

from publisher._rolloutwire import CONTROL_MAXLEN, control_key
from publisher.cli.exits import EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT, fail
from publisher.inspect.events import find_event, require_stream
from subscriber.keys import stream_keys
from subscriber.protocol import now_ms, process_identity

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["request_control"]

_READ_BLOCK_MS = 500  # under the CLI's 2 s socket timeout


def _text(raw: object) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def request_control(client: AnyRedis, args: argparse.Namespace) -> int:
    key, prefix = args.key, args.prefix
    require_stream(client, key, stream_keys(key, prefix), prefix)
    stream = control_key(key, prefix)
    request_id = uuid.uuid4().hex
    to = getattr(args, "to", 0) or 0
    if to:
        find_event(client, key, to, prefix=prefix)  # NotFound (exit 2) before asking anyone
    fields: dict[Any, Any] = {
        "op": args.command,
        "to": str(to) if to else "",
        "id": request_id,
        "by": process_identity(),
        "at": str(now_ms()),
    }
    cursor = _text(client.xadd(stream, fields, maxlen=CONTROL_MAXLEN, approximate=True))
    deadline = time.monotonic() + args.timeout
    while (left := deadline - time.monotonic()) > 0:
        block = max(1, min(_READ_BLOCK_MS, int(left * 1000)))
        reply = cast(list[Any], client.xread({stream: cursor}, count=100, block=block) or [])
        for _stream, entries in reply:
            for entry_id, raw in entries:
                cursor = _text(entry_id)
                answer = {_text(k): _text(v) for k, v in raw.items()}
                if answer.get("reply_to") != request_id:
                    continue
                message = answer.get("message", "")[:500]
                if answer.get("ok") == "1":
                    print(message)
                    return EXIT_OK
                return fail(message or f"{args.command} refused", EXIT_REJECTED)
    return fail(
        f"no daemon answered the {args.command} of {key} within {args.timeout:g} s "
        "(is `hotreload watch` running for it, in a release with rollout control?)",
        EXIT_TIMEOUT,
    )
