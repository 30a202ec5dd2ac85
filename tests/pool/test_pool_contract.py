"""The pool contract, run against both pools (see conftest ``pool_kind``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import defaultdict

import pytest

from pool import (
    DeadLetter,
    DeadLetterReason,
    DrainTimeoutError,
    Message,
    NonRetryableError,
    PoolClosedError,
    QueueFullError,
    RetryPolicy,
)
from tests.pool.conftest import PoolFactory, msg


class OrderRecorder:
    """Records what a handler saw and fails the test on overlap or disorder."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.active: set[str] = set()
        self.overlaps: list[str] = []

    def enter(self, m: Message) -> None:
        if m.aggregate_id in self.active:
            self.overlaps.append(m.aggregate_id)
        self.active.add(m.aggregate_id)

    def leave(self, m: Message) -> None:
        self.active.discard(m.aggregate_id)

    def record(self, m: Message) -> None:
        self.seen[m.aggregate_id].append(m.offset)

    def assert_ordered(self) -> None:
        assert self.overlaps == [], f"two events of one aggregate at once: {self.overlaps[:5]}"
        for agg, offsets in self.seen.items():
            assert offsets == sorted(offsets), f"{agg} out of order: {offsets[:20]}"


async def test_per_aggregate_order_with_random_delays(pool_factory: PoolFactory) -> None:
    rng = random.Random(7)
    rec = OrderRecorder()

    async def handler(m: Message) -> None:
        rec.enter(m)
        for _ in range(m.offset % 3):
            await asyncio.sleep(0)
        if m.offset % 11 == 0:
            await asyncio.sleep(rng.random() / 2000)
        rec.record(m)
        rec.leave(m)

    async with pool_factory(handler, size=256) as pool:
        futures = []
        for offset in range(20_000):
            agg = f"agg-{rng.randrange(3000)}"
            futures.append(await pool.submit(msg(agg, offset)))
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
    assert all(r is None for r in results)
    rec.assert_ordered()
    assert sum(len(v) for v in rec.seen.values()) == 20_000


async def test_crash_storm_retries_then_dead_letters_and_keeps_order(
    pool_factory: PoolFactory, pool_kind: str
) -> None:
    rec = OrderRecorder()
    failures: dict[int, int] = defaultdict(int)

    async def handler(m: Message) -> None:
        rec.enter(m)
        try:
            await asyncio.sleep(0)
            if m.offset % 50 == 0:  # poison: always fails
                raise RuntimeError(f"poison {m.offset}")
            if m.offset % 7 == 0 and failures[m.offset] == 0:  # transient
                failures[m.offset] += 1
                raise ValueError(f"transient {m.offset}")
            rec.record(m)
        finally:
            rec.leave(m)

    # A generous restart budget: this test is about retries, not escalation.
    kw = {"max_restarts": 10_000} if pool_kind == "actor" else {}
    async with pool_factory(handler, size=16, **kw) as pool:
        futures = [await pool.submit(msg(f"agg-{offset % 40}", offset)) for offset in range(2000)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)

    dead = [r for r in results if r is not None]
    assert sorted(d.message.offset for d in dead) == list(range(0, 2000, 50))
    for d in dead:
        assert isinstance(d, DeadLetter)
        assert d.reason is DeadLetterReason.RETRIES_EXHAUSTED
        assert d.attempts == 3
        assert d.error_type == "RuntimeError"
        assert "poison" in d.error_message
        assert "Traceback" in d.traceback
        assert d.mode == pool.mode.value
        assert d.executor == pool.executor_for(d.message.aggregate_id)
    handled = sorted(o for v in rec.seen.values() for o in v)
    assert handled == [o for o in range(2000) if o % 50 != 0]  # each exactly once
    rec.assert_ordered()
    if pool.mode == "actor":
        # one restart per failed attempt: 40 poison x 3 + transient ones
        transient = sum(1 for o in range(2000) if o % 7 == 0 and o % 50 != 0)
        assert pool.restarts == 40 * 3 + transient  # type: ignore[attr-defined]


