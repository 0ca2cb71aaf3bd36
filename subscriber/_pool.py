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
from typing import Any

import redis

__all__ = ["InterruptiblePool"]


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
