"""The Kafka consumer: fetch, dispatch without waiting, track, commit.

One fetch loop takes batches from aiokafka (``getmany``) and hands every
record to the pool at once (``dispatch_nowait``): it never waits for an event
to finish, so a partition's events run in parallel across executors while each
aggregate keeps its order inside its executor. Outcomes come back through the
pool's finish listener (no future per event) and mark offsets finished in a
per-partition
:class:`~server._offsets.OffsetTracker`; a commit task commits each
partition's highest contiguous finished offset + 1 on an interval, on revoke
and on shutdown. A dead letter counts as finished only once the dead-letter
sink has had it acknowledged by the broker.

Pauses. A partition is fetched only when nothing holds it. Holds are kept by
reason, so an operator pause and a backpressure pause never undo each other;
the bookkeeping (holds, backlogs, which pause/resume calls to make) is the pure
:class:`~server._pauses.PauseBook`:

- ``backpressure``: ``dispatch_nowait`` found the target queue full. The record
  and the rest of its partition's batch go to the partition's backlog (order
  kept), the partition is paused at the consumer, and one task per backlogged
  partition ``await``s ``dispatch`` for the backlog; the partition resumes when
  its backlog is empty.
- ``operator`` / ``drain``: from the control plane.

A global bound on in-flight events (``max_in_flight``) stops fetching above it
and resumes below ``low_watermark``: memory stays bounded whatever the mix.

Redeliveries: an event whose offset is at or below one this process already
dispatched for its partition (after a rebalance gave it back, or a seek) is
counted. Across process restarts this cannot be known here; handlers that
must be idempotent key on the envelope's ``event_id``.

Owned tasks: every task is created by :meth:`EventConsumer._spawn` and
cancelled/awaited by :meth:`EventConsumer.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from pool import DeadLetter, Message, PoolClosedError, QueueFullError, RetryPolicy
from server._consumer_metrics import PAUSE_REASONS, ConsumerMetrics
from server._control import CommittedOffset, DrainProgress, PartitionStatus
from server._offsets import CommitPolicy, OffsetTracker
from server._pauses import DRAIN, OPERATOR, PauseBook
from server._records import install as install_lenient_records

log = structlog.get_logger("server.consumer")

__all__ = [
    "DLQ_RETRY",
    "DRAIN",
    "OPERATOR",
    "ConsumerOptions",
    "DeadLetterPublisher",
    "Dispatcher",
    "EventConsumer",
    "RecordDecoder",
    "publish_until_acknowledged",
]

#: Records dispatched between two yields to the event loop. One ``getmany`` may
#: return thousands of records (``max_records``; after the process was held off
#: the CPU for a while, say): dispatched in one go they would keep the loop from
#: everything else for tens of milliseconds (the control plane's calls, a mode
#: switch waiting for its handover, the executors' next steps). Only fetches
#: larger than this yield at all.
DISPATCH_CHUNK = 256
#: How often the end offsets of paused partitions are listed (for their lag).
_LIST_PAUSED_ENDS_EVERY_S = 1.0
#: A failed dead-letter publish is tried again after 0.5 s, 1 s, 2 s, ... up to 5 s.
DLQ_RETRY = RetryPolicy(initial_backoff=0.5, max_backoff=5.0)


class RecordDecoder(Protocol):
    """Turns a Kafka record into a pool message, or a dead letter when it is unusable."""

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp_ms: int,
    ) -> Message | DeadLetter: ...


class DeadLetterPublisher(Protocol):
    """Publishes a dead letter; returns only once the broker acknowledged it."""

    async def publish(self, dead: DeadLetter) -> Any: ...


class Dispatcher(Protocol):
    """What the consumer needs from the pool (``pool.PoolSwitch`` fits)."""

    def dispatch_nowait(self, message: Message) -> None:
        """Enqueue; ``QueueFullError`` when the target queue is full."""

    async def dispatch(self, message: Message) -> None:
        """Enqueue, waiting only while the target queue is full."""

    def add_finish_listener(
        self, listener: Callable[[Message, DeadLetter | None], None]
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How to consume. ``kafka`` is passed to ``AIOKafkaConsumer`` as extra keyword
    arguments (security settings and the like)."""

    bootstrap_servers: str
    group_id: str
    topics: tuple[str, ...]
    client_id: str = "kafka-actor-pool"
    commit_interval_s: float = 1.0
    #: Stop fetching when this many events are in flight ...
    max_in_flight: int = 100_000
    #: ... and fetch again once they are at or below this share of it.
    resume_fraction: float = 0.5
    #: On revoke, wait at most this long for the revoked partitions' events.
    revoke_timeout_s: float = 10.0
    fetch_timeout_ms: int = 100
    #: How long the broker may hold a fetch for data. Kafka answers as soon as
    #: data arrives, so this only matters when idle; the embedded broker (Tansu)
    #: does not answer early: it holds a fetch about half this long, so it
    #: bounds produce-to-handle latency there (aiokafka's default 500 ms gave
    #: P99 ~260 ms; see docs/performance.md for 20, 10 and 5 ms).
    fetch_max_wait_ms: int = 20
    max_records: int = 2_000
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    #: Backoff between tries of a dead-letter publish that failed: see
    #: :func:`publish_until_acknowledged` (only the policy's backoff is used).
    dlq_retry: RetryPolicy = DLQ_RETRY
    kafka: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("at least one topic is required")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if not 0 <= self.resume_fraction < 1:
            raise ValueError(f"resume_fraction must be in [0, 1), got {self.resume_fraction}")
        CommitPolicy(self.commit_interval_s)  # validates the interval

    @property
    def low_watermark(self) -> int:
        return int(self.max_in_flight * self.resume_fraction)


