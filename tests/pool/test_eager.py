"""The eager first step: ``dispatch_nowait`` to an idle executor runs the
handler's first step inline; what suspends or raises there goes on in the
executor's task as if it had started it (both pools, see conftest ``pool_kind``)."""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections import defaultdict

from pool import (
    ActorPool,
    ActorPoolOptions,
    BasePool,
    DeadLetter,
    DeadLetterReason,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    RetryPolicy,
)
from tests.helpers import assert_eventually
from tests.pool.conftest import FAST_RETRY, PoolFactory, msg

Outcomes = list[tuple[int, DeadLetter | None]]


async def started_idle(pool: BasePool) -> None:
    """Start ``pool`` and wait until every executor waits for work."""
    pool.start()
    await assert_eventually(lambda: all(ex.wakeup is not None for ex in pool._executors))


def recorder(pool: BasePool) -> Outcomes:
    outcomes: Outcomes = []
    pool.add_finish_listener(lambda m, outcome: outcomes.append((m.offset, outcome)))
    return outcomes


async def test_a_handler_that_completes_in_its_first_step_finishes_inside_dispatch(
    pool_factory: PoolFactory,
) -> None:
    tasks: list[asyncio.Task[object] | None] = []

    async def handler(m: Message) -> None:
        tasks.append(asyncio.current_task())

    pool = pool_factory(handler, size=2)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    # Finished before dispatch_nowait returned: listeners called, nothing in flight.
    assert outcomes == [(0, None)]
    assert pool.in_flight == 0
    assert pool.depths() == [0, 0]
    # It ran as the executor's task, not as the caller's.
    ex = pool._executors[pool.executor_for("a")]
    assert tasks == [ex.task]
    assert tasks[0] is not asyncio.current_task()
    assert ex.ok == 1
    assert pool.sent_counts()[ex.index] == 1
    # The executor is idle again: the next event of the same executor also runs at once.
    pool.dispatch_nowait(msg("a", 1))
    assert outcomes == [(0, None), (1, None)]
    await pool.close()


async def test_a_handler_that_suspends_in_its_first_step_goes_on_in_its_executor(
    pool_factory: PoolFactory,
) -> None:
    gate = asyncio.Event()
    steps: list[tuple[int, str, asyncio.Task[object] | None]] = []

    async def handler(m: Message) -> None:
        steps.append((m.offset, "first", asyncio.current_task()))
        await gate.wait()
        steps.append((m.offset, "second", asyncio.current_task()))

    pool = pool_factory(handler, size=1)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    pool.dispatch_nowait(msg("a", 1))  # queued behind the running one
    pool.dispatch_nowait(msg("b", 2))  # another aggregate, the same executor: queued too
    assert [s[:2] for s in steps] == [(0, "first")]
    assert outcomes == []
    # The eagerly started event counts as running, in flight, for its aggregate.
    assert pool.depths() == [3]
    assert pool.in_flight == 3
    assert pool.in_flight_by_aggregate() == {"a": 2, "b": 1}
    await asyncio.sleep(0.01)
    assert [s[:2] for s in steps] == [(0, "first")], "one event of an executor at a time"
    gate.set()
    await assert_eventually(lambda: len(outcomes) == 3)
    assert outcomes == [(0, None), (1, None), (2, None)]
    task = pool._executors[0].task
    assert [s[2] for s in steps] == [task] * len(steps)
    assert [s[:2] for s in steps] == [
        (0, "first"),
        (0, "second"),
        (1, "first"),
        (1, "second"),
        (2, "first"),
        (2, "second"),
    ]
    await pool.close()


async def test_a_handler_that_raises_in_its_first_step_is_retried_then_dead_lettered(
    pool_factory: PoolFactory,
) -> None:
    calls: list[int] = []

    async def handler(m: Message) -> None:
        calls.append(m.offset)
        if m.offset == 0:
            raise ValueError("poison")

    pool = pool_factory(handler, size=1)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))  # raises in its first step: nothing escapes
    pool.dispatch_nowait(msg("a", 1))
    await assert_eventually(lambda: len(outcomes) == 2)
    (first, dead), (second, ok) = outcomes
    assert (first, second, ok) == (0, 1, None)
    assert isinstance(dead, DeadLetter)
    assert dead.reason is DeadLetterReason.RETRIES_EXHAUSTED
    assert dead.error_type == "ValueError"
    assert dead.attempts == 3
    assert calls == [0, 0, 0, 1]  # the retries went before the aggregate's next event
    await pool.close()


