"""The contract both pools implement, and the handler contract."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Protocol, TypeAlias

from pool._deadletter import DeadLetter
from pool._message import Message

#: A handler takes one message and returns nothing; raising means failure.
#: ``async def`` handlers run on the event loop; plain functions run in a
#: bounded thread pool with the same ordering guarantee.
Handler: TypeAlias = Callable[[Message], Awaitable[None]] | Callable[[Message], None]

#: Called synchronously as each event finishes: the message, and ``None`` when
#: handled or the :class:`DeadLetter` when the pool gave up.
FinishListener: TypeAlias = Callable[[Message, DeadLetter | None], None]

#: Resolves when the event is finished: ``None`` when handled, the
#: :class:`DeadLetter` when the pool gave up on it. It never resolves with an
#: exception, except ``CancelledError`` if the pool is terminated.
Completion: TypeAlias = "asyncio.Future[DeadLetter | None]"


class PoolMode(StrEnum):
    KEYED = "keyed"
    ACTOR = "actor"


class Pool(Protocol):
    """A pool of sequential executors routed by aggregate ID.

    Events of one aggregate always go to the same executor and are handled
    one at a time, in submission order. Each executor has a bounded queue;
    nothing is ever dropped. Every method runs on the event loop: the plain
    ones never block (they return at once or raise), the ``async`` ones say
    what they wait for. :class:`KeyedWorkerPool` and :class:`ActorPool`
    implement it; :class:`PoolSwitch` drives one of each through it alone.
    """

    @property
    def mode(self) -> PoolMode:
        """Which kind of pool this is."""

    @property
    def size(self) -> int:
        """Number of executors."""

    @property
    def capacity(self) -> int:
        """Bound on each executor's depth (queued + running)."""

    def executor_for(self, aggregate_id: str) -> int:
        """Index of the executor that handles ``aggregate_id``. Never blocks."""

    def start(self) -> None:
        """Start the executors on the running event loop.

        Idempotent (a no-op once started, also after ``close()``); the first
        submit starts them too. Never blocks. Raises :class:`PoolClosedError`
        when the pool was closed before it ever started.
        """

    def enqueue_nowait(self, message: Message, with_future: bool) -> Completion | None:
        """Enqueue ``message`` on its executor without waiting.

        Returns its completion when ``with_future`` is true, else ``None`` (the
        outcome then goes only to the finish listeners). Never blocks. Raises
        :class:`QueueFullError` (nothing enqueued: the caller keeps the message
        and may wait with :meth:`wait_for_space`) when the executor is at
        capacity, and :class:`PoolClosedError` after ``close()``.
        ``submit_nowait`` and ``dispatch_nowait`` are this with the flag fixed;
        a caller choosing per event (the mode switch) holds this one method.
        """

    def submit_nowait(self, message: Message) -> Completion:
        """Enqueue ``message`` without waiting; return its completion.

        Never blocks. Raises :class:`QueueFullError` (nothing enqueued) when
        the target executor is at capacity and :class:`PoolClosedError` after
        ``close()``.
        """

    async def submit(self, message: Message) -> Completion:
        """Enqueue ``message``, waiting only while the target queue is full.

        Returns as soon as the message is queued (not when it is handled).
        Raises :class:`PoolClosedError` after ``close()``.
        """

    def dispatch_nowait(self, message: Message) -> None:
        """Like ``submit_nowait`` but without a completion future: the outcome
        goes only to the finish listeners (the consumer's hot path). Never
        blocks; raises as ``submit_nowait``. On an idle executor the handler's
        first step may run inside this call (and a handler that completes
        there is finished, its listeners called, before it returns): register
        what a listener needs before calling it."""

    async def dispatch(self, message: Message) -> None:
        """Like ``submit`` but without a completion future."""

    def add_finish_listener(self, listener: FinishListener, *, first: bool = False) -> None:
        """Call ``listener(message, dead_letter_or_none)`` synchronously as each
        event finishes, before its completion resolves. It must not raise or block.
        ``first``: before the listeners added so far (default: after them)."""

    def remove_finish_listener(self, listener: FinishListener) -> None:
        """Stop calling ``listener`` (its first registration); nothing if not added."""

    async def wait_for_space(self, index: int) -> None:
        """Return once executor ``index`` is below capacity (or the pool closes).

        Waits only while the executor is full. Raises nothing of its own; when
        the wait is cancelled, the wake-up it would have had passes on to the
        next waiter.
        """

    def depth(self, index: int) -> int:
        """Exact depth (queued + running) of executor ``index``. Never blocks."""

    def depths(self) -> list[int]:
        """Exact depth of every executor, by index. Never blocks."""

    @property
    def in_flight(self) -> int:
        """Events submitted and not yet finished, across all executors."""

    def in_flight_by_aggregate(self) -> dict[str, int]:
        """Events submitted and not yet finished, per aggregate ID (queued,
        running, or waiting out a retry). Never blocks; costs a pass over the
        events in flight (the mode switch asks at a change of its rule)."""

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every event submitted so far is finished.

        Does not stop intake. Raises :class:`DrainTimeoutError` on timeout.
        """

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new events, drain (bounded by ``timeout``), then stop the executors.

        Idempotent. Events still unfinished at the deadline are cancelled
        (their completions are cancelled, never resolved as handled). Never
        raises on timeout.
        """
