"""What only the actor pool does: per-actor state, restarts, budget escalation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from pool import ActorPool, ActorPoolOptions, DeadLetterReason, Message, RetryPolicy
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
        options=ActorPoolOptions(size=4, retry=RetryPolicy(max_attempts=2, initial_backoff=0.001)),
        actor_factory=factory, metrics=metrics,
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


async def _outcome(pool: ActorPool, aggregate_id: str, offset: int) -> tuple[str, int] | None:
    """Submit one event, wait for it: None if handled, else (reason, attempts)."""
    dead = await asyncio.wait_for(await pool.submit(msg(aggregate_id, offset)), 5)
    return None if dead is None else (dead.reason.value, dead.attempts)


async def test_a_crash_loop_spends_the_budget_and_escalates_once_logged() -> None:
    now = [0.0]
    handled: list[str] = []

    async def handler(m: Message) -> None:
        if m.aggregate_id.startswith("poison"):
            raise RuntimeError("always")
        handled.append(f"{m.aggregate_id}:{m.offset}")

    pool = ActorPool(
        handler,
        ActorPoolOptions(
            size=1,  # everything on one actor
            max_restarts=2,
            restart_window=60.0,
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.001, jitter=0.0),
        ),
        clock=lambda: now[0],
    )
    exhausted, escalated = ("retries-exhausted", 3), ("restart-budget-exhausted", 1)
    with structlog.testing.capture_logs() as logs:
        async with pool:
            # Event after event crashes the actor and none is handled: each
            # event's first crash is charged (its retries are the retry
            # policy's), and the third event in a row escalates at once.
            assert [await _outcome(pool, f"poison-{i}", i) for i in range(4)] == [
                exhausted,
                exhausted,
                escalated,
                escalated,
            ]
            # The actor kept serving its other aggregates; a handled event
            # makes the budget whole again.
            assert await _outcome(pool, "ok", 4) is None
            assert [await _outcome(pool, f"poison-{i}", i) for i in range(5, 8)] == [
                exhausted,
                exhausted,
                escalated,
            ]
            # The window slides: charges older than it stop counting.
            now[0] = 61.0
            assert await _outcome(pool, "poison-8", 8) == exhausted
    assert handled == ["ok:4"]
    assert pool.restarts == 3 + 3 + 1 + 1 + 3 + 3 + 1 + 3
    escalations = [e for e in logs if e["event"] == "pool.actor_escalating"]
    # One WARNING per escalation streak, not one per dead-lettered crash.
    assert [e["log_level"] for e in escalations] == ["warning", "warning"]


async def test_a_success_makes_the_budget_whole_so_a_failure_rate_is_retried() -> None:
    """Failures among successes are not a crash loop: each failing event gets
    the whole retry policy, never ``restart-budget-exhausted``."""

    async def handler(m: Message) -> None:
        if m.aggregate_id.startswith("poison"):
            raise RuntimeError("always")

    pool = ActorPool(
        handler,
        ActorPoolOptions(
            size=1,
            max_restarts=1,  # without the reset, the second failing event would escalate
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.001, jitter=0.0),
        ),
    )
    async with pool:
        outcomes = []
        for i in range(0, 20, 2):
            outcomes.append(await _outcome(pool, f"poison-{i}", i))
            assert await _outcome(pool, f"ok-{i}", i + 1) is None
    assert outcomes == [("retries-exhausted", 3)] * 10
    assert pool.restarts == 30


async def test_restart_storm_keeps_inbox_order_behind_the_crashing_event() -> None:
    seen: list[int] = []
    crashed: set[int] = set()

    async def handler(m: Message) -> None:
        if m.offset % 3 == 0 and m.offset not in crashed:
            crashed.add(m.offset)
            raise RuntimeError("crash once")
        seen.append(m.offset)

    async with ActorPool(
        handler, ActorPoolOptions(size=1, max_restarts=1000, retry=FAST_RETRY)
    ) as pool:
        futures = [await pool.submit(msg("a", i)) for i in range(300)]
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [None] * 300
    assert seen == list(range(300))
    assert pool.restarts == 100


def test_actor_pool_needs_a_handler_or_a_factory() -> None:
    import pytest

    with pytest.raises(TypeError, match="handler or an actor_factory"):
        ActorPool()
