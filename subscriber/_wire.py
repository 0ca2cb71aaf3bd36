"""The commands of one round trip, packed here and sent on a connection the subscriber holds.

A subscriber sends few kinds of commands (``XADD`` an ack, ``HSET`` its state, ``XREAD``,
``XREVRANGE``) on one connection it owns, one batch per round trip. redis-py's pipelines cost
more CPU than the round trip itself here -- a pool checkout with a socket probe, retry and
observability wrappers, a pure-Python packer that re-copies its buffer for every argument --
measured at 30-40 µs per pipeline plus 2-3 µs per argument (tests/benchmarks/profile_cycle.py).
Every worker pays that for every event and every idle cycle, so a :class:`Batch` records the
commands, packs them in one pass (:func:`pack`: the short texts that recur in every round trip
-- command, key and field names, the worker id -- are encoded once and kept, bounded; a cycle
after an applied entry, an ack, the worker state and the read, packs in 8.9 us instead of
11.0, best of 15 x 1,000 cycles, issue 21), and the transport writes the bytes with the
connection's ``send_packed_command`` and reads one reply per command with its
``read_response``; redis-py still owns the socket, the handshake (``HELLO``, ``CLIENT
SETNAME``), the parser and the timeouts.

Replies come back in the shapes redis-py's pipelines return (``XREAD``: ``[[stream,
entries]]``; entries: ``[(id, {field: value})]``), so the decisions in ``_core`` and
``_transport`` see exactly what they saw before. A command Redis refused is its
``ResponseError`` in the results, as with ``execute(raise_on_error=False)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import DataError, ResponseError

from subscriber._cluster import check_topology

__all__ = ["Batch", "CyclePlan", "checked", "pack", "raise_first_error"]

# Arguments longer than this are sent as their own buffer rather than copied into the joined
# one (redis-py's cutoff too): a 1 MiB content is never copied to be sent.
_BUFFER_CUTOFF = 6000

Arg = str | bytes | bytearray | memoryview | int | float


def _encode(arg: object) -> bytes | memoryview:
    """An argument as redis-py encodes it (UTF-8 text, ``repr`` of numbers, bytes as is)."""
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bytes | memoryview):
        return arg
    if isinstance(arg, bytearray):
        return bytes(arg)
    if isinstance(arg, bool):  # an int, but redis-py refuses it: so do we
        raise DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float.")
    if isinstance(arg, int | float):
        return repr(arg).encode()
    raise DataError(f"Invalid input of type: {type(arg).__name__!r}")


# Short text arguments recur in every round trip (command names, key names, field names, the
# worker id, statuses): each is encoded once, to its whole RESP bulk string. Not what changes
# with every entry: a SHA-256 hex is longer than the limit, and text starting with a digit (an
# entry id) is left out. Bounded: cleared when full (a process following hundreds of keys just
# encodes more often); a worker following one key keeps about 20, a few KiB.
_BULK_CACHE: dict[str, bytes] = {}
_BULK_CACHE_SIZE = 512
_BULK_CACHE_LONGEST = 48  # bytes
_DIGITS = frozenset("0123456789")


def pack(commands: list[tuple[Arg, ...]]) -> list[bytes | memoryview]:
    """The RESP encoding of ``commands``, as few buffers as possible (large values apart)."""
    output: list[bytes | memoryview] = []
    pieces: list[bytes | memoryview] = []
    append = pieces.append
    cache = _BULK_CACHE
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)  # exact types first: this runs for every argument
            data: bytes | memoryview
            if kind is str:
                text = cast("str", arg)
                bulk = cache.get(text)
                if bulk is not None:
                    append(bulk)
                    continue
                data = text.encode()
                if len(data) <= _BULK_CACHE_LONGEST and text[:1] not in _DIGITS:
                    if len(cache) >= _BULK_CACHE_SIZE:
                        cache.clear()
                    bulk = cache[text] = b"$%d\r\n%b\r\n" % (len(data), data)
                    append(bulk)
                    continue
            elif kind is bytes:
                data = cast("bytes", arg)
            elif kind is int:
                data = b"%d" % cast("int", arg)
            elif kind is float:
                data = repr(arg).encode()
            else:
                data = _encode(arg)
            size = len(data)
            if size > _BUFFER_CUTOFF or kind is memoryview:
                append(b"$%d\r\n" % size)
                output.append(b"".join(pieces))
                output.append(data)
                pieces = [b"\r\n"]
                append = pieces.append
            else:
                append(b"$%d\r\n%b\r\n" % (size, data))  # type: ignore[str-format]
    output.append(b"".join(pieces))
    return output


def _pairs(flat: Any) -> Any:
    """A stream entry's flat ``[field, value, ...]`` as a dict (later duplicates win, like
    redis-py's ``pairs_to_dict``); anything else is left for the decoder to reject."""
    if not isinstance(flat, list):
        return flat
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _entries(raw: Any) -> Any:
    """``[(id, fields)]`` from a raw entry list (``XREVRANGE``, and each stream of ``XREAD``)."""
    if raw is None:
        return None
    return [(None, None) if item is None else (item[0], _pairs(item[1])) for item in raw]


