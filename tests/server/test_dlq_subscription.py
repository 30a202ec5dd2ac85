"""server._dlq_subscription: backlog then live, bounded buffer, over a plain in-memory source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pool import DeadLetter, DeadLetterReason
from server._dlq_subscription import DeadLetterListener, DeadLetterSubscription
from tests.support.messages import msg


def dead(n: int, aggregate_id: str = "a") -> DeadLetter:
    return DeadLetter(
        message=msg(aggregate_id, n),
        reason=DeadLetterReason.NON_RETRYABLE,
        error_type="",
        error_message="",
        traceback="",
        attempts=1,
        mode="keyed",
        executor=0,
        time=0.0,
        id=str(n),
    )


class Source:
    """Records dead letters and calls its listeners, like the sink or a control target."""

    def __init__(self) -> None:
        self.held: list[DeadLetter] = []
        self.listeners: list[DeadLetterListener] = []
        self.unsubscribed = 0

    def record(self, d: DeadLetter) -> None:
        self.held.append(d)
        for listener in list(self.listeners):
            listener(d)

    def listen(self, sub: DeadLetterSubscription) -> Callable[[], None]:
        self.listeners.append(sub.push)

        def unsubscribe() -> None:
            self.unsubscribed += 1
            self.listeners.remove(sub.push)

        return unsubscribe


async def take(sub: DeadLetterSubscription, n: int) -> list[str]:
    return [(await asyncio.wait_for(anext(sub), 5)).id for _ in range(n)]


async def test_backlog_then_live_and_close_ends_after_what_is_buffered() -> None:
    source = Source()
    source.record(dead(1))
    sub = DeadLetterSubscription.open(lambda: list(source.held), source.listen)
    assert sub.backlog_size == 1
    source.record(dead(2))
    source.record(dead(3))
    assert await take(sub, 2) == ["1", "2"]
    sub.close()
    sub.close()
    assert source.unsubscribed == 1
    source.record(dead(4))  # after close: not received
    assert [d.id async for d in sub] == ["3"]
    assert sub.delivered == 3


async def test_a_dead_letter_recorded_while_the_backlog_is_taken_is_sent_once() -> None:
    source = Source()
    source.record(dead(1))

    def select() -> list[DeadLetter]:
        source.record(dead(2))  # lands in the live buffer and in the backlog
        return list(source.held)

    sub = DeadLetterSubscription.open(select, source.listen)
    source.record(dead(3))
    assert await take(sub, 3) == ["1", "2", "3"]
    assert sub.pending == 0


async def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    source = Source()
    skips: list[None] = []
    sub = DeadLetterSubscription.open(
        list,
        source.listen,
        lambda d: d.message.aggregate_id == "a",
        buffer=2,
        on_skip=lambda: skips.append(None),
    )
    for n in range(5):
        source.record(dead(n))
    source.record(dead(9, aggregate_id="other"))  # filtered out, not counted
    assert (sub.skipped, len(skips), sub.pending) == (3, 3, 2)
    assert await take(sub, 2) == ["3", "4"]


async def test_without_listen_only_the_backlog_is_read() -> None:
    held = [dead(1), dead(2)]
    sub = DeadLetterSubscription.open(lambda: held, None)
    assert sub.closed
    assert [d.id async for d in sub] == ["1", "2"]


def test_a_buffer_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="buffer"):
        DeadLetterSubscription(buffer=0)
