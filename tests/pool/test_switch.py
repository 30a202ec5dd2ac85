"""The live mode switch: routing rule, atomicity, handover, rollout."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from pool import (
    ActorPool,
    ActorPoolOptions,
    DrainTimeoutError,
    KeyedWorkerPool,
    Message,
    PoolClosedError,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    QueueFullError,
    RetryPolicy,
    rollout_bucket,
)
from tests.pool.conftest import FAST_RETRY, msg


class Tracking:
    """A handler that records (pool, aggregate, offset) and can hold aggregates."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.active: set[str] = set()
        self.overlaps: list[str] = []

    def handler(self, pool: str):  # type: ignore[no-untyped-def]
        async def handle(m: Message) -> None:
            if m.aggregate_id in self.active:
                self.overlaps.append(m.aggregate_id)
            self.active.add(m.aggregate_id)
            try:
                gate = self.gates.get(m.aggregate_id)
                if gate is not None:
                    await gate.wait()
                self.log.append((pool, m.aggregate_id, m.offset))
            finally:
                self.active.discard(m.aggregate_id)

        return handle

    def offsets(self, aggregate_id: str) -> list[int]:
        return [o for _, a, o in self.log if a == aggregate_id]

    def pools_of(self, aggregate_id: str) -> list[str]:
        return [p for p, a, _ in self.log if a == aggregate_id]


def make_switch(t: Tracking, **kw) -> PoolSwitch:  # type: ignore[no-untyped-def]
    size = kw.pop("size", 8)
    capacity = kw.pop("capacity", 100)
    return PoolSwitch(
        KeyedWorkerPool(
            t.handler("keyed"), PoolOptions(size=size, capacity=capacity, retry=FAST_RETRY)
        ),
        ActorPool(
            t.handler("actor"), ActorPoolOptions(size=size, capacity=capacity, retry=FAST_RETRY)
        ),
        **kw,
    )


async def test_set_mode_reports_and_routes_new_events_to_the_new_pool() -> None:
    t = Tracking()
    async with make_switch(t) as sw:
        assert sw.mode is PoolMode.KEYED
        await (await sw.submit(msg("a", 0)))
        result = await sw.set_mode(PoolMode.ACTOR)
        assert (result.previous_mode, result.mode) == (PoolMode.KEYED, PoolMode.ACTOR)
        assert result.generation == sw.generation == 1
        assert result.changed
        assert result.waited_aggregates == 0
        assert result.took_s >= 0
        await (await sw.submit(msg("a", 1)))
        again = await sw.set_mode(PoolMode.ACTOR)
        assert not again.changed
        assert again.generation == 1
    assert t.pools_of("a") == ["keyed", "actor"]


async def test_change_listeners_see_every_change_and_only_changes() -> None:
    t = Tracking()
    seen: list[tuple[str, str, float]] = []
    async with make_switch(t) as sw:
        sw.add_change_listener(lambda r: seen.append((r.previous_mode, r.mode, r.rollout)))
        await sw.set_mode(PoolMode.ACTOR)
        await sw.set_mode(PoolMode.ACTOR)  # no change: not reported
        await sw.set_rollout(25)
    assert seen == [("keyed", "actor", 100.0), ("actor", "actor", 25.0)]


async def test_in_flight_aggregate_is_held_until_its_old_events_finish() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t) as sw:
        a0 = await sw.submit(msg("a", 0))
        a1 = await sw.submit(msg("a", 1))
        await asyncio.sleep(0)
        result = await sw.set_mode(PoolMode.ACTOR, wait_timeout=0)
        assert result.waited_aggregates == 1
        assert result.pending_aggregates == 1
        # "b" has nothing in flight: it switches with no pause.
        await asyncio.wait_for(await sw.submit(msg("b", 0)), 5)
        assert t.pools_of("b") == ["actor"]
        # "a" is held behind its two unfinished keyed events.
        a2 = await sw.submit(msg("a", 2))
        assert sw.held == 1
        assert sw.where("a")[0] is PoolMode.ACTOR
        await asyncio.sleep(0.01)
        assert t.offsets("a") == []
        t.gates["a"].set()
        await asyncio.wait_for(asyncio.gather(a0, a1, a2), 5)
        assert sw.held == 0
    assert t.offsets("a") == [0, 1, 2]
    assert t.pools_of("a") == ["keyed", "keyed", "actor"]
    assert t.overlaps == []


