"""A connection pool whose blocked read another thread can cut short.

redis-py offers no way to cancel a blocking read from another thread, and closing the
connection from there would race with the reader's parser. Shutting the socket down only
makes the pending ``recv`` -- a blocked ``XREAD``, or the handshake of a connection to a
frozen server -- return end-of-file, which the reader sees as a ``ConnectionError``. That is
how ``Subscriber.stop()`` and the publisher's ack follower (``publisher.ackwatch``) end their
threads promptly, so the pool is shared by both, in a module of its own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis

if TYPE_CHECKING:
    from subscriber._wire import Batch

__all__ = ["InterruptiblePool", "close", "execute", "join_interrupting"]


class InterruptiblePool(redis.ConnectionPool):
    """A pool that can wake its connection's reader from another thread (:meth:`interrupt`).

    Its client is used by one thread, so the pool holds one connection: the latest one made.
    A subscriber's thread keeps it checked out (:meth:`held`) and sends every batch on it (see
    ``_wire``); a plain client (the ack follower's) checks it out per command as usual.
    """

    latest: object = None
    _held: Any = None

    def make_connection(self) -> Any:
        self.latest = super().make_connection()
        return self.latest

    def held(self) -> Any:
        """The connection the subscriber's thread works on, checked out (connected) once."""
        if self._held is None:
            self._held = self.get_connection()
        return self._held

    def interrupt(self) -> None:
        # the socket is private to redis-py; without it the thread ends at its next timeout
        sock = getattr(self.latest, "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def execute(client: redis.Redis, batch: Batch, *, raise_on_error: bool = False) -> list[Any]:
    """One round trip: ``batch`` sent on the client's held connection, one reply per command
    (a refused command is its ``ResponseError``, raised when ``raise_on_error``)."""
    if not batch:
        return []
    connection = cast("InterruptiblePool", client.connection_pool).held()
    connection.send_packed_command(batch.pack())
    return batch.results(connection.read_response, raise_on_error=raise_on_error)


def close(client: redis.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def join_interrupting(
    thread: threading.Thread, pool: Callable[[], InterruptiblePool | None], within: float
) -> None:
    """Join ``thread`` (told to stop already), cutting its blocked read short -- the pool its
    reader uses now, asked again each time: the thread may be reconnecting -- for at most
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while thread.is_alive() and time.monotonic() < deadline:
        current = pool()
        if current is not None:
            current.interrupt()
        thread.join(0.05)
