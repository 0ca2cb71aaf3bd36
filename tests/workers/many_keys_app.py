"""A WSGI app following ``MANY_KEYS`` config keys (default 20: ``k00.yaml`` ...), for issue
22's test under real gunicorn with ``preload_app``: the Subscribers are created at import,
in the master, and the gunicorn hooks start them in each worker after the fork.

    HOTRELOAD_REDIS_URL=... gunicorn -c deploy/example/gunicorn.conf.py \
        tests.workers.many_keys_app:app

``GET /`` answers JSON: this worker's ``pid``, its ``threads`` (``threading.active_count()``)
and the ``versions`` of its keys.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from subscriber import Subscriber

KEYS = [f"k{index:02d}.yaml" for index in range(int(os.environ.get("MANY_KEYS", "20")))]
subscribers = [Subscriber(key, lambda text: None, metrics=False) for key in KEYS]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = json.dumps(
        {
            "pid": os.getpid(),
            "threads": threading.active_count(),
            "versions": {sub.key: sub.version for sub in subscribers},
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
