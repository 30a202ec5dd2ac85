"""The consumer's per-record loop with events that finish inside their dispatch call.

A handler's eager first step can finish an event before ``dispatch_nowait``
returns: the consumer then makes no owner entry and no unfinished or
in-flight entry for it; an event still running when the call returns gets
all three. Either way the offsets, the in-flight count and the commit point
come out as with ``tracker.add`` then ``tracker.done``. Pure bookkeeping (no
broker, no pool); ``test_consumer.py`` proves the guarantees end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from pool import DeadLetter, DeadLetterReason, Message
from server._consumer import ConsumerOptions, EventConsumer, _Partition
from tests.helpers import assert_eventually


class _Record:
    def __init__(self, offset: int) -> None:
        self.topic, self.partition, self.offset = "t", 0, offset
        self.key, self.value, self.headers, self.timestamp = b"k", b"", (), 0


class _Decoder:
    def decode(self, topic: str, partition: int, offset: int, *rest: Any) -> Message:
        return Message(topic, partition, offset, b"k", b"", (), f"a{offset}", 0)


class _Dispatcher:
    """Finishes an event inside ``dispatch_nowait`` as ``inline`` says, else keeps it."""

    def __init__(self, inline: Callable[[Message], DeadLetter | bool | None]) -> None:
        self.listeners: list[Any] = []
        self.inline = inline
        self.kept: list[Message] = []

    def dispatch_nowait(self, message: Message) -> None:
        outcome = self.inline(message)
        if outcome is False:
            self.kept.append(message)
            return
        for listener in self.listeners:
            listener(message, outcome)

    async def dispatch(self, message: Message) -> None:
        raise AssertionError("not dispatched here")

    def add_finish_listener(self, listener: Any) -> None:
        self.listeners.append(listener)


class _Sink:
    def __init__(self) -> None:
        self.published: list[DeadLetter] = []

    async def publish(self, dead: DeadLetter) -> None:
        self.published.append(dead)


class _Counter:
    def inc(self, n: int = 1) -> None:
        return None


def _dead(message: Message) -> DeadLetter:
    return DeadLetter(
        message=message,
        reason=DeadLetterReason.NON_RETRYABLE,
        error_type="ValueError",
        error_message="boom",
        traceback="",
        attempts=1,
        mode="keyed",
        executor=0,
        time=0.0,
    )


def _consumer(dispatcher: _Dispatcher, sink: _Sink) -> tuple[EventConsumer, _Partition]:
    consumer = EventConsumer(
        ConsumerOptions(bootstrap_servers="unused:9092", group_id="g", topics=("t",)),
        decoder=_Decoder(),
        dispatcher=dispatcher,
        dead_letters=sink,
    )
    tp = TopicPartition("t", 0)
    part = _Partition(tp, None, ())
    part.consumed_counter = _Counter()
    consumer._parts[tp] = part
    return consumer, part


async def test_events_finished_in_their_call_leave_nothing_and_the_others_are_tracked() -> None:
    # even offsets finish inside the call, odd ones later
    dispatcher = _Dispatcher(lambda m: None if m.offset % 2 == 0 else False)
    consumer, part = _consumer(dispatcher, _Sink())
    assert not consumer._dispatch_batch(part, [_Record(o) for o in range(10, 16)])
    assert [m.offset for m in dispatcher.kept] == [11, 13, 15]
    assert (consumer.in_flight, consumer.finished_total) == (3, 3)
    assert part.tracker.in_flight == 3
    assert sorted(consumer._owners) == sorted(id(m) for m in dispatcher.kept)
    assert part.tracker.committable == 11  # 10 done, 11 running
    assert part.tracker.last_added == 15
    for m in dispatcher.kept:
        consumer._on_finished(m, None)
    assert (consumer.in_flight, consumer.finished_total) == (0, 6)
    assert part.tracker.committable == 16
    assert consumer._owners == {}
    assert consumer._handing is None


async def test_an_event_dead_lettered_in_its_call_stays_unfinished_until_acknowledged() -> None:
    dispatcher = _Dispatcher(lambda m: _dead(m) if m.offset == 1 else None)
    sink = _Sink()
    consumer, part = _consumer(dispatcher, sink)
    consumer._dispatch_batch(part, [_Record(o) for o in range(3)])
    # 0 and 2 are done; 1 waits for its dead letter's acknowledgement
    assert part.tracker.committable == 1
    await assert_eventually(lambda: part.tracker.committable == 3, timeout=5.0)
    assert [d.message.offset for d in sink.published] == [1]
    assert (consumer.in_flight, consumer.finished_total) == (0, 3)
    assert consumer._owners == {}


async def test_a_redelivered_record_is_skipped_and_a_later_one_still_tracked() -> None:
    dispatcher = _Dispatcher(lambda m: False)
    consumer, part = _consumer(dispatcher, _Sink())
    consumer._dispatch_batch(part, [_Record(o) for o in (0, 1)])
    consumer._dispatch_batch(part, [_Record(o) for o in (1, 2)])  # a seek back: 1 again
    assert [m.offset for m in dispatcher.kept] == [0, 1, 2]
    assert consumer.in_flight == 3
    assert part.tracker.in_flight == 3