def _xread(raw: Any) -> Any:
    """``[[stream, entries]]``: RESP2 sends that shape, RESP3 a map ``{stream: entries}``."""
    if not raw:
        return []
    streams = raw.items() if isinstance(raw, dict) else raw
    return [[stream, _entries(entries)] for stream, entries in streams]


def _as_is(raw: Any) -> Any:
    return raw


class Batch:
    """Commands for one round trip, queued with redis-py's argument conventions."""

    __slots__ = ("_parsers", "answered", "commands")

    def __init__(self) -> None:
        self.commands: list[tuple[Arg, ...]] = []
        self._parsers: list[Callable[[Any], Any]] = []
        # Replies read so far: a command below it was executed by Redis, even when the
        # round trip was cut short later (a blocking read interrupted); see ``_reports``.
        self.answered = 0

    def __len__(self) -> int:
        return len(self.commands)

    def xadd(
        self,
        name: str,
        fields: Mapping[str, Arg],
        *,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> None:
        args: list[Arg] = ["XADD", name]
        if maxlen is not None:
            args += ["MAXLEN", "~", maxlen] if approximate else ["MAXLEN", maxlen]
        args.append("*")
        for field, value in fields.items():
            args += (field, value)
        self._queue(tuple(args), _as_is)

    def command(self, *args: Arg) -> None:
        """Any other command; its reply as the parser returns it."""
        self._queue(args, _as_is)

    def hset(self, name: str, key: str, value: Arg) -> None:
        self._queue(("HSET", name, key, value), _as_is)

    def zadd_gt(self, name: str, score: int, member: str) -> None:
        """``ZADD name GT score member``: the member's score only ever goes up."""
        self._queue(("ZADD", name, "GT", score, member), _as_is)

    def xrevrange(
        self, name: str, max: str = "+", min: str = "-", count: int | None = None
    ) -> None:
        args: tuple[Arg, ...] = ("XREVRANGE", name, max, min)
        if count is not None:
            args += ("COUNT", count)
        self._queue(args, _entries)

    def xread(
        self, streams: Mapping[str, str], count: int | None = None, block: int | None = None
    ) -> None:
        args: list[Arg] = ["XREAD"]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args.append("STREAMS")
        args += list(streams)
        args += list(streams.values())
        self._queue(tuple(args), _xread)

    def _queue(self, args: tuple[Arg, ...], parser: Callable[[Any], Any]) -> None:
        self.commands.append(args)
        self._parsers.append(parser)

    def pack(self) -> list[bytes | memoryview]:
        return pack(self.commands)

    def reply(self, index: int, raw: Any) -> Any:
        """Command ``index``'s reply in the shape a redis-py pipeline returns."""
        self.answered = index + 1
        return self._parsers[index](raw)

    def refused(self, index: int, exc: ResponseError) -> ResponseError:
        """Command ``index`` was refused (its reply is the error ``exc``): answered too."""
        self.answered = index + 1
        return exc

    def results(self, read: Callable[[], Any], *, raise_on_error: bool) -> list[Any]:
        """Read one reply per command with ``read`` (a connection's ``read_response``).

        A refused command is its ``ResponseError`` in the list, or raised (the first one)
        after every reply was read, so the connection stays in step either way. A reply
        saying the slot is served elsewhere (cluster) always raises ``TopologyChanged``.
        """
        results: list[Any] = []
        for index in range(len(self.commands)):
            try:
                results.append(self.reply(index, read()))
            except ResponseError as exc:
                results.append(self.refused(index, exc))
        return checked(results, raise_on_error=raise_on_error)


def checked(results: list[Any], *, raise_on_error: bool) -> list[Any]:
    """A round trip's replies (a refused command as its ``ResponseError``), once none says
    the slot is served elsewhere (``TopologyChanged``) and, with ``raise_on_error``, none was
    refused (the first refusal is raised): what both transports do after reading them."""
    check_topology(results)
    if raise_on_error:
        raise_first_error(results)
    return results


def raise_first_error(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, ResponseError):
            raise result


@dataclass(frozen=True, slots=True)
class CyclePlan:
    """How a follow cycle's batch is laid out: ``writes`` reports first, then the reset
    check (when ``check``), then the blocking read."""

    writes: int
    check: bool