async def test_base_exceptions_in_a_first_step_do_not_escape_dispatch(
    pool_factory: PoolFactory,
) -> None:
    errors: list[BaseException] = [
        SystemExit("exit"),
        KeyboardInterrupt(),
        asyncio.CancelledError(),
        GeneratorExit(),
    ]

    async def handler(m: Message) -> None:
        raise errors[m.offset]

    pool = pool_factory(handler, size=1)
    outcomes = recorder(pool)
    await started_idle(pool)
    for i in range(len(errors)):
        await assert_eventually(lambda: pool._executors[0].wakeup is not None)
        pool.dispatch_nowait(msg("a", i))
    await assert_eventually(lambda: len(outcomes) == len(errors))
    assert [o[0] for o in outcomes] == list(range(len(errors)))
    types = [o[1].error_type if o[1] is not None else None for o in outcomes]
    assert types == ["SystemExit", "KeyboardInterrupt", "CancelledError", "GeneratorExit"]
    await pool.close()


async def test_a_contextvar_bound_in_the_first_step_is_seen_after_an_await(
    pool_factory: PoolFactory,
) -> None:
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)
    seen: list[tuple[int, int, int]] = []

    async def handler(m: Message) -> None:
        before = var.get()
        var.set(m.offset)
        await asyncio.sleep(0)
        seen.append((m.offset, before, var.get()))

    pool = pool_factory(handler, size=1)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))  # eager first step
    pool.dispatch_nowait(msg("a", 1))  # queued: the executor's task runs it
    await assert_eventually(lambda: len(outcomes) == 2)
    await assert_eventually(lambda: pool._executors[0].wakeup is not None)
    pool.dispatch_nowait(msg("a", 2))  # eager again
    await assert_eventually(lambda: len(outcomes) == 3)
    # One context per executor, whichever way a step ran; the caller's is untouched.
    assert seen == [(0, -1, 0), (1, 0, 1), (2, 1, 2)]
    assert var.get() == -1
    await pool.close()


async def test_asyncio_timeout_in_a_first_step_cancels_the_handler_not_the_caller(
    pool_factory: PoolFactory,
) -> None:
    async def handler(m: Message) -> None:
        async with asyncio.timeout(0.02):
            await asyncio.Event().wait()

    pool = pool_factory(handler, size=1, retry=RetryPolicy(max_attempts=1))
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    await assert_eventually(lambda: len(outcomes) == 1)
    dead = outcomes[0][1]
    assert dead is not None
    assert dead.error_type == "TimeoutError"
    await asyncio.sleep(0.05)  # the dispatching task was not cancelled
    await pool.close()


async def test_the_handler_timeout_applies_to_an_eagerly_started_call(
    pool_factory: PoolFactory,
) -> None:
    async def handler(m: Message) -> None:
        if m.offset == 0:
            await asyncio.Event().wait()  # hangs

    pool = pool_factory(handler, size=1, handler_timeout=0.02)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    pool.dispatch_nowait(msg("a", 1))
    await assert_eventually(lambda: len(outcomes) == 2)
    (hung, dead), (after, ok) = outcomes
    assert (hung, after, ok) == (0, 1, None)
    assert dead is not None
    assert dead.reason is DeadLetterReason.HANDLER_TIMEOUT
    assert dead.attempts == 3
    await pool.close()


async def test_a_blocking_first_step_past_its_deadline_is_timed_out(
    pool_factory: PoolFactory,
) -> None:
    """The watchdog fires before the executor's task took the attempt over: the
    cancellation reaches the handler where it waits, as it would in the task."""
    cancelled: list[int] = []

    async def handler(m: Message) -> None:
        if m.offset == 0:
            time.sleep(0.05)  # noqa: ASYNC251 - a step that blocks past its deadline
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(m.offset)
                raise

    pool = pool_factory(handler, size=1, handler_timeout=0.02, retry=RetryPolicy(max_attempts=1))
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    await assert_eventually(lambda: len(outcomes) == 1)
    dead = outcomes[0][1]
    assert dead is not None
    assert dead.reason is DeadLetterReason.HANDLER_TIMEOUT
    assert cancelled == [0]
    pool.dispatch_nowait(msg("a", 1))
    await assert_eventually(lambda: len(outcomes) == 2)
    assert outcomes[1] == (1, None)
    await pool.close()


