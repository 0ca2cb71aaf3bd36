"""The asyncio transport's connection helpers: a pool holding one connection, one round
trip per batch, a quiet close; used by ``AsyncSubscriber`` (``aio``) and its shared follower
(``_aiohub``), as ``_pool`` is by the threaded side."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio

from subscriber._wire import checked

if TYPE_CHECKING:
    from subscriber._wire import Batch

__all__ = ["HeldPool", "aclose", "execute"]


class HeldPool(redis.asyncio.ConnectionPool):
    """The task's pool: one connection, checked out once and kept (see ``_wire``)."""

    _held: Any = None

    async def held(self) -> Any:
        if self._held is None:
            self._held = await self.get_connection()  # type: ignore[no-untyped-call]
        return self._held


async def execute(
    client: redis.asyncio.Redis, batch: Batch, *, raise_on_error: bool = False
) -> list[Any]:
    """One round trip: ``batch`` sent on the client's held connection, one reply per command
    (a refused command is its ``ResponseError``, raised when ``raise_on_error``)."""
    if not batch:
        return []
    connection = await cast("HeldPool", client.connection_pool).held()
    await connection.send_packed_command(batch.pack())
    results: list[Any] = []
    for index in range(len(batch)):
        try:
            results.append(batch.reply(index, await connection.read_response()))
        except redis.ResponseError as exc:
            results.append(batch.refused(index, exc))
    return checked(results, raise_on_error=raise_on_error)


async def aclose(client: redis.asyncio.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.aclose()
