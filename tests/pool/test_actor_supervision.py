"""What only the actor pool does: per-actor state, restarts, budget escalation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pool import ActorPool, DeadLetterReason, Message, RetryPolicy
from tests.pool.conftest import FAST_RETRY, msg


@dataclass
class Recorded:
    restarted: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    processed: list[tuple[int, bool]] = field(default_factory=list)
    depth: list[tuple[int, int, int]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def message_sent(self, executor: int) -> None:
        self.sent.append(executor)

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        self.processed.append((executor, success))

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        self.depth.append((executor, depth, capacity))

    def actor_restarted(self, executor: int) -> None:
        self.restarted.append(executor)

    def dead_letter(self, executor: int, reason: str) -> None:
        self.dead.append((executor, reason))


async def test_each_actor_has_its_own_state_rebuilt_on_restart() -> None:
    built: list[int] = []

    def factory(index: int):  # type: ignore[no-untyped-def]
        built.append(index)
        state = {"count": 0, "index": index}

        async def handle(m: Message) -> None:
            state["count"] += 1
            if m.value == b"crash":
                raise RuntimeError("boom")
            assert state["index"] == index
            if m.value == b"report":
                reports.append((m.aggregate_id, state["count"]))

        return handle

    reports: list[tuple[str, int]] = []
    metrics = Recorded()
    pool = ActorPool(
        actor_factory=factory, size=4, retry=RetryPolicy(max_attempts=2, initial_backoff=0.001),
        metrics=metrics,
    )  # fmt: skip
    assert sorted(built) == [0, 1, 2, 3]
    async with pool:
        idx = pool.executor_for("a")
        for i in range(3):
            await pool.submit(msg("a", i))
        await (await pool.submit(msg("a", 3, value=b"report")))
        assert reports == [("a", 4)]
        crash = await pool.submit(msg("a", 4, value=b"crash"))
        dead = await asyncio.wait_for(crash, 5)
        assert dead is not None
        assert dead.reason is DeadLetterReason.RETRIES_EXHAUSTED
        # Two failed attempts = two restarts, each rebuilding the actor's state.
        assert pool.actor_restarts(idx) == 2
        assert built.count(idx) == 3
        await (await pool.submit(msg("a", 5, value=b"report")))
        assert reports[-1] == ("a", 1), "state must be fresh after a restart"
    assert metrics.restarted == [idx, idx]
    assert metrics.dead == [(idx, "retries-exhausted")]


async def test_spent_budget_escalates_and_the_actor_keeps_serving() -> None:
    now = [0.0]
    handled: list[str] = []

    async def handler(m: Message) -> None:
        if m.aggregate_id == "poison":
            raise RuntimeError("always")
        handled.append(f"{m.aggregate_id}:{m.offset}")

    pool = ActorPool(
        handler,
        size=1,  # everything on one actor
        max_restarts=2,
        restart_window=60.0,
        retry=RetryPolicy(max_attempts=5, initial_backoff=0.001, jitter=0.0),
        clock=lambda: now[0],
    )
    async with pool:
        first = await pool.submit(msg("poison", 0))
        healthy = await pool.submit(msg("ok", 1))
        second = await pool.submit(msg("poison", 2))
        d1, h, d2 = await asyncio.wait_for(asyncio.gather(first, healthy, second), 5)
        # Two restarts allowed, the third failure escalates.
        assert d1 is not None
        assert d1.reason is DeadLetterReason.RESTART_BUDGET_EXHAUSTED
        assert d1.attempts == 3
        assert h is None
        # Still within the window: the next crash escalates at once.
        assert d2 is not None
        assert d2.reason is DeadLetterReason.RESTART_BUDGET_EXHAUSTED
        assert d2.attempts == 1
        # The window slides: restarts are allowed again later.
        now[0] = 61.0
        d3 = await asyncio.wait_for(await pool.submit(msg("poison", 3)), 5)
        assert d3 is not None
        assert d3.attempts == 3
    assert handled == ["ok:1"]
    assert pool.restarts == 3 + 1 + 3


async def test_restart_storm_keeps_inbox_order_behind_the_crashing_event() -> None:
    seen: list[int] = []
    crashed: set[int] = set()

    async def handler(m: Message) -> None:
        if m.offset % 3 == 0 and m.offset not in crashed:
            crashed.add(m.offset)
            raise RuntimeError("crash once")
        seen.append(m.offset)

    async with ActorPool(handler, size=1, max_restarts=1000, retry=FAST_RETRY) as pool:
        futures = [await pool.submit(msg("a", i)) for i in range(300)]
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [None] * 300
    assert seen == list(range(300))
    assert pool.restarts == 100


def test_actor_pool_needs_a_handler_or_a_factory() -> None:
    import pytest

    with pytest.raises(TypeError, match="handler or an actor_factory"):
        ActorPool()
