"""Machinery shared by both pools: bounded executor queues, the worker loop,
handler invocation (async on the loop, sync in a bounded thread pool), drain
and close. Subclasses decide what happens when a handler fails.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
import time
import types
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, cast

import structlog

from pool._deadletter import DeadLetter, DeadLetterReason
from pool._errors import DrainTimeoutError, NonRetryableError, PoolClosedError, QueueFullError
from pool._message import Message
from pool._metric_defs import LATENCY_BUCKETS
from pool._metrics import NoopMetrics, PoolMetrics
from pool._options import PoolOptions
from pool._protocol import Completion, FinishListener, Handler, PoolMode
from pool._routing import Router

log = structlog.get_logger("pool")


def is_async_handler(handler: object) -> bool:
    """Whether ``handler`` is an ``async def`` function (or a callable object with one)."""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - we want the bound __call__
    return call is not None and inspect.iscoroutinefunction(call)


class _Executor:
    """One worker/actor: a bounded FIFO and the bookkeeping around it."""

    __slots__ = (
        "context",
        "current",
        "dead_letters",
        "drain_targets",
        "failed",
        "handoff",
        "held",
        "index",
        "latency",
        "latency_sum",
        "ok",
        "parked",
        "queue",
        "ready",
        "run",
        "running",
        "space_waiters",
        "submitted",
        "task",
        "timed",
        "wakeup",
        "watchdog",
    )

    def __init__(self, index: int, run: Callable[[Message], Any], timed: bool) -> None:
        self.index = index
        # Runs the executor's handler once: the ``async def`` handler itself, or
        # the thread-pool runner of a sync one (the actor pool swaps both on
        # restart); ``timed``: the pool's handler timeout applies to it.
        self.run = run
        self.timed = timed
        self.queue: deque[tuple[Message, Completion | None]] = deque()
        self.running = False
        # The event of the current (or last) call; meaningful while ``running``.
        self.current: Message | None = None
        # Aggregates whose failing event waits out its retry backoff, and the
        # events of theirs met in the queue meanwhile (see BasePool._park).
        self.parked: dict[str, _Parked] = {}
        # Parked events whose backoff is over, to be retried before the queue.
        self.ready: deque[_Parked] = deque()
        # Events parked or deferred behind a parked one (part of the depth).
        self.held = 0
        self.wakeup: asyncio.Future[None] | None = None
        self.space_waiters: deque[asyncio.Future[None]] = deque()
        self.submitted = 0
        # Events handled (a handler attempt succeeded) and finished as dead
        # letters: together, the events finished (see ``finished``).
        self.ok = 0
        self.dead_letters = 0
        # Handler attempts that failed, and the durations of all attempts: per
        # bucket of LATENCY_BUCKETS (the last slot above the largest) and summed.
        # Kept only for a collector bound to the pool (see PoolStats).
        self.failed = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        # (target finished count, drain waiter) pairs: see BasePool.drain.
        self.drain_targets: list[tuple[int, _DrainWaiter]] = []
        self.task: asyncio.Task[None] | None = None
        # The executor task's contextvars context: an eager first step (see
        # BasePool.dispatch_nowait) runs in it too, so a handler sees one context.
        self.context = contextvars.Context()
        # Set by the executor loop before its first wait (and only read after it).
        self.watchdog: _Watchdog = cast(_Watchdog, None)
        # An attempt whose first step ran eagerly and did not finish there, for
        # the executor loop to go on with: (coroutine, what its first step
        # yielded, what it raised, when it started).
        self.handoff: _Handoff | None = None

    @property
    def depth(self) -> int:
        return len(self.queue) + self.running + self.held

    @property
    def finished(self) -> int:
        """Events finished: handled or dead-lettered."""
        return self.ok + self.dead_letters


class _Parked:
    """A failing event waiting out its backoff, and its aggregate's later events."""

    __slots__ = ("attempts", "deferred", "error", "future", "message", "timer")

    def __init__(
        self, message: Message, future: Completion | None, attempts: int, error: BaseException
    ) -> None:
        self.message = message
        self.future = future
        self.attempts = attempts
        self.error = error
        self.deferred: deque[tuple[Message, Completion | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None


class _Watchdog:
    """The handler timeout of one executor: one timer at a time instead of one
    per call (``asyncio.timeout`` costs a timer handle, a heap push and two
    Python-level context-manager calls per event).

    The executor loop stamps each timed call's start (one ``loop.time()``) and
    arms the timer only when none is armed. When the timer fires it looks at the
    call running then: past its deadline, it cancels the executor's task and
    sets ``expired`` (the loop turns the cancellation into ``TimeoutError``, as
    ``asyncio.timeout`` does, and clears the flag); not yet, it re-arms at that
    call's deadline; no timed call running, it stays off until the next one. So
    an executor busy with quick calls re-arms about once per timeout period, and
    a hung call is cancelled at its own deadline. (After the pool closes, an
    armed timer fires once more, finds no call and stops.)
    """

    __slots__ = ("ex", "expired", "loop", "started", "task", "timeout", "timer")

    #: Timers may fire this much before their time (clock granularity).
    EARLY = 0.001

    def __init__(
        self,
        ex: _Executor,
        task: asyncio.Task[Any],
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.ex = ex
        self.task = task
        self.loop = loop
        self.timeout = timeout
        # When the executor's current (or last) timed call started (loop time).
        self.started = 0.0
        # The watchdog cancelled the running call; the loop has not seen it yet.
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def check(self) -> None:
        self.timer = None
        ex = self.ex
        if not ex.running or not ex.timed or self.expired:
            return  # idle or untimed (the next timed call arms), or already cancelled
        deadline = self.started + self.timeout
        if self.loop.time() >= deadline - self.EARLY:
            self.expired = True
            self.task.cancel()
        else:
            self.timer = self.loop.call_at(deadline, self.check)


def _timed_out(timeout: float, cancelled: BaseException) -> TimeoutError:
    """The error of a call the watchdog cancelled. As with ``asyncio.timeout``,
    its cause is the cancellation, whose traceback shows where the call hung."""
    error = TimeoutError(f"handler timed out after {timeout:g}s")
    error.__cause__ = cancelled
    return error


#: A handler attempt whose first step ran eagerly and did not finish there:
#: (its coroutine, what the step yielded, what it raised, when it started).
_Handoff = tuple[Coroutine[Any, Any, Any] | None, Any, BaseException | None, float]
#: The running task per event loop, which ``asyncio.current_task`` reads (the C
#: module's dict): an eager first step runs as the executor's task.
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = asyncio.tasks._current_tasks  # type: ignore[attr-defined]
#: ``next``'s default: the handler's first step returned.
_DONE: Any = object()
_FIRST_BOUND = LATENCY_BUCKETS[0]


@types.coroutine
def _go_on(
    coro: Coroutine[Any, Any, Any], yielded: Any, thrown: BaseException | None
) -> Generator[Any, None, Any]:
    """Drive the rest of a handler coroutine whose first step ran eagerly (see
    ``BasePool.dispatch_nowait``), as if the executor's task had run that step: what the
    step yielded goes to the task (a future it waits on, or ``None`` for a bare
    yield), what the task sends or throws back goes into the coroutine, and
    from the next step on the coroutine is awaited directly. ``thrown``: an
    exception to throw into it first (the task's cancellation that came before
    the executor took the attempt over)."""
    while True:
        if thrown is not None:
            error, thrown = thrown, None
            try:
                yielded = coro.throw(error)
            except StopIteration as stop:
                return stop.value
        try:
            yield yielded
        except GeneratorExit:  # closed (the task is being collected): close the handler too
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown in by the task: its cancellation
            thrown = exc
        else:
            return (yield from coro.__await__())


@types.coroutine
def _raise(error: BaseException) -> Generator[Any, None, Any]:
    """Raise ``error`` where the executor awaits the attempt (a first step that raised)."""
    raise error
    yield  # a generator: unreachable


class _Retry:
    """Sentinel type: the retry policy gives a failed event another try."""


_RETRY = _Retry()


class _DrainWaiter:
    __slots__ = ("future", "remaining")

    def __init__(self, future: asyncio.Future[None], remaining: int) -> None:
        self.future = future
        self.remaining = remaining


_DEFAULTS = PoolOptions()


class BasePool:
    """A pool of ``options.size`` sequential executors, each with a queue
    bounded by ``options.capacity``."""

    _mode: PoolMode

    def __init__(
        self,
        handler: Handler,
        options: PoolOptions = _DEFAULTS,
        *,
        metrics: PoolMetrics | None = None,
        thread_pool: ThreadPoolExecutor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``metrics`` defaults to none collected; ``thread_pool`` runs sync
        handlers (default: the pool's own, ``options.handler_threads`` wide,
        shut down on close); ``clock`` times handlers and restart windows,
        ``wall_clock`` stamps dead letters, ``rand`` spreads retry backoffs."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.options = options
        size = options.size
        self._handler = handler
        self._size = size
        self._capacity = options.capacity
        self._retry = options.retry
        self._metrics: PoolMetrics = metrics or NoopMetrics()
        # With the no-op collector the hot path skips metric calls and clock reads.
        self._metered = not isinstance(self._metrics, NoopMetrics)
        self._handler_timeout = options.handler_timeout
        self._own_threads = thread_pool is None
        self._threads_n = options.handler_threads
        self._thread_pool = thread_pool
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        # False when a finish listener logs each dead letter itself (the service's
        # sink logs it once published, with its ID): one line per dead letter.
        self._log_dead_letters = options.log_dead_letters
        self._router = Router(size)
        # aggregate ID -> its executor, bounded like the router's memo: one dict
        # lookup per event on the hot path.
        self._by_key: dict[str, _Executor] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        run, timed = self._new_runner(handler)
        self._executors = [_Executor(i, run, timed) for i in range(size)]
        self._listeners: list[FinishListener] = []
        # A collector bound to the pool reads the hot counts (sent, attempts,
        # latency, depths) from it at scrape time; only an unbound one is told
        # per event.
        bind = getattr(self._metrics, "bind", None)
        self._report_each = self._metered and not (callable(bind) and bind(self))
        self._started = False
        self._closing = False
        # Started and not closing: the one check of the hot intake path.
        self._open = False
        self._closed = False
        self._close_lock = asyncio.Lock()

    # ----------------------------------------------------------- properties
    @property
    def mode(self) -> PoolMode:
        return self._mode

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_flight(self) -> int:
        # Summed when asked (rare) rather than counted on the hot path.
        return sum(ex.submitted - ex.finished for ex in self._executors)

    @property
    def closed(self) -> bool:
        return self._closing

    def executor_for(self, aggregate_id: str) -> int:
        return self._router(aggregate_id)

    def depth(self, index: int) -> int:
        return self._executors[index].depth

    def depths(self) -> list[int]:
        return [len(ex.queue) + ex.running + ex.held for ex in self._executors]

    def in_flight_by_aggregate(self) -> dict[str, int]:
        """Unfinished events per aggregate ID: queued, running, waiting out a
        retry backoff or deferred behind one. O(events in flight)."""
        counts: dict[str, int] = {}
        for ex in self._executors:
            for message, _ in ex.queue:
                key = message.aggregate_id
                counts[key] = counts.get(key, 0) + 1
            parked = ex.parked
            for key, entry in parked.items():  # the parked event and those behind it
                counts[key] = counts.get(key, 0) + 1 + len(entry.deferred)
            current = ex.current
            if ex.running and current is not None:
                key = current.aggregate_id
                retried = parked.get(key)
                if retried is None or retried.message is not current:  # not a parked one's retry
                    counts[key] = counts.get(key, 0) + 1
        return counts

    # ------------------------------------------ counts for a bound collector
    # (pool.PoolStats: read from the scrape's thread; plain reads, no lock)
    def sent_counts(self) -> list[int]:
        """Events accepted into each executor's queue since the start, by index."""
        return [ex.submitted for ex in self._executors]

    def attempt_counts(self) -> tuple[list[int], list[int]]:
        """Handler attempts that succeeded, and that failed, by executor index."""
        executors = self._executors
        return [ex.ok for ex in executors], [ex.failed for ex in executors]

    def latency_histograms(self) -> tuple[list[list[int]], list[float]]:
        """Handler attempts per latency bucket, and their summed durations, by executor."""
        executors = self._executors
        return [ex.latency[:] for ex in executors], [ex.latency_sum for ex in executors]

    def add_finish_listener(self, listener: FinishListener, *, first: bool = False) -> None:
        """Call ``listener(message, dead_letter_or_none)`` synchronously as each event finishes.

        It runs before the event's completion resolves, on the event loop,
        and must not raise or block. It may run inside :meth:`dispatch_nowait`
        (an event finished by its eager first step). ``first``: before the
        listeners added so far (the mode switch's bookkeeping goes first).
        """
        # In place: the executor loops hold the list. (Listeners are added and
        # removed synchronously, never while they are being called.)
        if first:
            self._listeners.insert(0, listener)
        else:
            self._listeners.append(listener)

    def remove_finish_listener(self, listener: FinishListener) -> None:
        """Stop calling ``listener`` (its first registration); nothing if not added."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the executor tasks (idempotent; ``submit`` starts them lazily too)."""
        if self._started:
            return
        if self._closing:
            raise PoolClosedError(f"{self._mode} pool is closed")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._open = True
        if self._thread_pool is None:
            self._thread_pool = ThreadPoolExecutor(
                max_workers=self._threads_n, thread_name_prefix=f"{self._mode}-handler"
            )
        for ex in self._executors:
            ex.context = contextvars.copy_context()
            ex.task = asyncio.create_task(
                self._run(ex), name=f"{self._mode}-executor-{ex.index}", context=ex.context
            )

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------- intake
    def submit_nowait(self, message: Message) -> Completion:
        future = self.enqueue_nowait(message, True)
        assert future is not None
        return future

    async def submit(self, message: Message) -> Completion:
        while True:
            try:
                return self.submit_nowait(message)
            except QueueFullError as full:
                await self.wait_for_space(full.index)

    def dispatch_nowait(self, message: Message) -> None:
        """Like :meth:`submit_nowait` without a completion future: the outcome
        is reported only to the finish listeners. The hot path of the Kafka
        consumer: a future per event costs more than the rest of the pool.
        (:meth:`enqueue_nowait` without a future, written out: one call less.)

        *The eager first step.* For an executor that is idle (waiting on its
        wake-up) with nothing of the event's aggregate running or held, the
        handler's first step runs here, on the caller's stack: a handler that
        completes without suspending is finished (listeners called) before
        this returns, without queueing the event, waking the executor's task
        and stepping it. One that suspends (or raises) is handed over to the
        executor's task, which goes on with it exactly as with an attempt it
        started (the watchdog, retries, dead letters, supervision; see
        ``_take_over``). The step runs as the executor's task would run it:
        in its contextvars context, with it as the current task
        (``asyncio.current_task()``, ``asyncio.timeout()`` in a handler), and
        with the executor marked running (one event at a time; it counts as in
        flight). Nothing the handler raises escapes from here."""
        if not self._open:
            self.enqueue_nowait(message, False)  # raises, or starts the pool
            return
        ex = self._by_key.get(message.aggregate_id) or self._executor_of(message.aggregate_id)
        queue = ex.queue
        depth = len(queue) + ex.running + ex.held
        if depth >= self._capacity:
            raise QueueFullError(ex.index, self._capacity)
        ex.submitted += 1
        if self._report_each:
            metrics = self._metrics
            metrics.message_sent(ex.index)
            metrics.inbox_depth(ex.index, depth + 1, self._capacity)
        wakeup = ex.wakeup
        if wakeup is None:  # the executor is running: it takes the event from its queue
            queue.append((message, None))
            return
        ex.wakeup = None
        if depth or wakeup.done():
            queue.append((message, None))
            if not wakeup.done():
                wakeup.set_result(None)
            return
        # The executor is idle, waiting for work, and nothing of this aggregate
        # is running or held there: run the handler's first step here (written
        # out: the hot path of the Kafka consumer).
        ex.running = True
        ex.current = message
        loop: Any = self._loop
        metered = self._metered
        started = self._clock() if metered else 0.0
        tasks = _current_tasks
        caller = tasks.get(loop)
        tasks[loop] = ex.task  # type: ignore[assignment]
        coro = None
        try:
            coro = ex.run(message)
            # ``next`` with a default: a coroutine that returns raises no
            # StopIteration here (it costs ~180 ns); what it yields comes back.
            yielded = ex.context.run(next, coro.__await__(), _DONE)
        except BaseException as exc:  # noqa: BLE001 - the executor deals with it, as with its own
            ex.handoff = (coro, None, exc, started)
            wakeup.set_result(None)
            return
        finally:
            if caller is None:
                del tasks[loop]
            else:
                tasks[loop] = caller
        if yielded is not _DONE:  # suspended: the executor's task goes on with it
            if ex.timed:
                # Stamped only now: a step that does not suspend cannot be timed
                # out (nothing interrupts it). uvloop's ``time()`` is the loop
                # turn's, the same as before the step; with asyncio's own loop a
                # first step that blocks has its deadline from its first suspension.
                wd = ex.watchdog
                wd.started = now = loop.time()
                if wd.timer is None:
                    wd.timer = loop.call_at(now + wd.timeout, wd.check)
            ex.handoff = (coro, yielded, None, started)
            wakeup.set_result(None)
            return
        # Finished in its first step: what the executor loop does after a success.
        if metered:
            took = self._clock() - started
            if self._report_each:
                self._metrics.message_processed(ex.index, True, took)
                self._metrics.inbox_depth(ex.index, len(queue) + ex.held, self._capacity)
            else:
                latency = ex.latency
                latency[0 if took <= _FIRST_BOUND else bisect_left(LATENCY_BUCKETS, took)] += 1
                ex.latency_sum += took
        ex.ok += 1
        ex.running = False
        for listener in self._listeners:
            listener(message, None)
        if ex.space_waiters:
            self._wake_space(ex)
        if ex.drain_targets:
            self._check_drain(ex)
        if queue or ex.ready:
            wakeup.set_result(None)  # events came in meanwhile (from the handler or a listener)
        else:
            ex.wakeup = wakeup

    async def dispatch(self, message: Message) -> None:
        """Like :meth:`submit` without a completion future (see :meth:`dispatch_nowait`)."""
        while True:
            try:
                self.enqueue_nowait(message, False)
            except QueueFullError as full:
                await self.wait_for_space(full.index)
            else:
                return

    def enqueue_nowait(self, message: Message, with_future: bool) -> Completion | None:
        """See :meth:`Pool.enqueue_nowait`; the one intake path of the pool."""
        if self._closing:
            raise PoolClosedError(f"{self._mode} pool is closed; submit refused")
        loop = self._loop
        if loop is None:
            self.start()
            loop = asyncio.get_running_loop()
        ex = self._by_key.get(message.aggregate_id) or self._executor_of(message.aggregate_id)
        depth = len(ex.queue) + ex.running + ex.held
        if depth >= self._capacity:
            raise QueueFullError(ex.index, self._capacity)
        future: Completion | None = loop.create_future() if with_future else None
        ex.queue.append((message, future))
        ex.submitted += 1
        if self._report_each:
            metrics = self._metrics
            metrics.message_sent(ex.index)
            metrics.inbox_depth(ex.index, depth + 1, self._capacity)
        wakeup = ex.wakeup
        if wakeup is not None:
            ex.wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)
        return future

    def _executor_of(self, aggregate_id: str) -> _Executor:
        """The executor of ``aggregate_id``, remembered (the memo is cleared when full)."""
        ex = self._executors[self._router(aggregate_id)]
        by_key = self._by_key
        if len(by_key) >= 65536:
            by_key.clear()
        by_key[aggregate_id] = ex
        return ex

    async def wait_for_space(self, index: int) -> None:
        ex = self._executors[index]
        while not self._closing and ex.depth >= self._capacity:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ex.space_waiters.append(waiter)
            try:
                await waiter
            finally:
                # A cancelled waiter passes its wake-up on, so none is lost.
                if waiter.cancelled():
                    self._wake_space(ex)

    def _wake_space(self, ex: _Executor) -> None:
        waiters = ex.space_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --------------------------------------------------------- the worker
    async def _run(self, ex: _Executor) -> None:
        """The executor loop: one event at a time, retries of parked events
        first, then the queue. The first attempt of each event is inlined here
        (the hot path): while the queue has events the loop takes them one after
        the other without a wake-up, and a handler that completes without
        suspending costs one ``await`` of its coroutine."""
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        task = asyncio.current_task(loop)
        assert task is not None
        timeout = self._handler_timeout or 0.0
        ex.watchdog = wd = _Watchdog(ex, task, loop, timeout)
        loop_time = loop.time
        call_at = loop.call_at
        check = wd.check
        queue = ex.queue
        popleft = queue.popleft
        ready = ex.ready
        parked = ex.parked
        index = ex.index
        metrics = self._metrics
        processed = metrics.message_processed
        report_depth = metrics.inbox_depth
        clock = self._clock
        metered = self._metered
        report_each = self._report_each
        latency = ex.latency
        bounds = LATENCY_BUCKETS
        first_bound = bounds[0]
        # The executor's runner; a restart may swap it (see _use_handler).
        run, timed = ex.run, ex.timed
        capacity = self._capacity
        listeners = self._listeners
        started = 0.0
        outcome: DeadLetter | _Retry | None
        while True:
            retry: _Parked | None = None
            step: Any = None
            if ready:
                retry = ready.popleft()
                message, future = retry.message, retry.future
                ex.held -= 1
            elif queue:
                message, future = popleft()
                if parked and message.aggregate_id in parked:
                    # Its aggregate waits for a failing event's retry: keep the
                    # order by deferring it; other aggregates go on meanwhile.
                    parked[message.aggregate_id].deferred.append((message, future))
                    ex.held += 1
                    continue
            else:
                ex.wakeup = wakeup = loop.create_future()
                try:
                    await wakeup
                except BaseException as exc:  # cancelled
                    if ex.handoff is None:
                        raise
                    step, started = self._take_over(ex, exc)
                else:
                    if ex.handoff is None:
                        continue
                    step, started = self._take_over(ex, None)
                # An attempt whose first step ran eagerly: already stamped.
                message, future = cast(Message, ex.current), None
            if step is None:
                ex.running = True
                ex.current = message
                if timed:
                    wd.started = loop_time()
                    if wd.timer is None:
                        wd.timer = call_at(wd.started + timeout, check)
                if metered:
                    started = clock()
                step = run(message)
            try:
                await step
            except BaseException as exc:
                error = exc
                if wd.expired:  # the watchdog cancelled this call
                    wd.expired = False
                    if not task.uncancel() and isinstance(exc, asyncio.CancelledError):
                        # Nobody else cancelled the task: the call timed out.
                        error = _timed_out(timeout, exc)
                if isinstance(error, asyncio.CancelledError) and task.cancelling():
                    ex.running = False
                    if future is not None:
                        future.cancel()  # the pool is being terminated
                    raise
                if metered:
                    self._count_attempt(ex, clock() - started)
                try:
                    attempts = 1 if retry is None else retry.attempts + 1
                    outcome = self._after_failure(ex, message, error, attempts)
                except Exception as bug:  # a defect of ours must not kill the executor
                    log.exception("pool.internal_error", mode=self._mode.value, executor=index)
                    outcome = self._dead_letter(
                        index, message, DeadLetterReason.INTERNAL_ERROR, bug, attempts=0
                    )
                run, timed = ex.run, ex.timed  # the supervisor may have restarted it
                if isinstance(outcome, _Retry):
                    ex.running = False
                    self._park(ex, retry, message, future, attempts, error)
                    continue
            else:
                if wd.expired:  # the handler swallowed the watchdog's cancellation
                    wd.expired = False
                    task.uncancel()
                if report_each:
                    processed(index, True, clock() - started)
                elif metered:  # a bound collector reads these counts at scrape time
                    took = clock() - started
                    # Most calls fall in the first bucket: no search for them.
                    latency[0 if took <= first_bound else bisect_left(bounds, took)] += 1
                    ex.latency_sum += took
                ex.ok += 1
                outcome = None
            ex.running = False
            if retry is not None:
                self._unpark(ex, retry)
            if report_each:
                report_depth(index, len(queue) + ex.held, capacity)
            for listener in listeners:
                listener(message, outcome)
            if future is not None and not future.done():
                future.set_result(outcome)
            if ex.space_waiters:
                self._wake_space(ex)
            if ex.drain_targets:
                self._check_drain(ex)

    def _take_over(self, ex: _Executor, thrown: BaseException | None) -> tuple[Any, float]:
        """What the executor loop awaits to go on with the attempt
        ``dispatch_nowait`` handed over, and when the attempt started. ``thrown``: the task's
        cancellation that came first (the watchdog's or the pool's close),
        delivered as the task would have: the future the step waits on is
        cancelled, else the cancellation is thrown into the coroutine."""
        handoff = cast(_Handoff, ex.handoff)
        ex.handoff = None
        coro, yielded, error, started = handoff
        if error is not None or coro is None:
            return _raise(thrown if thrown is not None else cast(BaseException, error)), started
        if thrown is not None:
            if isinstance(yielded, asyncio.Future) and yielded.cancel():
                thrown = None  # it raises CancelledError into the handler when awaited
            return _go_on(coro, yielded, thrown), started
        return _go_on(coro, yielded, None), started

    def _count_attempt(self, ex: _Executor, took: float) -> None:
        """Count a failed handler attempt (the executor loop inlines the others)."""
        if self._report_each:
            self._metrics.message_processed(ex.index, False, took)
            return
        ex.latency[bisect_left(LATENCY_BUCKETS, took)] += 1
        ex.latency_sum += took
        ex.failed += 1

    def _on_crash(self, ex: _Executor, error: BaseException, attempts: int) -> bool:
        """React to the ``attempts``-th failure of an event; False escalates
        (dead letter at once)."""
        return True

    def _after_failure(
        self, ex: _Executor, message: Message, error: BaseException, attempts: int
    ) -> DeadLetter | _Retry:
        """The dead letter for an event that failed ``attempts`` times, or
        ``_RETRY`` when the retry policy gives it another try."""
        index = ex.index
        if isinstance(error, NonRetryableError):
            # A deliberate rejection, not a crash: dead letter at once.
            return self._dead_letter(
                index, message, DeadLetterReason.NON_RETRYABLE, error, attempts
            )
        if not self._on_crash(ex, error, attempts):
            return self._dead_letter(
                index, message, DeadLetterReason.RESTART_BUDGET_EXHAUSTED, error, attempts
            )
        if not self._retry.should_retry(attempts):
            reason = (
                DeadLetterReason.HANDLER_TIMEOUT
                if isinstance(error, TimeoutError)
                else DeadLetterReason.RETRIES_EXHAUSTED
            )
            return self._dead_letter(index, message, reason, error, attempts)
        return _RETRY

    def _park(
        self,
        ex: _Executor,
        entry: _Parked | None,
        message: Message,
        future: Completion | None,
        attempts: int,
        error: BaseException,
    ) -> None:
        """Set a failing event aside for its backoff. Its aggregate's later events
        are deferred behind it (order kept); the executor serves the others."""
        if entry is None:
            entry = _Parked(message, future, attempts, error)
            ex.parked[message.aggregate_id] = entry
        else:
            entry.attempts, entry.error = attempts, error
        ex.held += 1
        delay = self._retry.backoff(attempts, self._rand())
        entry.timer = asyncio.get_running_loop().call_later(delay, self._retry_due, ex, entry)

    def _retry_due(self, ex: _Executor, entry: _Parked) -> None:
        entry.timer = None
        ex.ready.append(entry)
        wakeup = ex.wakeup
        if wakeup is not None:
            ex.wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def _unpark(self, ex: _Executor, entry: _Parked) -> None:
        """The parked event is finished: its deferred events go first in the queue."""
        del ex.parked[entry.message.aggregate_id]
        deferred = entry.deferred
        ex.held -= len(deferred)
        ex.queue.extendleft(reversed(deferred))

    def _new_runner(self, handler: Handler) -> tuple[Callable[[Message], Any], bool]:
        """What an executor awaits to run ``handler`` once, and whether the
        handler timeout applies to it (the executor loop times the call)."""
        if is_async_handler(handler):
            return cast("Callable[[Message], Any]", handler), self._handler_timeout is not None

        sync_handler = cast("Callable[[Message], None]", handler)

        async def run_in_thread(message: Message) -> None:
            # A thread cannot be interrupted: the timeout is not applied to
            # sync handlers, so one event of an executor never overlaps the next.
            pool = self._thread_pool
            await asyncio.get_running_loop().run_in_executor(pool, sync_handler, message)

        return run_in_thread, False

    def _use_handler(self, ex: _Executor, handler: Handler) -> None:
        """Run ``handler`` in executor ``ex`` from its next call on."""
        ex.run, ex.timed = self._new_runner(handler)

    def _dead_letter(
        self,
        index: int,
        message: Message,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
    ) -> DeadLetter:
        self._metrics.dead_letter(index, reason.value)
        self._executors[index].dead_letters += 1
        dead = DeadLetter.from_exception(
            message,
            reason,
            error,
            attempts=attempts,
            mode=self._mode.value,
            executor=index,
            time=self._wall_clock(),
        )
        (log.warning if self._log_dead_letters else log.debug)(
            "pool.dead_letter",
            mode=self._mode.value,
            executor=index,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            aggregate_id=message.aggregate_id,
            reason=reason.value,
            error_type=dead.error_type,
            error=dead.error_message,
            attempts=attempts,
        )
        return dead

    # -------------------------------------------------- drain and close
    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every event submitted before this call is finished."""
        loop = asyncio.get_running_loop()
        waiter = _DrainWaiter(loop.create_future(), 0)
        for ex in self._executors:
            if ex.finished < ex.submitted:
                ex.drain_targets.append((ex.submitted, waiter))
                waiter.remaining += 1
        if waiter.remaining == 0:
            return
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            raise DrainTimeoutError(self.in_flight, timeout or 0.0) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                for ex in self._executors:
                    ex.drain_targets = [t for t in ex.drain_targets if t[1] is not waiter]

    def _check_drain(self, ex: _Executor) -> None:
        keep: list[tuple[int, _DrainWaiter]] = []
        for target, waiter in ex.drain_targets:
            if ex.finished >= target:
                waiter.remaining -= 1
                if waiter.remaining == 0 and not waiter.future.done():
                    waiter.future.set_result(None)
            else:
                keep.append((target, waiter))
        ex.drain_targets = keep

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new events, finish queued ones (bounded by ``timeout``), stop.

        Idempotent. Events unfinished at the deadline have their completions
        cancelled; they were never reported as handled.
        """
        async with self._close_lock:
            if self._closed:
                return
            self._closing = True
            self._open = False
            for ex in self._executors:  # submitters blocked on a full queue
                while ex.space_waiters:
                    waiter = ex.space_waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
            if self._started:
                try:
                    await self.drain(timeout)
                except DrainTimeoutError as exc:
                    log.warning(
                        "pool.close_timeout", mode=self._mode.value, remaining=exc.remaining
                    )
                tasks = [ex.task for ex in self._executors if ex.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for ex in self._executors:
                    for entry in ex.parked.values():
                        if entry.timer is not None:
                            entry.timer.cancel()
                        ex.queue.extend([(entry.message, entry.future), *entry.deferred])
                    ex.parked.clear()
                    ex.ready.clear()
                    ex.held = 0
                    while ex.queue:
                        _, future = ex.queue.popleft()
                        if future is not None:
                            future.cancel()
                if self._own_threads and self._thread_pool is not None:
                    self._thread_pool.shutdown(wait=False, cancel_futures=True)
            self._closed = True
