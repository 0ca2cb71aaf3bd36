"""A tiny app for rollout tests under real gunicorn: one config key, sync or asyncio workers.

    HOTRELOAD_REDIS_URL=... gunicorn -c deploy/example/gunicorn.conf.py tests.workers.canary_app:app

``CANARY_ASYNC=1`` makes it an ASGI app (gunicorn ``-k uvicorn.workers.UvicornWorker``) whose
``AsyncSubscriber`` starts in the lifespan; otherwise a WSGI app whose ``Subscriber`` the
gunicorn hooks start after the fork. Either way the subscriber is created at import (preload).

The callback refuses content containing ``REJECT``. Content containing ``CRASH`` is applied
and then, while the file ``$CANARY_CRASH_FLAG`` exists, kills the worker half a second later
(``os._exit``): a config that crashes the workers running it, after they acknowledged it.
``GET /`` answers JSON: this worker's ``pid``, ``version`` and the ``text`` it runs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from subscriber import AsyncSubscriber, Subscriber

KEY = os.environ.get("CANARY_KEY", "app.yaml")
FLAG = os.environ.get("CANARY_CRASH_FLAG", "")
current: dict[str, str] = {}


def apply(text: str) -> None:
    if "REJECT" in text:
        raise ValueError("refused by the canary app")
    current["text"] = text
    if "CRASH" in text and FLAG and os.path.exists(FLAG):
        threading.Timer(0.5, os._exit, (1,)).start()  # dies right after applying it


OPTIONS: dict[str, Any] = {"block_ms": 500, "heartbeat_interval": 0.5, "start_timeout": 10.0}
subscriber: Subscriber | AsyncSubscriber
if os.environ.get("CANARY_ASYNC") == "1":
    subscriber = AsyncSubscriber(KEY, apply, **OPTIONS)
else:
    subscriber = Subscriber(KEY, apply, **OPTIONS)


def _body() -> bytes:
    return json.dumps(
        {"pid": os.getpid(), "version": subscriber.version, "text": current.get("text")}
    ).encode()


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [_body()]


Message = dict[str, Any]


async def asgi(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[..., Awaitable[None]]
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                assert isinstance(subscriber, AsyncSubscriber)
                await subscriber.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                assert isinstance(subscriber, AsyncSubscriber)
                await subscriber.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _body()})


app: Any = asgi if isinstance(subscriber, AsyncSubscriber) else wsgi