async def test_full_queue_waits_drops_nothing_and_others_keep_flowing(
    pool_factory: PoolFactory,
) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(m: Message) -> None:
        if m.aggregate_id == "slow":
            await release.wait()
        handled.append(f"{m.aggregate_id}:{m.offset}")

    async with pool_factory(handler, size=8, capacity=3) as pool:
        slow_index = pool.executor_for("slow")
        other = next(f"o{i}" for i in range(100) if pool.executor_for(f"o{i}") != slow_index)
        first = [pool.submit_nowait(msg("slow", i)) for i in range(3)]
        assert pool.depth(slow_index) == 3
        with pytest.raises(QueueFullError) as full:
            pool.submit_nowait(msg("slow", 3))
        assert full.value.index == slow_index
        assert full.value.retriable
        blocked = asyncio.create_task(pool.submit(msg("slow", 3)))
        await asyncio.sleep(0.01)
        assert not blocked.done(), "submit must wait while the queue is full"
        # Other executors keep working meanwhile.
        other_done = await pool.submit(msg(other, 100))
        assert await asyncio.wait_for(other_done, 5) is None
        release.set()
        last = await asyncio.wait_for(blocked, 5)
        assert await asyncio.wait_for(asyncio.gather(*first, last), 5) == [None] * 4
    assert [h for h in handled if h.startswith("slow")] == [f"slow:{i}" for i in range(4)]


async def test_enqueue_nowait_returns_a_completion_only_when_asked(
    pool_factory: PoolFactory,
) -> None:
    release = asyncio.Event()
    finished: list[tuple[int, DeadLetter | None]] = []

    async def handler(m: Message) -> None:
        await release.wait()

    pool = pool_factory(handler, size=1, capacity=2)
    pool.add_finish_listener(lambda m, outcome: finished.append((m.offset, outcome)))
    async with pool:
        completion = pool.enqueue_nowait(msg("a", 0), True)
        assert isinstance(completion, asyncio.Future)
        assert pool.enqueue_nowait(msg("a", 1), False) is None
        with pytest.raises(QueueFullError):
            pool.enqueue_nowait(msg("a", 2), False)
        assert pool.in_flight == 2  # the refused one was not enqueued
        release.set()
        assert await asyncio.wait_for(completion, 5) is None
        await pool.drain(5)
    assert finished == [(0, None), (1, None)]
    with pytest.raises(PoolClosedError):
        pool.enqueue_nowait(msg("a", 3), True)
    pool.start()  # idempotent: a no-op once started, also after close
    never_started = pool_factory(handler, size=1)
    await never_started.close()
    with pytest.raises(PoolClosedError):
        never_started.start()


async def test_depth_is_exact_per_executor_and_in_total(pool_factory: PoolFactory) -> None:
    release = asyncio.Event()

    async def handler(m: Message) -> None:
        await release.wait()

    async with pool_factory(handler, size=4, capacity=10) as pool:
        for i in range(5):
            pool.submit_nowait(msg("a", i))
        await asyncio.sleep(0)  # let the executor pick up the first one
        index = pool.executor_for("a")
        assert pool.depth(index) == 5  # 1 running + 4 queued
        assert sum(pool.depths()) == 5
        assert pool.in_flight == 5
        release.set()
        await pool.drain(5)
        assert pool.depths() == [0, 0, 0, 0]
        assert pool.in_flight == 0


async def test_in_flight_by_aggregate_counts_queued_and_running_events(
    pool_factory: PoolFactory,
) -> None:
    release = asyncio.Event()

    async def handler(m: Message) -> None:
        await release.wait()

    async with pool_factory(handler, size=2, capacity=10) as pool:
        assert pool.in_flight_by_aggregate() == {}
        for i, agg in enumerate(["a", "a", "b", "a", "c", "c"]):
            pool.dispatch_nowait(msg(agg, i))
        await asyncio.sleep(0)  # each executor runs its first event
        assert pool.in_flight_by_aggregate() == {"a": 3, "b": 1, "c": 2}
        release.set()
        await pool.drain(5)
        assert pool.in_flight_by_aggregate() == {}


async def test_drain_waits_for_submitted_events_and_times_out(pool_factory: PoolFactory) -> None:
    release = asyncio.Event()
    done: list[int] = []

    async def handler(m: Message) -> None:
        await release.wait()
        done.append(m.offset)

    pool = pool_factory(handler, size=4)
    for i in range(10):
        await pool.submit(msg(f"a{i}", i))
    with pytest.raises(DrainTimeoutError) as exc:
        await pool.drain(0.05)
    assert exc.value.remaining == 10
    release.set()
    await pool.drain(5)
    assert sorted(done) == list(range(10))
    await pool.close()
    await pool.close()  # idempotent
    with pytest.raises(PoolClosedError):
        pool.submit_nowait(msg("a", 99))
    with pytest.raises(PoolClosedError):
        await pool.submit(msg("a", 99))


