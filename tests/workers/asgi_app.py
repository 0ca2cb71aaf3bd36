"""A tiny pure-ASGI app (no framework) whose config is an ``AsyncSubscriber``, for uvicorn.

    HOTRELOAD_REDIS_URL=unix:///... ASGI_KEY=app.yaml uvicorn tests.workers.asgi_app:app

The subscriber is created at import time (no I/O, no task), started by ``lifespan.startup``
and stopped by ``lifespan.shutdown`` -- the way an app wires it into FastAPI or Starlette's
lifespan. ``GET /`` answers JSON: what this process runs now (``version``, ``content``,
``status``) and its ``pid``. Content containing ``REJECT`` is refused by the callback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from subscriber import AsyncSubscriber

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

applied: list[str] = []


def apply(text: str) -> None:
    if "REJECT" in text:
        raise ValueError("refused by the test app")
    applied.append(text)


subscriber = AsyncSubscriber(
    os.environ.get("ASGI_KEY", "app.yaml"),
    apply,
    block_ms=int(os.environ.get("ASGI_BLOCK_MS", "1000")),
    heartbeat_interval=1.0,
    start_timeout=5.0,
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        body = json.dumps(
            {
                "version": subscriber.version,
                "content": subscriber.content.decode() if subscriber.content else None,
                "status": subscriber.status,
                "applied": len(applied),
                "pid": os.getpid(),
            }
        ).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await subscriber.start()  # the replay is done before the server listens
            except Exception as exc:  # reported to the server, which exits
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await subscriber.stop()  # records "stopped" in :workers
            await send({"type": "lifespan.shutdown.complete"})
            return