async def test_the_only_target_is_counted_at_a_change_from_the_pool_itself() -> None:
    """While the rule sends everything to one pool its events are not counted
    per event; a change counts them from the pool (queued, running, parked for
    a retry, deferred behind one), so every one of them still holds its
    aggregate's new events."""
    t = Tracking()
    t.gates["run"] = asyncio.Event()
    fail_once: set[int] = {10}
    inner = t.handler("keyed")

    async def keyed_handler(m: Message) -> None:
        if m.offset in fail_once:
            fail_once.discard(m.offset)
            raise RuntimeError("once")
        await inner(m)

    # One executor per pool: "run" is running, "queued" waits behind it, "retry"
    # is parked for its backoff with "retry"'s next event deferred behind it.
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.2, jitter=0.0)
    sw = PoolSwitch(
        KeyedWorkerPool(keyed_handler, PoolOptions(size=1, capacity=100, retry=retry)),
        ActorPool(t.handler("actor"), ActorPoolOptions(size=1, capacity=100, retry=retry)),
    )
    async with sw:
        sw.dispatch_nowait(msg("retry", 10))
        for _ in range(3):
            await asyncio.sleep(0)  # "retry" 10 failed and is parked
        sw.dispatch_nowait(msg("retry", 11))
        sw.dispatch_nowait(msg("run", 20))
        sw.dispatch_nowait(msg("queued", 30))
        for _ in range(3):
            await asyncio.sleep(0)  # "retry" 11 is deferred, "run" is running
        keyed = sw.pools[PoolMode.KEYED]
        assert keyed.depth(0) == 4
        assert keyed.in_flight_by_aggregate() == {"retry": 2, "run": 1, "queued": 1}
        assert sw._keyed_counts == {}  # the only target: not counted
        result = await sw.set_mode(PoolMode.ACTOR, wait_timeout=0)
        assert result.waited_aggregates == 3
        assert sw._keyed_counts == {"run": 1, "queued": 1, "retry": 2}
        for agg, offset in (("run", 21), ("queued", 31), ("retry", 12), ("new", 40)):
            sw.dispatch_nowait(msg(agg, offset))
        assert sw.held == 3  # all but "new"
        t.gates["run"].set()
        await sw.drain(5)
        assert sw._actor_counts == {}  # the only target again
    assert t.offsets("run") == [20, 21]
    assert t.offsets("queued") == [30, 31]
    assert t.offsets("retry") == [10, 11, 12]
    assert t.pools_of("retry") == ["keyed", "keyed", "actor"]
    assert t.pools_of("new") == ["actor"]
    assert t.overlaps == []


async def test_switching_back_lets_held_events_follow_their_earlier_ones_at_once() -> None:
    """KEYED -> ACTOR holds "a" behind its keyed events; back to KEYED before
    they finish, the held events go to the keyed pool at once, behind them."""
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t) as sw:
        sw.dispatch_nowait(msg("a", 0))
        await asyncio.sleep(0)
        await sw.set_mode(PoolMode.ACTOR, wait_timeout=0)
        sw.dispatch_nowait(msg("a", 1))
        assert sw.held == 1
        result = await sw.set_mode(PoolMode.KEYED, wait_timeout=0)
        assert sw.held == 0
        assert result.waited_aggregates == 0
        sw.dispatch_nowait(msg("a", 2))
        t.gates["a"].set()
        await sw.drain(5)
        assert sw._keyed_counts == {}
        assert sw._actor_counts == {}
    assert t.offsets("a") == [0, 1, 2]
    assert t.pools_of("a") == ["keyed"] * 3
    assert t.overlaps == []


