"""Following dead letters: a backlog, then live ones, through a bounded buffer.

The one subscription mechanism of the service, used by the gRPC
``StreamDeadLetters`` (over :meth:`ControlTarget.subscribe_dead_letters`) and by
:meth:`server._dlq.DeadLetterSink.subscribe` (over its listeners). It needs
two things from its source, both called on the event loop without awaiting:
a way to register a callback for every dead letter recorded from now on
(``listen``), and the matching dead letters held now (``select``).

- :meth:`DeadLetterSubscription.open` registers first and takes the backlog
  right after, so nothing recorded in between is lost; a dead letter that is
  in the backlog as well is sent once.
- Live dead letters wait in a buffer of ``buffer`` entries: when it is full
  the oldest one is dropped and counted in ``skipped`` (and ``on_skip`` is
  called), so a slow reader never slows the publisher.
- Iteration ends after :meth:`~DeadLetterSubscription.close` (or the source's
  end) once what is already buffered has been read; without ``listen`` (not
  following), it ends after the backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType

from pool import DeadLetter

__all__ = ["DeadLetterListener", "DeadLetterSubscription"]

#: Called for every dead letter as it is recorded; must not block or raise.
DeadLetterListener = Callable[[DeadLetter], None]


def _everything(_dead: DeadLetter) -> bool:
    return True


class DeadLetterSubscription:
    """An async iterator over dead letters: a backlog, then (when following) live ones.

    ``skipped`` counts live dead letters this subscriber lost because its
    buffer was full (the oldest buffered ones are dropped); ``backlog_size``
    is how many dead letters the backlog had, ``delivered`` how many were read.
    Use ``async with`` or call :meth:`close` to unsubscribe.
    """

    def __init__(
        self,
        matches: Callable[[DeadLetter], bool] = _everything,
        *,
        buffer: int = 1000,
        on_skip: Callable[[], object] | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self._matches = matches
        self._capacity = buffer
        self._on_skip = on_skip
        self._backlog: deque[DeadLetter] = deque()
        self._buffer: deque[DeadLetter] = deque()
        self._wakeup = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        self.backlog_size = 0
        self.skipped = 0
        self.delivered = 0

    @classmethod
    def open(
        cls,
        select: Callable[[], Iterable[DeadLetter]],
        listen: Callable[[DeadLetterSubscription], Callable[[], None]] | None,
        matches: Callable[[DeadLetter], bool] = _everything,
        *,
        buffer: int = 1000,
        on_skip: Callable[[], object] | None = None,
    ) -> DeadLetterSubscription:
        """Subscribe with ``listen(subscription)`` (which registers
        :meth:`push` and returns the unsubscribe function), then take the
        backlog from ``select()``. ``listen=None`` reads the backlog only.
        Raises ``ValueError`` for ``buffer < 1``."""
        sub = cls(matches, buffer=buffer, on_skip=on_skip)
        if listen is None:
            sub._closed = True
        else:
            sub._unsubscribe = listen(sub)
        backlog = list(select())
        if sub._buffer:  # recorded while the backlog was taken: send each once
            sent = {d.id for d in backlog if d.id}
            sub._buffer = deque(d for d in sub._buffer if not d.id or d.id not in sent)
        sub._backlog.extend(backlog)
        sub.backlog_size = len(backlog)
        return sub

    @property
    def pending(self) -> int:
        """Dead letters waiting to be read (backlog + buffer)."""
        return len(self._backlog) + len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, dead: DeadLetter) -> None:
        """A newly recorded dead letter (the listener callback). O(1), never blocks."""
        if self._closed or not self._matches(dead):
            return
        if len(self._buffer) >= self._capacity:
            self._buffer.popleft()
            self.skipped += 1
            if self._on_skip is not None:
                self._on_skip()
        self._buffer.append(dead)
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving; iteration ends after what is already buffered. Idempotent."""
        self._closed = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        self._wakeup.set()

    def __aiter__(self) -> DeadLetterSubscription:
        return self

    async def __anext__(self) -> DeadLetter:
        while True:
            if self._backlog:
                self.delivered += 1
                return self._backlog.popleft()
            if self._buffer:
                self.delivered += 1
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def __aenter__(self) -> DeadLetterSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
