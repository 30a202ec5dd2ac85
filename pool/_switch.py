"""The live mode switch: both pools, one routing rule, atomic changes.

The rule: in ``KEYED`` mode every aggregate goes to the keyed pool; in
``ACTOR`` mode an aggregate goes to the actor pool when its rollout bucket
(FNV-1a of ``"rollout:" + aggregate_id``, modulo 10 000) is below the rollout
share in basis points, else to the keyed pool. Buckets are fixed per
aggregate, so raising the share only ever moves aggregates keyed → actor, and
an aggregate never flips back and forth as the share grows.

Order across changes: the switch tracks, per aggregate, which pool holds its
unfinished events and how many. An event whose target pool differs from the
pool still holding that aggregate's earlier events is *held* (in order) until
those finish; then the held events go to the target pool. Aggregates with
nothing in flight switch at once. Changing the rule is a synchronous
assignment on the event loop, so it is atomic: every event submitted after
``set_mode``/``set_rollout`` returns is routed by the new rule.

Counting is lazy. While the rule sends every aggregate to one pool, that
pool's events need no count (nothing can be held behind them, and only a
change asks which aggregates they belong to): dispatching to it and
finishing there cost no bookkeeping. A change that makes it a pool some
aggregates leave counts its unfinished events once, from the pool itself
(``Pool.in_flight_by_aggregate``), synchronously with the change; from then
on its events are counted until it is the only target again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Self

import structlog

from pool._deadletter import DeadLetter
from pool._errors import DrainTimeoutError, PoolClosedError, QueueFullError
from pool._message import Message
from pool._protocol import Completion, FinishListener, Pool, PoolMode
from pool._routing import fnv1a_32

log = structlog.get_logger("pool")

ROLLOUT_BUCKETS = 10_000
# Module constants: reading an enum member through its class costs a lookup per event.
_KEYED: Final = PoolMode.KEYED
_ACTOR: Final = PoolMode.ACTOR


def rollout_bucket(aggregate_id: str) -> int:
    """The aggregate's fixed rollout bucket in ``[0, 10000)``."""
    return fnv1a_32(b"rollout:" + aggregate_id.encode("utf-8")) % ROLLOUT_BUCKETS


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """What a mode or rollout change did."""

    previous_mode: PoolMode
    mode: PoolMode
    previous_rollout: float
    rollout: float
    generation: int
    #: From the call until every aggregate that had to wait was handed over
    #: (or ``wait_timeout`` ran out).
    took_s: float
    #: Aggregates that had unfinished events in a pool other than their new target.
    waited_aggregates: int
    #: Of those, how many still had events in the old pool when the call returned.
    pending_aggregates: int
    changed: bool


class _Held:
    """Events of one aggregate waiting for its earlier events in the other pool."""

    __slots__ = ("events", "flushing", "pool")

    def __init__(self) -> None:
        self.events: deque[tuple[Message, Completion | None]] = deque()
        # Set while _flush_slowly moves the events into ``pool``.
        self.flushing = False
        self.pool = _KEYED


class _Lane:
    """One pool as the switch routes to it."""

    __slots__ = ("_counted", "counts", "dispatch", "enqueue", "listener", "mode", "other", "pool")

    def __init__(self, pool: Pool, counts: dict[str, int], other: dict[str, int]) -> None:
        self.pool = pool
        self.mode = pool.mode
        self.enqueue = pool.enqueue_nowait
        self.dispatch = pool.dispatch_nowait
        #: Unfinished events per aggregate in this pool, while ``counted``;
        #: empty otherwise (the pool is then the only target: see the module doc).
        self.counts = counts
        self._counted = False
        #: The other pool's counts.
        self.other = other
        #: The switch's finish listener for this pool: registered with the pool
        #: only while it is counted (uncounted, it would return at once, for a
        #: Python call per event).
        self.listener: FinishListener | None = None

    @property
    def counted(self) -> bool:
        """Whether this pool's events are counted (the hot paths read ``_counted``)."""
        return self._counted

    @counted.setter
    def counted(self, value: bool) -> None:
        if value == self._counted:
            return
        self._counted = value
        listener = self.listener
        if listener is not None:
            if value:
                self.pool.add_finish_listener(listener, first=True)
            else:
                self.pool.remove_finish_listener(listener)

    def attach(self, listener: FinishListener) -> None:
        """Set the switch's finish listener (registered while counted)."""
        self.listener = listener
        if self._counted:
            self.pool.add_finish_listener(listener, first=True)

    def count(self, key: str) -> None:
        """One more unfinished event of ``key`` in this pool."""
        if self._counted:
            self.counts[key] = self.counts.get(key, 0) + 1

    def uncount(self, key: str) -> None:
        """Take back :meth:`count` of an event the pool refused."""
        counts = self.counts
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)


