"""One sync-style handle on either client, so that a scenario is written once and run
against both ``Subscriber`` (a thread) and ``AsyncSubscriber`` (a task).

The async client runs in an event loop of its own thread (``LoopThread``); the test's
thread calls its coroutines through ``asyncio.run_coroutine_threadsafe`` and waits for the
result, so ``start()`` raises what ``await start()`` raises. Attributes (``version``,
``status``...) are read straight off the client, which is what an app does too. The
``caller``/``places`` pair names where callbacks ran on either client: the caller of
``start()`` (its thread, or its task), then ``follower``: the follow thread -- the process's
shared one, ``hotreload-hub``, or with ``shared=False`` ``hotreload-<key>`` -- or task.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Literal, TypeVar

from subscriber import AsyncSubscriber, Subscriber
from tests.helpers import Recorder

T = TypeVar("T")
Kind = Literal["Subscriber", "AsyncSubscriber"]
KINDS: tuple[Kind, ...] = ("Subscriber", "AsyncSubscriber")
CALLER_TASK = "test-caller"


class LoopThread:
    """An event loop running in a thread of its own until ``close()``; everything left on it
    is cancelled and closed then (``asyncio.run``'s clean-up)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), name="test-loop")
        self._thread.start()
        self._ready.wait(10)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._main = asyncio.current_task()
        self._ready.set()
        await self._done.wait()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` in a task named ``CALLER_TASK`` on the loop; its result or exception."""
        assert self._loop is not None

        async def named() -> T:
            task = asyncio.current_task()
            assert task is not None
            task.set_name(CALLER_TASK)
            return await coro

        return asyncio.run_coroutine_threadsafe(named(), self._loop).result(timeout)

    def tasks(self) -> list[str]:
        """Names of the tasks on the loop now, but its own."""

        async def names() -> list[str]:
            mine = {self._main, asyncio.current_task()}
            return sorted(t.get_name() for t in asyncio.all_tasks() if t not in mine)

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(names(), self._loop).result(10)

    def close(self) -> None:
        if self._loop is not None and self._done is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


class Driven:
    """A ``Subscriber`` or an ``AsyncSubscriber`` behind the same blocking calls."""

    def __init__(self, sub: Subscriber | AsyncSubscriber, loop: LoopThread | None) -> None:
        self.sub = sub
        self._loop = loop

    @property
    def kind(self) -> Kind:
        return "AsyncSubscriber" if self._loop is not None else "Subscriber"

    @property
    def caller(self) -> str:
        """Where the callbacks of ``start()`` run: the calling thread, or the calling task."""
        return CALLER_TASK if self._loop is not None else threading.current_thread().name

    @property
    def follower(self) -> str:
        """Where the callbacks run after ``start()``: the follow thread, or task."""
        if self.sub._hub is not None:
            return "hotreload-hub"
        return f"hotreload-{self.sub.key}"

    def places(self, rec: Recorder) -> set[str]:
        """Where ``rec``'s calls ran, in this client's terms (threads, or tasks)."""
        return rec.tasks if self._loop is not None else rec.threads

    def start(self) -> Driven:
        if isinstance(self.sub, AsyncSubscriber):
            assert self._loop is not None
            self._loop.call(self.sub.start())
        else:
            self.sub.start()
        return self

    def stop(self) -> None:
        if isinstance(self.sub, AsyncSubscriber):
            assert self._loop is not None
            self._loop.call(self.sub.stop())
        else:
            self.sub.stop()

    def background(self) -> list[str]:
        """What of this client still runs in the background: its thread, or its tasks."""
        if self._loop is not None:
            return self._loop.tasks()
        return [t.name for t in threading.enumerate() if t.name == self.follower]

    def __enter__(self) -> Driven:
        if isinstance(self.sub, AsyncSubscriber):
            assert self._loop is not None
            self._loop.call(self.sub.__aenter__())
        else:
            self.sub.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(self.sub, AsyncSubscriber):
            assert self._loop is not None
            self._loop.call(self.sub.__aexit__(exc_type, exc, tb))
        else:
            self.sub.__exit__(exc_type, exc, tb)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sub, name)


Make = Callable[..., Driven]


def drivers(kind: Kind) -> Iterator[Make]:
    """Makes clients of ``kind`` (arguments as either constructor takes them); stops every
    one of them, and the event loop, when the test ends."""
    loop = LoopThread() if kind == "AsyncSubscriber" else None
    made: list[Driven] = []

    def make(*args: Any, **kwargs: Any) -> Driven:
        cls = AsyncSubscriber if kind == "AsyncSubscriber" else Subscriber
        driven = Driven(cls(*args, **kwargs), loop)
        made.append(driven)
        return driven

    try:
        yield make
    finally:
        try:
            for driven in made:
                driven.stop()
        finally:
            if loop is not None:
                loop.close()
