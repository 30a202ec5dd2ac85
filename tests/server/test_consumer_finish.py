"""The consumer's finish path as pure bookkeeping: no broker, no pool.

The finish listener marks the offset done (the commit point moves when it is
read) and wakes whoever waits for progress, and nobody else: setting the
progress event per finish when nobody waits would be work per event for
nothing. End to end through the broker, ``test_consumer.py`` proves the same
guarantees (commits, drains, revokes).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from pool import DeadLetter, Message
from server._consumer import ConsumerOptions, EventConsumer, _Partition


class _Dispatcher:
    """Only what the consumer's constructor asks for."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def dispatch_nowait(self, message: Message) -> None:
        raise AssertionError("not dispatched here")

    async def dispatch(self, message: Message) -> None:
        raise AssertionError("not dispatched here")

    def add_finish_listener(self, listener: Any) -> None:
        self.listeners.append(listener)


class _Sink:
    async def publish(self, dead: DeadLetter) -> None:
        return None


class _Decoder:
    def decode(self, *args: Any) -> Message:
        raise AssertionError("not decoded here")


def _consumer_with(offsets: list[int]) -> tuple[EventConsumer, _Partition, list[Message]]:
    """A consumer (never started) whose partition has ``offsets`` dispatched."""
    consumer = EventConsumer(
        ConsumerOptions(bootstrap_servers="unused:9092", group_id="g", topics=("t",)),
        decoder=_Decoder(),
        dispatcher=_Dispatcher(),
        dead_letters=_Sink(),
    )
    tp = TopicPartition("t", 0)
    part = _Partition(tp, None, ())
    consumer._parts[tp] = part
    messages = [Message("t", 0, o, None, b"", (), f"a{o}", 0) for o in offsets]
    for m in messages:
        part.tracker.add(m.offset)
        consumer._owners[id(m)] = part
        consumer._in_flight += 1
    return consumer, part, messages


async def test_a_finish_marks_its_offset_and_the_commit_point_moves_when_read() -> None:
    consumer, part, (m0, m1, m2) = _consumer_with([10, 11, 12])
    consumer._on_finished(m1, None)
    assert part.tracker.in_flight == 2
    assert part.tracker.committable is None  # 10 is not finished
    consumer._on_finished(m0, None)
    consumer._on_finished(m2, None)
    assert (consumer.in_flight, consumer.finished_total) == (0, 3)
    assert part.tracker.committable == 13
    assert consumer._owners == {}


async def test_a_finish_wakes_a_progress_waiter_and_sets_nothing_when_nobody_waits() -> None:
    consumer, _, (m0, m1) = _consumer_with([0, 1])
    consumer._on_finished(m0, None)
    assert not consumer._progress.is_set()  # nobody waits: nothing to wake
    waiting = asyncio.ensure_future(consumer.wait_finished(timeout=30))
    await asyncio.sleep(0)  # the waiter is now waiting for progress
    assert consumer._progress_waiters == 1
    consumer._on_finished(m1, None)
    assert consumer._progress.is_set()  # woken at once, not at its next poll
    assert await asyncio.wait_for(waiting, 5) == 0
    assert consumer._progress_waiters == 0


async def test_a_cancelled_progress_wait_leaves_no_waiter_behind() -> None:
    consumer, _, (m0,) = _consumer_with([0])
    waiting = asyncio.ensure_future(consumer.wait_finished(timeout=30))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert consumer._progress_waiters == 0
    consumer._on_finished(m0, None)
    assert not consumer._progress.is_set()