async def test_close_finishes_queued_work_then_cancels_at_deadline(
    pool_factory: PoolFactory,
) -> None:
    gate = asyncio.Event()

    async def handler(m: Message) -> None:
        if m.aggregate_id == "stuck":
            await gate.wait()

    pool = pool_factory(handler, size=4)
    quick = [await pool.submit(msg(f"q{i}", i)) for i in range(20)]
    stuck = await pool.submit(msg("stuck", 0))
    await pool.close(timeout=0.2)
    assert all(f.result() is None for f in quick)
    assert stuck.cancelled(), "an unfinished event must never look handled"


async def test_non_retryable_error_dead_letters_at_once(pool_factory: PoolFactory) -> None:
    calls = 0

    async def handler(m: Message) -> None:
        nonlocal calls
        calls += 1
        raise NonRetryableError("bad business rule")

    async with pool_factory(handler, size=2) as pool:
        dead = await (await pool.submit(msg("a", 1)))
    assert calls == 1
    assert dead is not None
    assert dead.reason is DeadLetterReason.NON_RETRYABLE
    assert dead.attempts == 1


async def test_handler_timeout_becomes_a_dead_letter(pool_factory: PoolFactory) -> None:
    async def handler(m: Message) -> None:
        if m.offset == 0:
            await asyncio.Event().wait()  # hangs forever

    async with pool_factory(handler, size=1, handler_timeout=0.02) as pool:
        hung = await pool.submit(msg("a", 0))
        after = await pool.submit(msg("a", 1))
        dead = await asyncio.wait_for(hung, 5)
        assert await asyncio.wait_for(after, 5) is None
    assert dead is not None
    assert dead.reason is DeadLetterReason.HANDLER_TIMEOUT
    assert dead.attempts == 3


async def test_a_hung_handler_is_cancelled_at_its_own_deadline(pool_factory: PoolFactory) -> None:
    """The timeout runs from each call's start, whatever the executor ran before:
    the hung call starts half a timeout after the executor's first call (where a
    timer armed once per executor would be due) and is cancelled neither before
    its own deadline nor long after it."""
    timeout = 0.4
    cut_after: list[float] = []

    async def handler(m: Message) -> None:
        if m.aggregate_id != "hang":
            await asyncio.sleep(0.02)
            return
        started = time.monotonic()
        try:
            await asyncio.Event().wait()
        finally:
            cut_after.append(time.monotonic() - started)

    once = RetryPolicy(max_attempts=1)
    async with pool_factory(handler, size=1, handler_timeout=timeout, retry=once) as pool:
        quick = [await pool.submit(msg(f"q{i}", i)) for i in range(10)]  # ~0.2 s of calls
        hung = await pool.submit(msg("hang", 10))
        after = await pool.submit(msg("q-after", 11))
        dead = await asyncio.wait_for(hung, 5)
        assert await asyncio.wait_for(after, 5) is None
        assert [await f for f in quick] == [None] * 10
    assert dead is not None
    assert dead.reason is DeadLetterReason.HANDLER_TIMEOUT
    assert dead.error_type == "TimeoutError"
    assert len(cut_after) == 1
    assert timeout - 0.01 <= cut_after[0] <= timeout + 0.3, cut_after


async def test_a_timeout_the_handler_swallows_leaves_the_executor_working(
    pool_factory: PoolFactory,
) -> None:
    """A handler that catches the timeout's cancellation and returns has handled
    its event (as with ``asyncio.timeout``); the executor's task is not left
    cancelled: its next hung call still times out into a dead letter, and a
    pool close still cancels what runs."""
    calls: list[int] = []

    async def handler(m: Message) -> None:
        calls.append(m.offset)
        if m.offset == 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        elif m.offset == 2:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None
        elif m.offset in (1, 3):
            await asyncio.Event().wait()

    once = RetryPolicy(max_attempts=1)
    pool = pool_factory(handler, size=1, handler_timeout=0.05, retry=once)
    futures = [await pool.submit(msg("a", i)) for i in range(5)]
    outcomes = [await asyncio.wait_for(f, 5) for f in futures]
    assert outcomes[0] is None, "swallowed: handled"
    assert outcomes[4] is None
    reasons = [(o.reason, o.error_type) if o else None for o in outcomes[1:4]]
    assert reasons == [
        (DeadLetterReason.HANDLER_TIMEOUT, "TimeoutError"),
        (DeadLetterReason.RETRIES_EXHAUSTED, "RuntimeError"),
        (DeadLetterReason.HANDLER_TIMEOUT, "TimeoutError"),
    ]
    gate = asyncio.Event()

    async def stuck(m: Message) -> None:
        await gate.wait()

    slow = pool_factory(stuck, size=1, handler_timeout=30)
    running = await slow.submit(msg("b", 0))
    await slow.close(timeout=0.1)
    assert running.cancelled(), "a pool close is not a handler timeout"
    await pool.close()
    assert calls == [0, 1, 2, 3, 4]