async def test_set_mode_waits_for_the_handover_when_asked() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t) as sw:
        await sw.submit(msg("a", 0))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, t.gates["a"].set)
        result = await sw.set_mode(PoolMode.ACTOR, wait_timeout=5)
        assert result.waited_aggregates == 1
        assert result.pending_aggregates == 0
        assert result.took_s >= 0.04


async def test_set_mode_wait_is_bounded() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t) as sw:
        await sw.submit(msg("a", 0))
        await asyncio.sleep(0)
        result = await sw.set_mode(PoolMode.ACTOR, wait_timeout=0.05)
        assert result.pending_aggregates == 1
        assert sw.mode is PoolMode.ACTOR, "the new rule is in force even if a key still waits"
        t.gates["a"].set()


async def test_concurrent_changes_are_serialised() -> None:
    t = Tracking()
    async with make_switch(t) as sw:
        modes = [PoolMode.ACTOR, PoolMode.KEYED] * 10
        results = await asyncio.gather(*(sw.set_mode(m) for m in modes))
    assert [r.generation for r in results] == list(range(1, 21))
    assert all(r.previous_mode != r.mode for r in results)


def test_rollout_percent_is_validated() -> None:
    t = Tracking()
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        make_switch(t, rollout_percent=101)


async def test_rollout_out_of_range_is_refused_live() -> None:
    t = Tracking()
    async with make_switch(t) as sw:
        for bad in (-1, 100.5, float("nan")):
            with pytest.raises(ValueError, match=r"within \[0, 100\]"):
                await sw.set_rollout(bad)
        assert sw.rollout_percent == 100.0
        assert sw.generation == 0


async def test_rollout_is_sticky_and_monotone() -> None:
    t = Tracking()
    aggs = [f"agg-{i}" for i in range(5000)]
    async with make_switch(t, mode=PoolMode.ACTOR, rollout_percent=10) as sw:
        at10 = {a for a in aggs if sw.route(a) is PoolMode.ACTOR}
        await sw.set_rollout(50)
        at50 = {a for a in aggs if sw.route(a) is PoolMode.ACTOR}
        await sw.set_rollout(100)
        at100 = {a for a in aggs if sw.route(a) is PoolMode.ACTOR}
        await sw.set_mode(PoolMode.KEYED)
        keyed = {a for a in aggs if sw.route(a) is PoolMode.ACTOR}
    assert at10 < at50 < at100 == set(aggs)
    assert 0.08 < len(at10) / 5000 < 0.12
    assert 0.47 < len(at50) / 5000 < 0.53
    assert keyed == set()
    assert all(rollout_bucket(a) < 1000 for a in at10)


