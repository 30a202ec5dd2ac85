"""Property: no interleaving of events, failures, mode switches and rollout
changes breaks per-aggregate order, runs two events of one aggregate at once,
or loses or duplicates an event."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import (
    ActorPool,
    ActorPoolOptions,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    RetryPolicy,
)
from tests.pool.conftest import msg

RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.0, max_backoff=0.0, jitter=0.0)

event = st.tuples(
    st.just("ev"),
    st.integers(0, 5),  # aggregate
    st.sampled_from(["ok", "ok", "ok", "transient", "poison"]),
    st.integers(0, 3),  # handler delay, in loop turns
    st.booleans(),  # submit (with a completion future) or dispatch (listeners only)
)
mode = st.tuples(st.just("mode"), st.sampled_from([PoolMode.KEYED, PoolMode.ACTOR]), st.booleans())
rollout = st.tuples(st.just("rollout"), st.integers(0, 100), st.booleans())
tick = st.tuples(st.just("tick"), st.integers(1, 5))
# change_nowait from a plain callback of the loop (as fleet control applies a
# desired state), and awaited changes left running in a task meanwhile (then
# change_nowait must decline).
now = st.tuples(
    st.just("now"),
    st.sampled_from([None, PoolMode.KEYED, PoolMode.ACTOR]),
    st.one_of(st.none(), st.integers(0, 100)),
)
background = st.tuples(st.just("background"), st.sampled_from([PoolMode.KEYED, PoolMode.ACTOR]))
operations = st.lists(
    st.one_of(event, event, event, mode, rollout, tick, now, background), max_size=120
)


async def run(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    starts: dict[str, list[int]] = defaultdict(list)
    handled: dict[int, int] = defaultdict(int)
    active: set[str] = set()
    overlaps: list[str] = []
    failed_once: set[int] = set()
    behaviour: dict[int, tuple[str, int]] = {}

    async def handler(m: Message) -> None:
        if m.aggregate_id in active:
            overlaps.append(m.aggregate_id)
        active.add(m.aggregate_id)
        starts[m.aggregate_id].append(m.offset)
        try:
            kind, delay = behaviour[m.offset]
            for _ in range(delay):
                await asyncio.sleep(0)
            if kind == "poison" or (kind == "transient" and m.offset not in failed_once):
                failed_once.add(m.offset)
                raise RuntimeError(kind)
            handled[m.offset] += 1
        finally:
            active.discard(m.aggregate_id)

    keyed = KeyedWorkerPool(handler, PoolOptions(size=2, capacity=3, retry=RETRY))
    actor = ActorPool(
        handler, ActorPoolOptions(size=2, capacity=3, retry=RETRY, max_restarts=10**6)
    )
    futures: dict[int, asyncio.Future] = {}  # type: ignore[type-arg]
    finished: dict[int, list[bool]] = defaultdict(list)
    changes: list[asyncio.Task] = []  # type: ignore[type-arg]
    declined: list[bool] = []

    def change_now(sw: PoolSwitch, mode: PoolMode | None, rollout: int | None) -> None:
        results = sw.change_nowait(mode=mode, rollout_percent=rollout)
        declined.append(results is None)
        if results is None:
            assert any(not t.done() for t in changes), "declined with no awaited change running"
        else:
            if mode is not None:
                assert sw.mode is mode
            if rollout is not None:
                assert sw.rollout_percent == rollout

    async with PoolSwitch(keyed, actor) as sw:
        sw.add_finish_listener(lambda m, dead: finished[m.offset].append(dead is None))
        loop = asyncio.get_running_loop()
        offset = 0
        for op in ops:
            if op[0] == "ev":
                _, agg, kind, delay, with_future = op
                behaviour[offset] = (kind, delay)
                if with_future:
                    futures[offset] = await sw.submit(msg(f"agg-{agg}", offset))
                else:
                    await sw.dispatch(msg(f"agg-{agg}", offset))
                offset += 1
            elif op[0] == "mode":
                await sw.set_mode(op[1], wait_timeout=None if op[2] else 0)
            elif op[0] == "rollout":
                await sw.set_rollout(op[1], wait_timeout=None if op[2] else 0)
            elif op[0] == "now":
                loop.call_soon(change_now, sw, op[1], op[2])
            elif op[0] == "background":
                changes.append(asyncio.create_task(sw.set_mode(op[1], wait_timeout=None)))
            else:
                for _ in range(op[1]):
                    await asyncio.sleep(0)
        results = await asyncio.wait_for(asyncio.gather(*futures.values()), 10)
        await asyncio.wait_for(asyncio.gather(*changes), 10)
        await asyncio.sleep(0)  # the last change_now callbacks
        await sw.drain(10)
        assert sw.in_flight == 0
        assert sw.held == 0

    assert overlaps == []
    for agg, offs in starts.items():
        assert offs == sorted(offs), f"{agg} started out of order: {offs}"
    for off, (kind, _) in behaviour.items():
        assert finished[off] == [kind != "poison"], f"event {off} finished {finished[off]}"
        assert handled[off] == (0 if kind == "poison" else 1), f"event {off} handled twice"
    for off, result in zip(futures, results, strict=True):
        if behaviour[off][0] == "poison":
            assert result is not None
            assert handled[off] == 0
        else:
            assert result is None
            assert handled[off] == 1, f"event {off} handled {handled[off]} times"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_switching_never_breaks_order_or_loses_events(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    asyncio.run(run(ops))
