"""server._loops: a loop in a thread, and the bridges that run a coroutine or
an async iterator on another loop (real threads and loops)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from server._control import NotReadyError
from server._loops import IoLoop, iterate_on, run_on
from tests.helpers import assert_eventually


@pytest.fixture
def other() -> Iterator[IoLoop]:
    io = IoLoop("test-other-loop", what="the test loop")
    io.start()
    yield io
    asyncio.run(io.stop())


def _loop(io: IoLoop) -> asyncio.AbstractEventLoop:
    assert io.loop is not None
    return io.loop


async def test_run_on_runs_there_and_returns_or_raises_here(other: IoLoop) -> None:
    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert await run_on(_loop(other), where()) == "test-other-loop"
    assert await run_on(asyncio.get_running_loop(), where()) == threading.current_thread().name

    async def fails() -> None:
        raise ValueError("there")

    with pytest.raises(ValueError, match="there"):
        await run_on(_loop(other), fails())


async def test_cancelling_run_on_cancels_the_task_on_the_other_loop(other: IoLoop) -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    call = asyncio.ensure_future(run_on(_loop(other), forever()))
    await assert_eventually(started.is_set, message="started there")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await assert_eventually(cancelled.is_set, message="cancelled there")


async def _numbers(
    n: int, seen: list[str], closed: threading.Event, fail: bool = False
) -> AsyncIterator[int]:
    try:
        for i in range(n):
            seen.append(threading.current_thread().name)
            await asyncio.sleep(0)
            yield i
        if fail:
            raise RuntimeError("producer failed")
        await asyncio.Event().wait()  # then follows forever
    finally:
        closed.set()


async def test_iterate_on_forwards_in_order_from_the_other_loop_and_closes_it(
    other: IoLoop,
) -> None:
    seen: list[str] = []
    closed = threading.Event()
    got: list[int] = []
    stream = iterate_on(_loop(other), lambda: _numbers(200, seen, closed))
    async for item in stream:
        got.append(item)
        if len(got) == 200:
            break
    assert got == list(range(200))
    assert set(seen) == {"test-other-loop"}
    await stream.aclose()  # type: ignore[attr-defined]
    await assert_eventually(closed.is_set, message="the producer closed on its loop")


async def test_cancelling_the_consumer_of_iterate_on_closes_the_producer(other: IoLoop) -> None:
    seen: list[str] = []
    closed = threading.Event()
    first = asyncio.Event()

    async def consume() -> None:
        async for _item in iterate_on(_loop(other), lambda: _numbers(3, seen, closed)):
            first.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(first.wait(), 10)
    await assert_eventually(lambda: len(seen) == 3, message="the producer waits for more")
    assert not closed.is_set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_eventually(closed.is_set, message="the producer was cancelled and closed")


async def test_the_producers_error_ends_iterate_on_with_it(other: IoLoop) -> None:
    seen: list[str] = []
    closed = threading.Event()
    got: list[int] = []

    async def consume() -> None:
        async for item in iterate_on(_loop(other), lambda: _numbers(5, seen, closed, fail=True)):
            got.append(item)  # noqa: PERF401 - what came before the error

    with pytest.raises(RuntimeError, match="producer failed"):
        await consume()
    assert got == [0, 1, 2, 3, 4]
    assert closed.is_set()


async def test_a_stopped_io_loop_refuses_work(other: IoLoop) -> None:
    await other.stop()

    async def nothing() -> None:
        return None

    with pytest.raises(NotReadyError, match="the test loop is not running"):
        await other.call(nothing())