async def test_base_exceptions_from_handlers_do_not_escape(pool_factory: PoolFactory) -> None:
    def handler(m: Message) -> None:
        raise SystemExit("handler tried to exit")

    async with pool_factory(handler, size=1) as pool:
        dead = await asyncio.wait_for(await pool.submit(msg("a", 0)), 5)
    assert dead is not None
    assert dead.error_type == "SystemExit"


async def test_sync_handlers_run_in_threads_one_at_a_time_per_aggregate(
    pool_factory: PoolFactory,
) -> None:
    lock = threading.Lock()
    seen: dict[str, list[int]] = defaultdict(list)
    active: set[str] = set()
    overlaps: list[str] = []
    threads: set[str] = set()

    def handler(m: Message) -> None:
        with lock:
            if m.aggregate_id in active:
                overlaps.append(m.aggregate_id)
            active.add(m.aggregate_id)
            threads.add(threading.current_thread().name)
        threading.Event().wait(0.0005)  # blocking I/O stand-in
        with lock:
            seen[m.aggregate_id].append(m.offset)
            active.discard(m.aggregate_id)

    async with pool_factory(handler, size=8, handler_threads=4) as pool:
        futures = [await pool.submit(msg(f"a{i % 20}", i)) for i in range(400)]
        await asyncio.wait_for(asyncio.gather(*futures), 30)
    assert overlaps == []
    assert all(v == sorted(v) for v in seen.values())
    assert sum(len(v) for v in seen.values()) == 400
    assert threading.main_thread().name not in threads
    assert 1 < len(threads) <= 4


async def test_finish_listener_runs_before_the_completion_resolves(
    pool_factory: PoolFactory,
) -> None:
    order: list[str] = []

    async def handler(m: Message) -> None:
        pass

    async with pool_factory(handler, size=2) as pool:
        pool.add_finish_listener(lambda m, outcome: order.append(f"listener:{m.offset}"))
        future = await pool.submit(msg("a", 1))
        future.add_done_callback(lambda f: order.append("future"))
        await future
        await asyncio.sleep(0)
    assert order == ["listener:1", "future"]


def test_invalid_sizes_are_refused(pool_factory: PoolFactory) -> None:
    async def handler(m: Message) -> None:
        pass

    with pytest.raises(ValueError, match="size must be >= 1"):
        pool_factory(handler, size=0)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        pool_factory(handler, capacity=0)
    with pytest.raises(TypeError, match="callable"):
        pool_factory("not a function")


async def test_a_failing_event_in_backoff_does_not_block_other_aggregates(
    pool_factory: PoolFactory, pool_kind: str
) -> None:
    """While a failing event waits out its retry backoff, its executor serves
    other aggregates; the failing aggregate's later events wait behind it."""
    order: list[str] = []
    fails = {"p:0": 2}  # p's first event fails twice, then succeeds

    async def handler(m: Message) -> None:
        key = f"{m.aggregate_id}:{m.offset}"
        if fails.get(key, 0) > 0:
            fails[key] -= 1
            raise RuntimeError("transient")
        order.append(key)

    retry = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2, jitter=0.0)
    kw = {"max_restarts": 100} if pool_kind == "actor" else {}
    async with pool_factory(handler, size=1, capacity=10, retry=retry, **kw) as pool:
        p0 = await pool.submit(msg("p", 0))
        h = [await pool.submit(msg("h", i)) for i in range(1, 4)]
        p4 = await pool.submit(msg("p", 4))
        await asyncio.wait_for(asyncio.gather(*h), 0.15)  # well inside one backoff
        assert not p0.done(), "the failing event is still waiting for its retry"
        assert pool.depth(0) == 2  # p:0 parked, p:4 deferred behind it
        assert list(await asyncio.wait_for(asyncio.gather(p0, p4), 5)) == [None, None]
    assert order == ["h:1", "h:2", "h:3", "p:0", "p:4"]