async def publish_until_acknowledged(
    publish: Callable[[DeadLetter], Awaitable[Any]],
    dead: DeadLetter,
    retry: RetryPolicy,
    *,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> int:
    """Publish ``dead`` until the broker acknowledges it; return how many tries failed.

    After the n-th failure it waits ``retry.backoff(n, rand())``: from
    ``initial_backoff``, multiplied each time, capped at ``max_backoff``,
    spread by the jitter. It never gives up, so ``retry.max_attempts`` is not
    used: the event's offset must stay unfinished (never committed) until its
    dead letter is durable. Any exception of ``publish`` counts as a failure;
    cancellation propagates.
    """
    failures = 0
    while True:
        try:
            await publish(dead)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the offset unfinished, retry
            failures += 1
            delay = retry.backoff(failures, rand())
            msg = dead.message
            log.warning(
                "consumer.dead_letter_publish_failed",
                topic=msg.topic,
                partition=msg.partition,
                offset=msg.offset,
                failures=failures,
                retry_in_s=round(delay, 3),
                error=repr(exc),
            )
            await sleep(delay)
        else:
            return failures


class _Partition:
    """State of one assigned partition, for one assignment."""

    __slots__ = (
        "abandoned",
        "backlog",
        "backlog_task",
        "committed",
        "consumed_counter",
        "listed_end",
        "revoked",
        "tp",
        "tracker",
    )

    def __init__(
        self, tp: TopicPartition, committed: int | None, backlog: Sequence[Message]
    ) -> None:
        self.tp = tp
        self.tracker = OffsetTracker()
        #: The partition's backlog in the pause book (a live, read-only view).
        self.backlog = backlog
        self.backlog_task: asyncio.Task[None] | None = None
        self.committed = committed
        #: End offset listed by the broker while paused (a paused partition is
        #: not fetched, so aiokafka's high watermark stops moving).
        self.listed_end: int | None = None
        self.revoked = False
        #: Tracked offsets that will never finish here (dropped backlog on revoke,
        #: events cancelled by a terminated pool): excluded from "busy".
        self.abandoned = 0
        self.consumed_counter: Any = None

    @property
    def busy(self) -> int:
        """Events of this partition in the pool or awaiting a dead-letter ack."""
        return self.tracker.in_flight - self.abandoned - len(self.backlog)

    @property
    def position(self) -> int | None:
        last = self.tracker.last_added
        return self.committed if last is None else last + 1


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._owner._on_assigned(list(assigned))


class EventConsumer:
    """Consumes ``options.topics`` in group ``options.group_id`` into ``dispatcher``.

    Use as ``async with EventConsumer(...)`` or ``start()`` / ``close()``. For
    a graceful stop: :meth:`stop_fetching`, :meth:`wait_finished`,
    :meth:`commit`, :meth:`close` (what :meth:`shutdown` does).
    """

    def __init__(
        self,
        options: ConsumerOptions,
        *,
        decoder: RecordDecoder,
        dispatcher: Dispatcher,
        dead_letters: DeadLetterPublisher,
        metrics: ConsumerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._decoder = decoder
        self._dispatcher = dispatcher
        self._sink = dead_letters
        self.metrics = metrics if metrics is not None else ConsumerMetrics()
        self._clock = clock
        self._policy = CommitPolicy(options.commit_interval_s)
        self._consumer: Any = None
        self._parts: dict[TopicPartition, _Partition] = {}
        #: Highest offset ever dispatched per partition, across assignments.
        self._max_dispatched: dict[TopicPartition, int] = {}
        self._pauses: PauseBook[TopicPartition, Message] = PauseBook()
        self._in_flight = 0
        self._finished_total = 0
        self._throttled = False
        self._room = asyncio.Event()
        #: Set as events finish while ``_progress_waiters`` wait on it (only then).
        self._progress = asyncio.Event()
        self._progress_waiters = 0
        self._commit_lock = asyncio.Lock()
        self._last_commit_at = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The partition state of each event in the pool, by ``id(message)``: the
        #: pool hands the same object back, and a late finish of a revoked
        #: assignment lands on that assignment's tracker, never on a newer one.
        self._owners: dict[int, _Partition] = {}
        #: The event ``_dispatch_batch`` is handing to the pool, and its
        #: partition: an event that finishes inside that call (a handler's
        #: eager first step) is matched here, with no ``_owners`` entry made
        #: and removed; one that does not finish there is entered in
        #: ``_owners`` when the call returns (before anything else can finish it).
        self._handing: Message | None = None
        self._handing_part: _Partition | None = None
        dispatcher.add_finish_listener(self._on_finished)
        self._fetch_task: asyncio.Task[None] | None = None
        #: Records the fetch loop may still dispatch before it yields (see _dispatch_fetched).
        self._dispatch_budget = DISPATCH_CHUNK
        self._started = False
        self._fetching = False
        self._closed = False
        self._assigned_once = asyncio.Event()
        self._fatal: BaseException | None = None
        self._failed = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        o = self.options
        install_lenient_records()  # a header name that is not UTF-8 must not stop the fetch
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=o.bootstrap_servers,
            group_id=o.group_id,
            client_id=o.client_id,
            enable_auto_commit=False,
            auto_offset_reset=o.auto_offset_reset,
            session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=o.heartbeat_interval_ms,
            max_poll_interval_ms=o.max_poll_interval_ms,
            fetch_max_wait_ms=o.fetch_max_wait_ms,
            # The broker must wait for our revoke (bounded by revoke_timeout_s)
            # before it drops us from the group; aiokafka's default is the
            # session timeout, shorter than the revoke wait.
            rebalance_timeout_ms=max(o.session_timeout_ms, int(o.revoke_timeout_s * 1000) + 5000),
            **o.kafka,
        )
        await self._consumer.start()
        self._consumer.subscribe(list(o.topics), listener=_Listener(self))
        self._fetching = True
        self._fetch_task = self._spawn(self._fetch_loop(), "consumer.fetch")
        self._spawn(self._commit_loop(), "consumer.commit")
        log.info("consumer.started", topics=list(o.topics), group_id=o.group_id)

    async def __aenter__(self) -> EventConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("consumer.task_failed", task=task.get_name(), error=repr(exc))
            if self._fatal is None:
                self._fatal = exc
                self._failed.set()

    @property
    def failure(self) -> BaseException | None:
        """The first unexpected error of a consumer task (the service stops on it)."""
        return self._fatal

    async def failed(self) -> BaseException:
        """Wait for :attr:`failure` and return it."""
        await self._failed.wait()
        assert self._fatal is not None
        return self._fatal

    async def stop_fetching(self) -> None:
        """Stop taking new records (already fetched ones keep being dispatched)."""
        self._fetching = False
        task, self._fetch_task = self._fetch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pauses.stop()
        self._sync_pauses()

    async def wait_finished(
        self,
        timeout: float | None,
        partitions: Sequence[TopicPartition] | None = None,
        progress: Callable[[DrainProgress], None] | None = None,
    ) -> int:
        """Wait until the listed (default all) partitions have nothing in flight.

        Returns how many events are still in flight at the end (0 = done).
        Calls ``progress`` about every 100 ms and on completion.
        """
        start = self._clock()
        deadline = None if timeout is None else start + timeout
        finished_at_start = self._finished_total

        def remaining() -> int:
            if partitions is None:
                return self._in_flight
            return sum(p.tracker.in_flight for tp, p in self._parts.items() if tp in partitions)

        while True:
            left = remaining()
            if progress is not None:
                progress(
                    DrainProgress(
                        finished=self._finished_total - finished_at_start,
                        remaining=left,
                        elapsed_s=self._clock() - start,
                    )
                )
            if left == 0:
                return 0
            wait = 0.1
            if deadline is not None:
                wait = min(wait, deadline - self._clock())
                if wait <= 0:
                    return left
            await self._wait_progress(wait)

    async def shutdown(self, timeout: float) -> int:
        """Stop fetching, wait up to ``timeout`` for in-flight events, commit, close.

        Returns the number of events left unfinished (their offsets are not committed).
        """
        await self.stop_fetching()
        left = await self.wait_finished(timeout)
        await self.commit()
        await self.close()
        return left

    async def close(self) -> None:
        """Cancel every task and leave the group. Idempotent; does not commit."""
        if self._closed:
            return
        self._closed = True
        self._fetching = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Our revoke listener must not wait or commit while aiokafka leaves.
            for part in self._parts.values():
                part.revoked = True
            await consumer.stop()
        self._parts.clear()
        self._pauses.clear()
        log.info("consumer.closed")

    # ------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        o = self.options
        while self._fetching:
            if self._in_flight >= o.max_in_flight:
                self._throttled = True
                self.metrics.throttled.set(1)
                self._room.clear()
                await self._room.wait()
                self._throttled = False
                self.metrics.throttled.set(0)
                continue
            # Never take more than the room left under the bound.
            room = min(o.max_records, o.max_in_flight - self._in_flight)
            batches = await consumer.getmany(timeout_ms=o.fetch_timeout_ms, max_records=room)
            await self._dispatch_fetched(batches)

    async def _dispatch_fetched(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Dispatch what one ``getmany`` returned, yielding to the event loop after
        every :data:`DISPATCH_CHUNK` records.

        After a yield a partition's remaining records are dispatched only if
        it is still ours (same assignment) and no operator or drain hold came
        in meanwhile; a held partition is sought back to its first record not
        dispatched, so it is fetched again once released (as records fetched
        before a pause are, by aiokafka). Cancelled during a yield (the
        service stops fetching), it dispatches the rest first, at once.
        """
        # The partition states the records were fetched for: after a yield, a
        # partition revoked (and perhaps assigned again) meanwhile is skipped.
        parts = [(self._parts.get(tp), records) for tp, records in batches.items()]
        # Carried from one fetch to the next: ``getmany`` returns without a loop
        # turn when it has records buffered.
        budget = self._dispatch_budget
        for i, (part, records) in enumerate(parts):
            if part is None or part.revoked:
                continue  # not ours any more: the new owner reads them again
            start, end = 0, len(records)
            while start < end:
                if budget == 0:
                    budget = DISPATCH_CHUNK
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        self._dispatch_rest(parts, i, start)
                        raise
                    if part.revoked:
                        break
                    offset = records[start].offset
                    if self._pauses.held_by_control(part.tp) and self._seek(part.tp, offset):
                        break
                stop = min(end, start + budget)
                chunk = records if start == 0 and stop == end else records[start:stop]
                closed = self._dispatch_batch(part, chunk)
                budget -= stop - start
                start = stop
                if closed:
                    break
        self._dispatch_budget = budget

    def _seek(self, tp: TopicPartition, offset: int) -> bool:
        """Fetch ``tp`` from ``offset`` next; False if aiokafka refused (then the
        records must be dispatched now: nothing would fetch them again)."""
        try:
            self._consumer.seek(tp, offset)
        except (KafkaError, ValueError) as exc:
            log.warning(
                "consumer.seek_failed", topic=tp.topic, partition=tp.partition, error=repr(exc)
            )
            return False
        return True

    def _dispatch_rest(
        self, parts: list[tuple[_Partition | None, Sequence[Any]]], i: int, start: int
    ) -> None:
        """Dispatch, at once, ``parts[i]`` from record ``start`` on and those after it."""
        for j in range(i, len(parts)):
            part, records = parts[j]
            if part is not None and not part.revoked:
                self._dispatch_batch(part, records[start:] if j == i else records)

    def _dispatch_batch(self, part: _Partition, records: Sequence[Any]) -> bool:
        """Dispatch ``records`` of ``part`` in order; True when the pool is closed
        (the records from the one it refused on are not dispatched)."""
        tracker = part.tracker
        tp = part.tp
        backlog = part.backlog
        decode = self._decoder.decode
        dispatch = self._dispatcher.dispatch_nowait
        owners = self._owners
        max_seen = self._max_dispatched.get(tp, -1)
        redelivered = 0
        closed = False
        # ``tracker.add`` written out (one call less per record; its check is
        # the one on ``last`` below), in two halves: the offset goes into the
        # dispatch order at once, into the unfinished set only if the event
        # does not finish inside its dispatch call (for one that does, the
        # finish would take it out again). Only this loop adds to a tracker,
        # and the tracker never rebinds these two containers.
        last = tracker.last_added
        if last is None:
            last = -1  # offsets are >= 0
        pending_append = tracker._pending.append
        unfinished_add = tracker._unfinished.add
        self._handing_part = part
        part.consumed_counter.inc(len(records))
        for record in records:
            offset = record.offset
            if offset <= last:
                # Already dispatched in this assignment (a seek back): the first
                # dispatch covers it, and its offset is tracked.
                redelivered += 1
                continue
            if offset <= max_seen:
                redelivered += 1
            else:
                max_seen = offset
            tracker.last_added = last = offset
            pending_append(offset)
            # Unfinished and in flight from here, except for an event that
            # finishes inside its dispatch call: that one is entered (and
            # counted) only if it is still running when the call returns.
            item = decode(
                record.topic,
                record.partition,
                offset,
                record.key,
                record.value,
                record.headers,
                record.timestamp,
            )
            if isinstance(item, DeadLetter):
                unfinished_add(offset)
                self._in_flight += 1
                self.metrics.intake_dead_letters.labels(str(item.reason)).inc()
                self._spawn(self._dead_letter(part, offset, item), "consumer.dlq")
                continue
            if backlog:
                unfinished_add(offset)
                self._in_flight += 1
                self._pauses.defer(tp, item)
                continue
            self._handing = item
            try:
                dispatch(item)
            except QueueFullError:
                self._handing = None
                unfinished_add(offset)
                self._in_flight += 1
                self._pauses.defer(tp, item)  # the partition pauses for backpressure
                self._sync_pauses()
                part.backlog_task = self._spawn(
                    self._submit_backlog(part), f"consumer.backlog[{tp.topic}:{tp.partition}]"
                )
                continue
            except PoolClosedError:
                # Shutting down: this offset stays unfinished (never committed).
                self._handing = None
                unfinished_add(offset)
                log.warning("consumer.pool_closed", topic=tp.topic, partition=tp.partition)
                part.abandoned += 1
                closed = True
                break
            if self._handing is not None:  # not finished inside the call
                self._handing = None
                unfinished_add(offset)
                self._in_flight += 1
                owners[id(item)] = part
        self._max_dispatched[tp] = max_seen
        if redelivered:
            self.metrics.redeliveries.labels(tp.topic, str(tp.partition)).inc(redelivered)
        self.metrics.in_flight.set(self._in_flight)
        return closed

    async def _submit_backlog(self, part: _Partition) -> None:
        """Submit a backpressured partition's backlog in order, waiting for room;
        the backpressure hold lifts with the last event (see ``PauseBook``)."""
        backlog, tp, pauses = part.backlog, part.tp, self._pauses
        try:
            while backlog and not part.revoked:
                message = backlog[0]
                # Registered first: the event may finish before dispatch returns.
                self._owners[id(message)] = part
                try:
                    await self._dispatcher.dispatch(message)
                except BaseException:
                    self._owners.pop(id(message), None)
                    raise
                pauses.dispatched(tp)
        except PoolClosedError:
            # Nothing more can be dispatched: the partition stays held.
            dropped = len(pauses.drop_backlog(tp))
            part.abandoned += dropped
            self._in_flight -= dropped
            return
        finally:
            part.backlog_task = None
        self._sync_pauses()

    # ---------------------------------------------------------- completion

    def _on_finished(self, message: Message, outcome: DeadLetter | None) -> None:
        """The pool's finish listener: runs synchronously as each event finishes.

        The hot path of the finish (``_finish`` written out): the offset is
        marked done in its tracker (the commit point moves when it is read,
        not here), and the progress event is set only while someone waits."""
        if message is self._handing:  # finished inside ``_dispatch_batch``'s call
            # Its offset is not entered as unfinished nor counted in flight
            # yet (see ``_dispatch_batch``): a success has nothing to undo.
            self._handing = None
            part = self._handing_part
            if part is None:
                return  # pragma: no cover - set with ``_handing``
            if outcome is None:
                self._finished_total += 1
                if self._progress_waiters:
                    self._progress.set()
                return
            part.tracker._unfinished.add(message.offset)
            self._in_flight += 1
        else:
            part = self._owners.pop(id(message), None)
        if part is None:
            return  # not dispatched by this consumer
        if outcome is not None:
            self._spawn(self._dead_letter(part, message.offset, outcome), "consumer.dlq")
            return
        try:  # ``part.tracker.done(message.offset)`` written out: one call less
            part.tracker._unfinished.remove(message.offset)
        except KeyError:
            raise ValueError(f"offset {message.offset} is not in flight") from None
        self._finished_total += 1
        self._in_flight -= 1
        if self._progress_waiters:
            self._progress.set()
        if self._throttled and self._in_flight <= self.options.low_watermark:
            self._room.set()

    async def _dead_letter(self, part: _Partition, offset: int, dead: DeadLetter) -> None:
        """Publish until acknowledged, then mark the offset finished."""
        await publish_until_acknowledged(self._sink.publish, dead, self.options.dlq_retry)
        self._finish(part, offset)

    def _finish(self, part: _Partition, offset: int) -> None:
        part.tracker.done(offset)
        self._finished_total += 1
        self._in_flight -= 1
        if self._progress_waiters:
            self._progress.set()
        if self._throttled and self._in_flight <= self.options.low_watermark:
            self._room.set()

    async def _wait_progress(self, timeout: float) -> None:
        """Wait up to ``timeout`` for an event to finish (or a commit)."""
        self._progress.clear()
        self._progress_waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout)
        finally:
            self._progress_waiters -= 1

    def _check_room(self) -> None:
        """Wake a throttled fetch loop after in-flight dropped without a finish."""
        if self._throttled and self._in_flight <= self.options.low_watermark:
            self._room.set()

    # ---------------------------------------------------------------- commit

    async def _commit_loop(self) -> None:
        tick = min(self.options.commit_interval_s, 0.25)
        next_listing = 0.0
        while True:
            await asyncio.sleep(tick)
            now = self._clock()
            if self._policy.should_commit(now, self._last_commit_at, self._dirty()):
                await self.commit()
            if now >= next_listing:
                next_listing = now + _LIST_PAUSED_ENDS_EVERY_S
                await self._list_paused_ends()
            self._update_gauges()

    async def _list_paused_ends(self) -> None:
        """Ask the broker for the end offsets of paused partitions: they are not
        fetched, so their high watermark (and the lag derived from it) would
        otherwise freeze at the last fetch while events pile up behind a pause."""
        consumer = self._consumer
        parts = [self._parts[tp] for tp in self._pauses.paused_at_consumer()]
        if consumer is None or not parts:
            return
        try:
            ends = await asyncio.wait_for(
                consumer.end_offsets([p.tp for p in parts]), _LIST_PAUSED_ENDS_EVERY_S
            )
        except (KafkaError, TimeoutError) as exc:
            log.debug("consumer.list_offsets_failed", error=repr(exc))
            return
        for part in parts:
            part.listed_end = ends.get(part.tp)

    def _dirty(self) -> bool:
        for part in self._parts.values():
            c = part.tracker.committable
            if c is not None and (part.committed is None or c > part.committed):
                return True
        return False

    async def commit(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> list[CommittedOffset]:
        """Commit the committable offsets of owned partitions (all, or those listed).

        Returns what was committed by this call. Failures are counted and logged,
        never raised: the next commit carries the same offsets.
        """
        parts = (
            list(self._parts.values())
            if partitions is None
            else [p for tp in partitions if (p := self._parts.get(tp)) is not None]
        )
        return await self._commit([p for p in parts if not p.revoked])

    async def _commit(self, parts: list[_Partition]) -> list[CommittedOffset]:
        async with self._commit_lock:
            offsets: dict[TopicPartition, int] = {}
            parts_by_tp = {p.tp: p for p in parts}
            for part in parts:
                c = part.tracker.committable
                if c is None:
                    continue
                if part.committed is None or c > part.committed:
                    offsets[part.tp] = c
            self._last_commit_at = self._clock()
            if not offsets or self._consumer is None:
                return []
            started = time.perf_counter()
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:
                self.metrics.commit_failures.inc()
                log.warning("consumer.commit_failed", error=repr(exc), partitions=len(offsets))
                return []
            self.metrics.commit_latency.observe(time.perf_counter() - started)
            result = []
            for tp, offset in offsets.items():
                parts_by_tp[tp].committed = offset
                result.append(CommittedOffset(tp.topic, tp.partition, offset))
            self._progress.set()
            return result

    # -------------------------------------------------------------- rebalance

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            consumer = self._consumer
            if self._closed or consumer is None:
                # aiokafka can complete a join while close() leaves the group
                # (a service stopped right after its start): nothing to take over.
                log.info("consumer.assignment_ignored", reason="closed")
                return
            committed = None
            with contextlib.suppress(KafkaError):
                committed = await consumer.committed(tp)
            self._pauses.assign(tp)
            part = _Partition(tp, committed, self._pauses.backlog(tp))
            part.consumed_counter = self.metrics.consumed.labels(tp.topic, str(tp.partition))
            self._parts[tp] = part
            self._sync_pauses()
        self.metrics.rebalances.labels("assigned").inc(len(assigned))
        log.info(
            "consumer.assigned",
            partitions=[f"{tp.topic}:{tp.partition}" for tp in sorted(assigned)],
        )
        self._assigned_once.set()

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = [p for tp in revoked if (p := self._parts.get(tp)) is not None]
        if not parts or self._closed:
            return
        started = self._clock()
        for part in parts:
            part.revoked = True  # stop dispatching; the backlog is dropped (not finished)
            self._pauses.revoke(part.tp)
            task = part.backlog_task
            if task is not None:
                task.cancel()
        for part in parts:
            if part.backlog_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await part.backlog_task
            # Backlogged offsets were never dispatched: they stay unfinished in
            # the tracker (so no commit passes them), but are not in flight.
            dropped = len(self._pauses.drop_backlog(part.tp))
            part.abandoned += dropped
            self._in_flight -= dropped
        self._check_room()
        tps = [p.tp for p in parts]
        # Wait (bounded) for what the pool still runs of these partitions.
        deadline = started + self.options.revoke_timeout_s
        while True:
            busy = sum(p.busy for p in parts)
            if busy == 0 or self._clock() >= deadline:
                break
            await self._wait_progress(min(0.1, deadline - self._clock()))
        # Commit them while aiokafka still counts them as ours.
        committed = await self._commit(parts)
        left = sum(p.busy for p in parts)
        for tp in tps:
            self._parts.pop(tp, None)
            self._pauses.forget(tp)
            self.metrics.forget_partition(tp.topic, tp.partition)
        self.metrics.rebalances.labels("revoked").inc(len(tps))
        log.info(
            "consumer.revoked",
            partitions=[f"{tp.topic}:{tp.partition}" for tp in sorted(tps)],
            committed=len(committed),
            unfinished=left,
            took_ms=round((self._clock() - started) * 1000, 1),
        )

    # ------------------------------------------------------------ pause/resume

    def _sync_pauses(self) -> None:
        """Make the consumer's pause state match the pause book."""
        consumer = self._consumer
        if consumer is None:
            return  # no partition is assigned
        for tp, pause in self._pauses.take_changes():
            if pause:
                consumer.pause(tp)
            else:
                consumer.resume(tp)

    @property
    def assignment(self) -> list[TopicPartition]:
        return sorted(self._parts)

    def hold(
        self, reason: str, partitions: Sequence[TopicPartition] | None
    ) -> list[TopicPartition]:
        """Pause ``partitions`` (all assigned, now and later, when ``None``) for
        ``reason`` (``operator`` or ``drain``); return the partitions it holds."""
        held = self._pauses.hold(reason, partitions)
        self._sync_pauses()
        return sorted(held)

    def release(
        self, reasons: Iterable[str], partitions: Sequence[TopicPartition] | None
    ) -> list[TopicPartition]:
        """Lift ``reasons`` from ``partitions`` (all when ``None``); return those released."""
        released = self._pauses.release(reasons, partitions)
        self._sync_pauses()
        return sorted(released)

    # ------------------------------------------------------ fleet control

    def set_holds(
        self, reason: str, partitions: Iterable[TopicPartition] | None
    ) -> list[TopicPartition]:
        """Hold exactly ``partitions`` for ``reason`` (all, now and later, when
        ``None``; none when empty), replacing what it held. Partitions not
        assigned yet are held from their assignment on (before any fetch)."""
        held = self._pauses.set_holds(reason, partitions)
        self._sync_pauses()
        return sorted(held)

    def holds_of(self, reason: str) -> tuple[bool, frozenset[TopicPartition]]:
        """What ``reason`` holds: (every partition, the listed ones)."""
        return self._pauses.holds_of(reason)

    def partitions_for(self, topic: str) -> set[int] | None:
        """The partitions of ``topic`` in the cluster metadata (``None``: unknown)."""
        consumer = self._consumer
        if consumer is None:
            return None
        found = consumer.partitions_for_topic(topic)
        return set(found) if found else None

    # ----------------------------------------------------------------- status

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def finished_total(self) -> int:
        return self._finished_total

    @property
    def throttled(self) -> bool:
        return self._throttled

    async def wait_assigned(self, timeout: float) -> None:
        """Wait until the first assignment (tests, start-up banner)."""
        await asyncio.wait_for(self._assigned_once.wait(), timeout)

    def partition_status(self) -> tuple[PartitionStatus, ...]:
        consumer = self._consumer
        pauses = self._pauses
        out = []
        for tp, part in sorted(self._parts.items()):
            high = None
            if consumer is not None:
                with contextlib.suppress(Exception):
                    high = consumer.highwater(tp)
            if part.listed_end is not None and (high is None or part.listed_end > high):
                high = part.listed_end
            lag = None
            if high is not None:
                base = part.committed if part.committed is not None else 0
                lag = max(0, high - base)
            out.append(
                PartitionStatus(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed=part.committed,
                    position=part.position,
                    high_watermark=high,
                    lag=lag,
                    paused=pauses.held(tp),
                    paused_reasons=pauses.reasons(tp),
                    in_flight=part.tracker.in_flight,
                )
            )
        return tuple(out)

    def _update_gauges(self) -> None:
        m = self.metrics
        counts = dict.fromkeys(PAUSE_REASONS, 0)
        for st in self.partition_status():
            labels = (st.topic, str(st.partition))
            if st.lag is not None:
                m.lag.labels(*labels).set(st.lag)
            if st.committed is not None:
                m.committed.labels(*labels).set(st.committed)
            if st.position is not None:
                m.position.labels(*labels).set(st.position)
            for reason in st.paused_reasons:
                counts[reason] += 1
        for reason, n in counts.items():
            m.paused.labels(reason).set(n)
        m.in_flight.set(self._in_flight)
