"""Idempotent request IDs: a repeated ``(method, request_id)`` gets the first answer."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message as ProtoMessage

__all__ = ["ReplayCache", "replayed", "retrieve_exception"]

_M = TypeVar("_M", bound=ProtoMessage)


class ReplayCache:
    """Recent answers by ``(method, request_id)``: a repeat gets the first answer.

    Bounded: the newest ``capacity`` answers are kept. Only successful answers
    are remembered, so a retry after a failure (UNAVAILABLE, a timed-out drain)
    runs again. A repeat that arrives while the first is still running waits
    for it and gets its outcome. An empty ``request_id`` is never remembered.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._done: collections.OrderedDict[tuple[str, str], ProtoMessage] = (
            collections.OrderedDict()
        )
        self._running: dict[tuple[str, str], asyncio.Future[ProtoMessage]] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def run(self, method: str, request_id: str, call: Callable[[], Awaitable[_M]]) -> _M:
        """The answer of ``call()``; a repeat gets a copy of the first answer
        with ``replayed`` set."""
        if not request_id:
            return await call()
        key = (method, request_id)
        seen = self.lookup(key)
        if seen is not None:
            return replayed(seen)  # type: ignore[return-value]
        running = self._running.get(key)
        if running is not None:
            return replayed(await asyncio.shield(running))  # type: ignore[return-value]
        future: asyncio.Future[ProtoMessage] = asyncio.get_running_loop().create_future()
        future.add_done_callback(retrieve_exception)
        self._running[key] = future
        try:
            answer = await call()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
            raise
        finally:
            del self._running[key]
        future.set_result(answer)
        self.remember(key, answer)
        return answer

    def lookup(self, key: tuple[str, str]) -> ProtoMessage | None:
        """The remembered answer for ``key`` (refreshing its age), else ``None``."""
        answer = self._done.get(key)
        if answer is not None:
            self._done.move_to_end(key)
        return answer

    def remember(self, key: tuple[str, str], answer: ProtoMessage) -> None:
        self._done[key] = answer
        self._done.move_to_end(key)
        while len(self._done) > self._capacity:
            self._done.popitem(last=False)


def retrieve_exception(future: asyncio.Future[Any]) -> None:
    """A done callback: mark a future's exception as retrieved (no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()


def replayed(message: _M) -> _M:
    """A copy of ``message`` with ``replayed`` set."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.replayed = True  # type: ignore[attr-defined]
    return copy