async def test_close_with_an_eagerly_started_call_hanging(pool_factory: PoolFactory) -> None:
    started = asyncio.Event()
    cancelled: list[int] = []

    async def handler(m: Message) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(m.offset)
            raise

    pool = pool_factory(handler, size=1)
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    assert started.is_set()
    await asyncio.wait_for(pool.close(timeout=0.05), 5)
    assert cancelled == [0]
    assert outcomes == []


async def test_an_eager_crash_restarts_the_actor() -> None:
    built: list[int] = []

    def factory(index: int):  # type: ignore[no-untyped-def]
        built.append(index)
        generation = len(built)

        async def handle(m: Message) -> None:
            if generation == 1:
                raise RuntimeError("first actor state is broken")

        return handle

    pool = ActorPool(actor_factory=factory, options=ActorPoolOptions(size=1, retry=FAST_RETRY))
    outcomes = recorder(pool)
    await started_idle(pool)
    pool.dispatch_nowait(msg("a", 0))
    await assert_eventually(lambda: len(outcomes) == 1)
    assert outcomes == [(0, None)]  # the retry ran on the rebuilt actor
    assert pool.restarts == 1
    assert built == [0, 0]
    await pool.close()


async def test_order_and_one_at_a_time_under_a_mix_of_first_steps(
    pool_factory: PoolFactory, pool_kind: str
) -> None:
    """Handlers that complete at once, yield, sleep or fail (and are retried),
    dispatched in bursts with gaps: some run eagerly, some queue; per aggregate
    the events run one at a time, in order, each finished once."""
    rng = random.Random(7)
    seen: dict[str, list[int]] = defaultdict(list)
    active: set[str] = set()
    overlaps: list[str] = []
    failed: set[int] = set()

    async def handler(m: Message) -> None:
        if m.aggregate_id in active:
            overlaps.append(m.aggregate_id)
        active.add(m.aggregate_id)
        try:
            kind = m.offset % 4
            if kind == 1:
                await asyncio.sleep(0)
            elif kind == 2:
                await asyncio.sleep(0.001 * (m.offset % 3))
            elif kind == 3 and m.offset not in failed:
                failed.add(m.offset)
                raise ValueError("once")
            seen[m.aggregate_id].append(m.offset)
        finally:
            active.discard(m.aggregate_id)

    # Failures come in streaks on an executor: the actor's restart budget must
    # not escalate them here (that is the supervisor's test).
    budget = {"max_restarts": 100_000} if pool_kind == "actor" else {}
    pool = pool_factory(handler, size=4, **budget)
    outcomes = recorder(pool)
    await started_idle(pool)
    n = 2000
    offset = 0
    while offset < n:
        for _ in range(rng.randint(1, 40)):
            if offset == n:
                break
            pool.dispatch_nowait(msg(f"agg{rng.randrange(25)}", offset))
            offset += 1
        await asyncio.sleep(0 if rng.random() < 0.7 else 0.002)
    await assert_eventually(lambda: len(outcomes) == n, timeout=30)
    assert overlaps == []
    assert all(v == sorted(v) for v in seen.values())
    assert sorted(o for o, _ in outcomes) == list(range(n))
    assert all(outcome is None for _, outcome in outcomes)
    assert pool.in_flight == 0
    await pool.close()


async def test_switch_counts_an_event_that_finishes_inside_dispatch() -> None:
    """With the rollout splitting aggregates both pools are counted: an event
    finished by its eager first step is counted and uncounted, and a mode
    change right after finds nothing in flight to hand over."""
    done: list[int] = []

    async def handler(m: Message) -> None:
        pass

    keyed = KeyedWorkerPool(handler, PoolOptions(size=2, retry=FAST_RETRY))
    actor = ActorPool(handler, ActorPoolOptions(size=2, retry=FAST_RETRY))
    switch = PoolSwitch(keyed, actor, mode=PoolMode.ACTOR, rollout_percent=50)
    switch.add_finish_listener(lambda m, outcome: done.append(m.offset))
    switch.start()
    await started_idle(keyed)
    await started_idle(actor)
    for i in range(50):
        switch.dispatch_nowait(msg(f"a{i % 10}", i))
        await asyncio.sleep(0)
    await assert_eventually(lambda: len(done) == 50)
    assert switch._keyed_counts == {}
    assert switch._actor_counts == {}
    result = await switch.set_mode(PoolMode.KEYED, wait_timeout=1)
    assert result.waited_aggregates == 0
    await switch.close()