async def test_switch_under_load_keeps_order_and_loses_nothing() -> None:
    t = Tracking()
    seen: dict[str, list[int]] = defaultdict(list)
    async with make_switch(t, size=16, capacity=50) as sw:
        futures = []
        for offset in range(6000):
            futures.append(await sw.submit(msg(f"agg-{offset % 97}", offset)))
            if offset % 500 == 0:
                if offset % 1000:
                    await sw.set_rollout((offset // 100) % 101, wait_timeout=0)
                else:
                    mode = PoolMode.ACTOR if sw.mode is PoolMode.KEYED else PoolMode.KEYED
                    await sw.set_mode(mode, wait_timeout=0)
        assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [None] * 6000
    for _, agg, offset in t.log:
        seen[agg].append(offset)
    assert t.overlaps == []
    assert sum(len(v) for v in seen.values()) == 6000
    assert all(v == sorted(v) for v in seen.values())
    assert {p for p, _, _ in t.log} == {"keyed", "actor"}


async def test_full_target_queue_raises_without_holding_anything() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t, size=1, capacity=2) as sw:
        sw.submit_nowait(msg("a", 0))
        sw.submit_nowait(msg("a", 1))
        with pytest.raises(QueueFullError):
            sw.submit_nowait(msg("a", 2))
        assert sw.in_flight == 2
        waiter = asyncio.create_task(sw.submit(msg("a", 2)))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        t.gates["a"].set()
        await asyncio.wait_for(await asyncio.wait_for(waiter, 5), 5)
    assert t.offsets("a") == [0, 1, 2]


async def test_drain_close_and_submit_after_close() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    sw = make_switch(t)
    sw.start()
    await sw.submit(msg("a", 0))
    await asyncio.sleep(0)
    await sw.set_mode(PoolMode.ACTOR, wait_timeout=0)
    held = await sw.submit(msg("a", 1))
    with pytest.raises(DrainTimeoutError):
        await sw.drain(0.05)
    t.gates["a"].set()
    await sw.drain(5)
    assert held.result() is None
    await sw.close()
    with pytest.raises(PoolClosedError):
        sw.submit_nowait(msg("a", 2))


def test_switch_checks_its_pools() -> None:
    t = Tracking()
    keyed = KeyedWorkerPool(t.handler("k"), PoolOptions(size=1))
    actor = ActorPool(t.handler("a"), ActorPoolOptions(size=1))
    with pytest.raises(TypeError):
        PoolSwitch(actor, keyed)


async def test_change_nowait_installs_the_rule_at_once_and_keeps_order() -> None:
    """The synchronous change (fleet control applies a desired state with it,
    from a plain loop callback): in force when it returns, the steps in the
    order of the awaited changes, held aggregates as after any change."""
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t, rollout_percent=0) as sw:
        a0 = await sw.submit(msg("a", 0))
        await asyncio.sleep(0)
        steps = sw.change_nowait(mode=PoolMode.ACTOR, rollout_percent=100)
        assert steps is not None
        # Going to ACTOR: the rollout first (no routing change under KEYED), then the mode.
        assert [(r.mode, r.rollout) for r in steps] == [
            (PoolMode.KEYED, 100.0),
            (PoolMode.ACTOR, 100.0),
        ]
        assert [r.generation for r in steps] == [1, 2]
        assert steps[1].waited_aggregates == 1
        assert steps[1].pending_aggregates == 1
        assert sw.route("a") is PoolMode.ACTOR
        a1 = await sw.submit(msg("a", 1))
        assert sw.held == 1, "a's next event waits behind its keyed one"
        t.gates["a"].set()
        await asyncio.wait_for(asyncio.gather(a0, a1), 5)
        # Going to KEYED: the mode first, then the rollout (no routing change).
        back = sw.change_nowait(mode=PoolMode.KEYED, rollout_percent=10)
        assert back is not None
        assert [(r.mode, r.rollout) for r in back] == [
            (PoolMode.KEYED, 100.0),
            (PoolMode.KEYED, 10.0),
        ]
        again = sw.change_nowait(mode=PoolMode.KEYED, rollout_percent=10)
        assert again is not None
        assert [r.changed for r in again] == [False, False]
        assert sw.generation == 4
    assert t.offsets("a") == [0, 1]
    assert t.pools_of("a") == ["keyed", "actor"]


async def test_change_nowait_declines_while_an_awaited_change_waits() -> None:
    t = Tracking()
    t.gates["a"] = asyncio.Event()
    async with make_switch(t) as sw:
        a0 = await sw.submit(msg("a", 0))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(sw.set_mode(PoolMode.ACTOR, wait_timeout=None))
        await asyncio.sleep(0.01)
        assert not waiting.done(), "the awaited change waits for a's handover"
        assert sw.change_nowait(rollout_percent=50) is None
        assert (sw.mode, sw.rollout_percent, sw.generation) == (PoolMode.ACTOR, 100.0, 1)
        t.gates["a"].set()
        await asyncio.wait_for(asyncio.gather(a0, waiting), 5)
        steps = sw.change_nowait(rollout_percent=50)
        assert steps is not None
        assert [r.rollout for r in steps] == [50.0]
        assert sw.generation == 2
