"""Event loops in threads of their own, and the two bridges between loops.

The service's event loop dispatches every event; under a backlog it runs
thousands of handler steps per turn. What must answer promptly whatever the
data plane does runs on an :class:`IoLoop` instead: the fleet's control-topic
clients (:mod:`server._fleet`) and the gRPC control plane
(:mod:`server._grpc._server`). An object of asyncio or grpc.aio is used only
from the loop it was created on; a coroutine that needs another loop's
objects runs there through :func:`run_on` (one awaitable result) or
:func:`iterate_on` (an async iterator, item by item).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from server._control import NotReadyError

__all__ = ["IoLoop", "iterate_on", "run_on"]

T = TypeVar("T")

log = structlog.get_logger("server.loops")


class IoLoop:
    """An asyncio event loop running in a daemon thread of its own.

    ``start()`` returns once the loop runs; ``stop()`` ends it: the tasks
    still on it are cancelled and awaited, then the loop is closed and the
    thread joined."""

    def __init__(self, name: str, *, what: str = "fleet control") -> None:
        self.name = name
        self._what = what
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on this loop (from any thread)."""
        loop = self.loop
        if loop is None or self._closing or loop.is_closed():
            coro.close()
            raise NotReadyError(f"{self._what} is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop and await its result from the caller's loop
        (cancelling the caller cancels it)."""
        return await asyncio.wrap_future(self.submit(coro))

    async def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        self._closing = True
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, timeout)


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` as a task of ``loop`` (directly when ``loop`` is the
    caller's). Its result or exception is the caller's; cancelling the caller
    cancels the task. The task starts in a copy of the caller's context
    variables (structlog's request context goes along)."""
    if loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def iterate_on(
    loop: asyncio.AbstractEventLoop, make: Callable[[], AsyncIterator[T]]
) -> AsyncIterator[T]:
    """The items of the async iterator ``make()``, advanced on ``loop``.

    In order, one step at a time (the producer runs only when the consumer
    asks for the next item, so a producer's own buffering and back-pressure
    keep their meaning). The producer's end or error ends this iterator;
    cancelling or closing this iterator cancels a step in progress and
    closes the producer (``aclose()``) on its loop."""
    if loop is asyncio.get_running_loop():
        producer = make()
        try:
            async for item in producer:
                yield item
        finally:
            if hasattr(producer, "aclose"):
                await producer.aclose()
        return
    producer = await run_on(loop, _call(make))

    async def step() -> T:
        return await anext(producer)

    try:
        while True:
            try:
                item = await run_on(loop, step())
            except StopAsyncIteration:
                return
            yield item
    finally:
        close = getattr(producer, "aclose", None)
        if close is not None and not loop.is_closed():
            # Not awaited: this runs while the consumer is cancelled or closed.
            # The step's cancellation, if one was running, is ahead of it in
            # the loop's queue.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                asyncio.run_coroutine_threadsafe(close(), loop).add_done_callback(_log_failure)


async def _call(make: Callable[[], T]) -> T:
    return make()


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("loops.close_failed", error=repr(exc))
