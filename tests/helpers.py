"""Shared test helpers: poll with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from server._broker import find_free_port

__all__ = ["assert_eventually", "find_free_port", "wait_until"]


async def assert_eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
) -> None:
    """Poll ``predicate`` (sync or async) until it returns a truthy value.

    Raises ``AssertionError`` (with ``message`` and the last exception the
    predicate raised, if any) when ``timeout`` seconds pass first. An
    ``AssertionError`` raised by the predicate counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            last_error = None
        except (AssertionError, LookupError, ValueError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(
                f"condition not met within {timeout:.2f}s: {message or predicate!r}{detail}"
            )
        await asyncio.sleep(interval)


wait_until = assert_eventually