async def test_switch_hands_over_after_an_eagerly_started_event() -> None:
    """An event running in the actor pool after an eager first step counts as in
    flight: a switch to KEYED holds its aggregate's next event until it finishes."""
    gate = asyncio.Event()
    log: list[tuple[str, int]] = []

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def handle(m: Message) -> None:
            log.append((name, m.offset))
            if m.offset == 0:
                await gate.wait()
            log.append((name + " done", m.offset))

        return handle

    keyed = KeyedWorkerPool(handler("keyed"), PoolOptions(size=2, retry=FAST_RETRY))
    actor = ActorPool(handler("actor"), ActorPoolOptions(size=2, retry=FAST_RETRY))
    switch = PoolSwitch(keyed, actor, mode=PoolMode.ACTOR)
    switch.start()
    await started_idle(actor)
    switch.dispatch_nowait(msg("a", 0))
    assert log == [("actor", 0)]
    change = asyncio.create_task(switch.set_mode(PoolMode.KEYED, wait_timeout=5))
    await assert_eventually(lambda: switch.mode is PoolMode.KEYED)
    switch.dispatch_nowait(msg("a", 1))
    assert switch.held == 1
    await asyncio.sleep(0.01)
    assert log == [("actor", 0)]
    gate.set()
    result = await asyncio.wait_for(change, 5)
    await switch.drain(5)
    assert result.waited_aggregates == 1
    assert log == [("actor", 0), ("actor done", 0), ("keyed", 1), ("keyed done", 1)]
    await switch.close()


async def test_the_switch_listens_to_a_pool_only_while_it_counts_it() -> None:
    """While a pool is the rule's only target its events are not counted and the
    switch's finish listener is not called for them; once a change counts that
    pool the listener is back, ahead of the listeners added after the switch."""
    gate = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(m: Message) -> None:
        if m.offset == 0:
            await gate.wait()

    keyed = KeyedWorkerPool(handler, PoolOptions(size=2, retry=FAST_RETRY))
    actor = ActorPool(handler, ActorPoolOptions(size=2, retry=FAST_RETRY))
    switch = PoolSwitch(keyed, actor, mode=PoolMode.KEYED)

    def user(m: Message, outcome: DeadLetter | None) -> None:
        # The switch's bookkeeping ran first: the finished event is no longer counted.
        seen.append((m.offset, switch._keyed_counts.get(m.aggregate_id, 0)))

    switch.add_finish_listener(user)
    assert keyed._listeners == [user]  # KEYED: the keyed pool is the only target
    assert len(actor._listeners) == 2  # the actor pool is counted
    switch.start()
    await started_idle(keyed)
    switch.dispatch_nowait(msg("a", 0))  # hangs in the keyed pool
    change = asyncio.create_task(switch.set_mode(PoolMode.ACTOR, wait_timeout=5))
    await assert_eventually(lambda: switch.mode is PoolMode.ACTOR)
    assert keyed._listeners[1:] == [user]
    assert len(keyed._listeners) == 2
    assert switch._keyed_counts == {"a": 1}
    switch.dispatch_nowait(msg("a", 1))  # held behind offset 0
    gate.set()
    result = await asyncio.wait_for(change, 5)
    await switch.drain(5)
    assert result.waited_aggregates == 1
    assert seen == [(0, 0), (1, 0)]
    assert actor._listeners == [user]  # ACTOR at 100 %: the actor pool is the only target
    await switch.close()


async def test_closing_a_handed_over_attempt_closes_the_handler() -> None:
    """An executor task collected while it waits in an eagerly started handler
    (interpreter shutdown) closes the handler: its ``finally`` runs."""
    from pool._executor import _go_on

    closed: list[bool] = []
    waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        try:
            await waited
        finally:
            closed.append(True)

    coro = handler()
    first = coro.send(None)  # the eager first step
    assert first is waited
    rest = _go_on(coro, first, None)
    assert rest.send(None) is waited  # handed to the task
    rest.close()
    assert closed == [True]
    waited.cancel()