class PoolSwitch:
    """Routes events to the keyed or the actor pool; see the module docstring.

    It uses the two pools only through the :class:`~pool.Pool` protocol: the
    hot path calls each pool's ``enqueue_nowait``, held as a bound method.
    """

    def __init__(
        self,
        keyed: Pool,
        actor: Pool,
        *,
        mode: PoolMode = PoolMode.KEYED,
        rollout_percent: float = 100.0,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keyed.mode is not PoolMode.KEYED or actor.mode is not PoolMode.ACTOR:
            raise TypeError("PoolSwitch(keyed=<keyed pool>, actor=<actor pool>)")
        self.pools: dict[PoolMode, Pool] = {
            PoolMode.KEYED: keyed,
            PoolMode.ACTOR: actor,
        }
        self._mode = PoolMode(mode)
        self._rollout_bp = _to_basis_points(rollout_percent)
        self._wall_clock = wall_clock
        self._clock = clock
        self.generation = 0
        self.since = wall_clock()
        # Per pool, the aggregates with unfinished events there and how many.
        # An aggregate is in at most one of the two at a time (else it is held).
        # Plain dicts of ints: the hot path allocates nothing per aggregate.
        # Counted lazily: the only target of the rule is not counted (see the
        # module docstring).
        self._keyed_counts: dict[str, int] = {}
        self._actor_counts: dict[str, int] = {}
        self._lanes: dict[PoolMode, _Lane] = {
            PoolMode.KEYED: _Lane(keyed, self._keyed_counts, self._actor_counts),
            PoolMode.ACTOR: _Lane(actor, self._actor_counts, self._keyed_counts),
        }
        # Aggregates whose events wait for a handover (rare).
        self._holding: dict[str, _Held] = {}
        # The lane every aggregate goes to under the current rule, or None when
        # the rollout splits them (then each aggregate's bucket decides).
        self._uniform: _Lane | None = None
        self._update_uniform()
        self._recount()
        self._buckets: dict[str, int] = {}
        self._held = 0
        self._lock = asyncio.Lock()
        self._handover: set[str] | None = None
        self._handover_done: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._change_listeners: list[Callable[[SwitchResult], None]] = []
        self._closing = False
        for lane in self._lanes.values():
            lane.attach(self._finish_listener(lane))

    # ----------------------------------------------------------- state
    @property
    def mode(self) -> PoolMode:
        return self._mode

    @property
    def rollout_percent(self) -> float:
        return self._rollout_bp / 100

    @property
    def in_flight(self) -> int:
        """Events submitted and not finished, including those held for a handover."""
        return sum(p.in_flight for p in self.pools.values()) + self._held

    @property
    def held(self) -> int:
        """Events waiting for their aggregate's earlier events in the other pool."""
        return self._held

    def route(self, aggregate_id: str) -> PoolMode:
        """The pool the current rule sends ``aggregate_id`` to."""
        return self._target(aggregate_id, self._mode, self._rollout_bp)

    def _target(self, aggregate_id: str, mode: PoolMode, rollout_bp: int) -> PoolMode:
        if mode is _KEYED or rollout_bp <= 0:
            return _KEYED
        if rollout_bp >= ROLLOUT_BUCKETS:
            return _ACTOR
        bucket = self._buckets.get(aggregate_id)
        if bucket is None:
            if len(self._buckets) >= 65536:
                self._buckets.clear()
            bucket = self._buckets[aggregate_id] = rollout_bucket(aggregate_id)
        return _ACTOR if bucket < rollout_bp else _KEYED

    def _update_uniform(self) -> None:
        mode, bp = self._mode, self._rollout_bp
        if mode is _KEYED or bp <= 0:
            self._uniform = self._lanes[_KEYED]
        elif bp >= ROLLOUT_BUCKETS:
            self._uniform = self._lanes[_ACTOR]
        else:
            self._uniform = None

    def _recount(self) -> None:
        """Count the pools that are no longer the rule's only target; stop
        counting the one that now is (see the module docstring). Synchronous,
        right after a change of the rule."""
        target = self._uniform
        for lane in self._lanes.values():
            if lane is not target and not lane.counted:
                lane.counts.update(lane.pool.in_flight_by_aggregate())
                lane.counted = True
        if target is not None and target.counted:
            # Aggregates held behind their earlier events in the target pool can
            # follow them there at once: same pool, same executor, in order.
            waiting_here = [
                (key, held)
                for key, held in self._holding.items()
                if not held.flushing and key in target.counts
            ]
            for key, held in waiting_here:
                self._flush(key, held)
            target.counts.clear()
            target.counted = False

    def where(self, aggregate_id: str) -> tuple[PoolMode, int]:
        """(pool, executor index) that handles ``aggregate_id``'s next event."""
        if aggregate_id in self._holding:
            mode = self.route(aggregate_id)
        elif aggregate_id in self._keyed_counts:
            mode = _KEYED
        elif aggregate_id in self._actor_counts:
            mode = _ACTOR
        else:
            mode = self.route(aggregate_id)
        return mode, self.pools[mode].executor_for(aggregate_id)

    # ----------------------------------------------------------- intake
    def submit_nowait(self, message: Message) -> Completion:
        """Route ``message``; return its completion without waiting.

        Raises :class:`QueueFullError` when the target executor is full
        (nothing is enqueued or held: the caller keeps the message) and
        :class:`PoolClosedError` after ``close()``.
        """
        future = self._route_one(message, True)
        assert future is not None
        return future

    async def submit(self, message: Message) -> Completion:
        """Route ``message``, waiting only while the target executor is full."""
        while True:
            try:
                return self.submit_nowait(message)
            except QueueFullError as full:
                await self._wait_for_space(message, full)

    def dispatch_nowait(self, message: Message) -> None:
        """:meth:`submit_nowait` without a completion future: the outcome goes
        to the finish listeners only (the Kafka consumer's hot path: the pool's
        own ``dispatch_nowait``, a few dict lookups, no allocation)."""
        if self._closing:
            raise PoolClosedError("pool switch is closed; submit refused")
        key = message.aggregate_id
        lane = self._uniform
        if lane is None:
            lane = self._lanes[self._target(key, self._mode, self._rollout_bp)]
        if key not in lane.other and not (self._holding and key in self._holding):
            if not lane._counted:
                lane.dispatch(message)
                return
            # Counted before the pool sees it: the event may finish inside
            # ``dispatch`` (a handler's first step runs eagerly on an idle executor).
            counts = lane.counts
            counts[key] = counts.get(key, 0) + 1
            try:
                lane.dispatch(message)
            except BaseException:
                lane.uncount(key)
                raise
            return
        self._route_one(message, False)  # held behind its earlier events

    async def dispatch(self, message: Message) -> None:
        """:meth:`submit` without a completion future."""
        while True:
            try:
                self._route_one(message, False)
            except QueueFullError as full:
                await self._wait_for_space(message, full)
            else:
                return

    def add_finish_listener(self, listener: FinishListener) -> None:
        """Call ``listener(message, dead_letter_or_none)`` as each event finishes,
        in either pool (after the switch's own bookkeeping)."""
        for pool in self.pools.values():
            pool.add_finish_listener(listener)

    def add_change_listener(self, listener: Callable[[SwitchResult], None]) -> None:
        """Call ``listener(result)`` after every ``set_mode``/``set_rollout`` that
        changed the rule (metrics, audit). It must not raise or block."""
        self._change_listeners.append(listener)

    async def _wait_for_space(self, message: Message, full: QueueFullError) -> None:
        pool = self.pools[self.where(message.aggregate_id)[0]]
        await pool.wait_for_space(full.index)

    def _route_one(self, message: Message, with_future: bool) -> Completion | None:
        # The hot path (once per event): a few dict lookups, no allocation.
        if self._closing:
            raise PoolClosedError("pool switch is closed; submit refused")
        key = message.aggregate_id
        lane = self._uniform
        if lane is None:
            lane = self._lanes[self._target(key, self._mode, self._rollout_bp)]
        holding = self._holding
        if key not in lane.other and not (holding and key in holding):
            future = lane.enqueue(message, with_future)
            lane.count(key)
            return future
        # Earlier events of this aggregate are unfinished in the other pool
        # (or already held): wait behind them.
        outer: Completion | None = (
            asyncio.get_running_loop().create_future() if with_future else None
        )
        held = holding.get(key)
        if held is None:
            held = holding[key] = _Held()
        held.events.append((message, outer))
        self._held += 1
        return outer

    def _finish_listener(self, lane: _Lane) -> FinishListener:
        """The switch's finish listener for the pool of ``lane``."""
        holding = self._holding
        counts = lane.counts

        def finished(message: Message, outcome: DeadLetter | None) -> None:
            if not lane._counted:
                return  # (not registered then: see _Lane.listener)
            key = message.aggregate_id
            left = counts[key] - 1
            if left:
                counts[key] = left
                return
            del counts[key]
            if holding:
                held = holding.get(key)
                if held is not None:
                    if not held.flushing:
                        self._handed_over(key)
                        self._flush(key, held)
                    return
            if self._handover is not None:
                self._handed_over(key)

        return finished

    def _flush(self, key: str, held: _Held) -> None:
        """Move the held events of an aggregate whose old pool is now empty."""
        events = held.events
        held.pool = target = self.route(key)
        lane = self._lanes[target]
        while events:
            message, outer = events[0]
            try:
                inner = lane.enqueue(message, outer is not None)
            except QueueFullError:
                held.flushing = True
                self._spawn(self._flush_slowly(key, held))
                return
            except PoolClosedError:
                if outer is not None:
                    outer.cancel()
                events.popleft()
                self._held -= 1
                continue
            events.popleft()
            self._held -= 1
            lane.count(key)
            _chain(inner, outer)
        del self._holding[key]

    async def _flush_slowly(self, key: str, held: _Held) -> None:
        events = held.events
        lane = self._lanes[held.pool]
        pool, counts = lane.pool, lane.counts
        try:
            while events:
                message, outer = events[0]
                try:
                    if outer is None:
                        await pool.dispatch(message)
                        inner = None
                    else:
                        inner = await pool.submit(message)
                except PoolClosedError:
                    if outer is not None:
                        outer.cancel()
                else:
                    lane.count(key)  # counted or not as the pool is now
                    _chain(inner, outer)
                events.popleft()
                self._held -= 1
        finally:
            held.flushing = False
            if self._holding.get(key) is held:
                del self._holding[key]
            if key not in counts:  # its moved events are already finished
                self._handed_over(key)

    def _handed_over(self, key: str) -> None:
        pending = self._handover
        if pending is not None and key in pending:
            pending.discard(key)
            if not pending and self._handover_done is not None:
                self._handover_done.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------- changes
    async def set_mode(self, mode: PoolMode, *, wait_timeout: float | None = 5.0) -> SwitchResult:
        """Switch the mode; see :meth:`_change`."""
        return await self._change(PoolMode(mode), None, wait_timeout)

    async def set_rollout(
        self, percent: float, *, wait_timeout: float | None = 5.0
    ) -> SwitchResult:
        """Set the share (0-100 %) of aggregates the actor pool takes in ACTOR mode."""
        return await self._change(None, _to_basis_points(percent), wait_timeout)

    async def change(
        self,
        mode: PoolMode | None = None,
        rollout_percent: float | None = None,
        *,
        wait_timeout: float | None = 5.0,
    ) -> list[SwitchResult]:
        """Change the mode and the rollout together, as :meth:`set_mode` and
        :meth:`set_rollout` one after the other, in the order that puts no rule
        between the old and the new one in force (see :func:`_steps`). One
        result per step, in order."""
        return [await self._change(m, b, wait_timeout) for m, b in _steps(mode, rollout_percent)]

    def change_nowait(
        self, mode: PoolMode | None = None, rollout_percent: float | None = None
    ) -> list[SwitchResult] | None:
        """:meth:`change` with ``wait_timeout=0``, without awaiting anything:
        the new rule is in force when it returns (the aggregates that must wait
        for their earlier events are held, as after any change). One result
        per step, in order. ``None`` (nothing done) while an awaited change
        holds the switch: use the coroutines then.

        Synchronous: callable from a plain callback of the switch's event loop
        (never from another thread).
        """
        if self._lock.locked():
            return None
        return [self._change_now(m, b) for m, b in _steps(mode, rollout_percent)]

    def _change_now(self, mode: PoolMode | None, rollout_bp: int | None) -> SwitchResult:
        started = self._clock()
        prev_mode, prev_bp = self._mode, self._rollout_bp
        waiting = self._install(mode, rollout_bp)
        return self._changed(prev_mode, prev_bp, started, len(waiting), waiting)

    def _install(self, mode: PoolMode | None, rollout_bp: int | None) -> set[str]:
        """Put the new rule in force (synchronously); the aggregates whose
        earlier events are in a pool other than their new target."""
        prev_mode, prev_bp = self._mode, self._rollout_bp
        new_mode = prev_mode if mode is None else mode
        new_bp = prev_bp if rollout_bp is None else rollout_bp
        if (new_mode, new_bp) == (prev_mode, prev_bp):
            return set()
        self._mode, self._rollout_bp = new_mode, new_bp
        self.generation += 1
        self.since = self._wall_clock()
        self._update_uniform()
        self._recount()
        target = self._target
        waiting = {key for key, held in self._holding.items() if held.events}
        waiting.update(
            key for key in self._keyed_counts if target(key, new_mode, new_bp) is not _KEYED
        )
        waiting.update(
            key for key in self._actor_counts if target(key, new_mode, new_bp) is not _ACTOR
        )
        return waiting

    def _changed(
        self,
        prev_mode: PoolMode,
        prev_bp: int,
        started: float,
        waited: int,
        waiting: set[str],
    ) -> SwitchResult:
        """The result of a change (logged and told to the listeners if the rule changed)."""
        changed = (self._mode, self._rollout_bp) != (prev_mode, prev_bp)
        result = SwitchResult(
            previous_mode=prev_mode,
            mode=self._mode,
            previous_rollout=prev_bp / 100,
            rollout=self._rollout_bp / 100,
            generation=self.generation,
            took_s=self._clock() - started,
            waited_aggregates=waited,
            pending_aggregates=len(waiting),
            changed=changed,
        )
        if changed:
            log.info(
                "pool.switched",
                from_mode=prev_mode.value,
                to_mode=result.mode.value,
                from_rollout=result.previous_rollout,
                to_rollout=result.rollout,
                generation=result.generation,
                took_ms=round(result.took_s * 1000, 3),
                waited_aggregates=waited,
                pending_aggregates=result.pending_aggregates,
            )
            for listener in self._change_listeners:
                listener(result)
        return result

    async def _change(
        self, mode: PoolMode | None, rollout_bp: int | None, wait_timeout: float | None
    ) -> SwitchResult:
        """Install a new rule atomically, then wait (up to ``wait_timeout``) until
        the aggregates that had events in flight in their old pool are handed over.

        Concurrent changes are serialised. The new rule is in force when the
        first ``await`` of this method completes: events submitted afterwards
        are routed by it (held behind their aggregate's earlier events if needed).
        """
        async with self._lock:
            started = self._clock()
            prev_mode, prev_bp = self._mode, self._rollout_bp
            waiting = self._install(mode, rollout_bp)
            waited = len(waiting)
            if waiting and wait_timeout != 0:
                self._handover = waiting
                self._handover_done = asyncio.Event()
                try:
                    async with asyncio.timeout(wait_timeout):
                        await self._handover_done.wait()
                except TimeoutError:
                    pass
                finally:
                    self._handover = None
                    self._handover_done = None
            return self._changed(prev_mode, prev_bp, started, waited, waiting)

    # -------------------------------------------------------- lifecycle
    def start(self) -> None:
        for pool in self.pools.values():
            pool.start()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every event submitted so far (held ones included) is finished."""
        try:
            async with asyncio.timeout(timeout):
                while self._held or self._tasks:
                    # Held events move to a pool as their aggregate's old events finish.
                    await asyncio.gather(*(p.drain() for p in self.pools.values()))
                    if self._tasks:
                        await asyncio.gather(*self._tasks, return_exceptions=True)
                await asyncio.gather(*(p.drain() for p in self.pools.values()))
        except TimeoutError:
            raise DrainTimeoutError(self.in_flight, timeout or 0.0) from None

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new events, drain (bounded by ``timeout``), close both pools."""
        self._closing = True
        try:
            await self.drain(timeout)
        except DrainTimeoutError as exc:
            log.warning("pool.switch_close_timeout", in_flight=exc.remaining)
        await asyncio.gather(*(p.close(0) for p in self.pools.values()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for held in self._holding.values():
            for _, outer in held.events:
                if outer is not None:
                    outer.cancel()


def _steps(
    mode: PoolMode | None, rollout_percent: float | None
) -> list[tuple[PoolMode | None, int | None]]:
    """The steps of a change of both: rollout first when the mode is to be
    ACTOR, mode first otherwise, so that no rule between the old and the new
    one is in force."""
    bp = None if rollout_percent is None else _to_basis_points(rollout_percent)
    mode = None if mode is None else PoolMode(mode)
    rollout_step: list[tuple[PoolMode | None, int | None]] = [] if bp is None else [(None, bp)]
    mode_step: list[tuple[PoolMode | None, int | None]] = [] if mode is None else [(mode, None)]
    return rollout_step + mode_step if mode is _ACTOR else mode_step + rollout_step


def _to_basis_points(percent: float) -> int:
    if not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise ValueError(f"rollout percent must be within [0, 100], got {percent!r}")
    return round(percent * 100)


def _chain(inner: Completion | None, outer: Completion | None) -> None:
    if inner is None or outer is None:
        return

    def copy(done: Completion) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        else:
            outer.set_result(done.result())

    inner.add_done_callback(copy)
