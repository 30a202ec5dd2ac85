"""The dead-letter sink against the real embedded broker."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pool import DeadLetter, DeadLetterReason, Message
from server._broker import EmbeddedBroker
from server._control import DeadLetterFilter
from server._dlq import (
    DLQ_HEADERS,
    DeadLetterSink,
    DeadLetterSinkError,
    DeadLetterSubscription,
    dead_letter_headers,
)
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually


def dead_letter(
    topic: str,
    offset: int,
    *,
    aggregate_id: str = "agg-1",
    reason: DeadLetterReason = DeadLetterReason.RETRIES_EXHAUSTED,
    error_type: str = "ValueError",
    error_message: str = "boom",
) -> DeadLetter:
    msg = Message(
        topic=topic,
        partition=0,
        offset=offset,
        key=aggregate_id.encode(),
        value=f"value-{offset}".encode(),
        headers=(("trace", b"t-1"), ("bin", b"\xff\x00")),
        aggregate_id=aggregate_id,
        timestamp_ms=1_700_000_000_000 + offset,
    )
    return DeadLetter(
        message=msg,
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        traceback="Traceback (most recent call last):\n  ...\nValueError: boom\n",
        attempts=3,
        mode="actor",
        executor=17,
        time=1_700_000_001.5,
    )


async def read_all(bootstrap: str, topic: str, count: int) -> list[object]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or {0}
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        records: list[object] = []

        async def enough() -> bool:
            batch = await consumer.getmany(timeout_ms=50)
            for recs in batch.values():
                records.extend(recs)
            return len(records) >= count

        await assert_eventually(enough, timeout=10, message=f"{count} records on {topic}")
        return records
    finally:
        await consumer.stop()


@pytest.fixture
async def source(make_topic: MakeTopic, broker: EmbeddedBroker) -> str:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    return topic


@pytest.fixture
async def sink(broker: EmbeddedBroker) -> AsyncIterator[DeadLetterSink]:
    async with DeadLetterSink(broker.bootstrap, ring_size=100, id_base=0) as s:
        yield s


async def test_dead_letter_lands_on_dlq_topic_with_headers(
    broker: EmbeddedBroker, source: str, sink: DeadLetterSink
) -> None:
    long_error = "é" * 5000  # truncated, UTF-8 safe
    dead = dead_letter(source, 41, error_message=long_error)
    recorded = await sink.publish(dead)
    assert recorded.id == "1"
    assert dataclasses.replace(recorded, id="") == dead

    (record,) = await read_all(broker.bootstrap, f"{source}.dlq", 1)
    assert record.key == b"agg-1"  # type: ignore[attr-defined]
    assert record.value == b"value-41"  # type: ignore[attr-defined]
    headers = list(record.headers)  # type: ignore[attr-defined]
    assert headers[:2] == [("trace", b"t-1"), ("bin", b"\xff\x00")]  # originals first
    got = dict(headers[2:])
    assert list(got) == list(DLQ_HEADERS)
    assert got["dlq-reason"] == b"retries-exhausted"
    assert got["dlq-error-type"] == b"ValueError"
    message = got["dlq-error-message"].decode("utf-8")  # still valid UTF-8
    assert message.endswith("...")
    assert len(got["dlq-error-message"]) <= 1024
    assert got["dlq-original-topic"] == source.encode()
    assert got["dlq-original-partition"] == b"0"
    assert got["dlq-original-offset"] == b"41"
    assert got["dlq-original-timestamp"] == b"1700000000041"
    assert got["dlq-attempts"] == b"3"
    assert got["dlq-mode"] == b"actor"
    assert got["dlq-executor"] == b"17"
    assert got["dlq-aggregate-id"] == b"agg-1"
    assert got["dlq-time"] == b"1700000001500"
    assert b"ValueError: boom" in got["dlq-traceback"]


def test_headers_keep_short_messages_intact() -> None:
    got = dict(dead_letter_headers(dead_letter("t", 1, error_message="short")))
    assert got["dlq-error-message"] == b"short"


async def test_ids_increase_and_ring_is_bounded(broker: EmbeddedBroker, source: str) -> None:
    async with DeadLetterSink(broker.bootstrap, ring_size=3, id_base=100) as sink:
        ids = [(await sink.publish(dead_letter(source, i))).id for i in range(5)]
        assert ids == ["101", "102", "103", "104", "105"]
        assert [d.id for d in sink.recent()] == ["103", "104", "105"]
        assert sink.published == 5
        assert len(sink) == 3


async def test_default_ids_increase_across_restarts(broker: EmbeddedBroker, source: str) -> None:
    # The ID base is the start-up time (ms x 1000): a restart half a second later
    # hands out larger IDs than the previous process ever did.
    async with DeadLetterSink(broker.bootstrap, clock=lambda: 1000.0) as first:
        a = await first.publish(dead_letter(source, 1))
    async with DeadLetterSink(broker.bootstrap, clock=lambda: 1000.5) as second:
        b = await second.publish(dead_letter(source, 2))
    assert int(b.id) > int(a.id)


async def test_subscription_yields_backlog_then_live(source: str, sink: DeadLetterSink) -> None:
    for i in range(3):
        await sink.publish(dead_letter(source, i))
    sub = sink.subscribe(after_id="1")
    got: list[str] = []

    async def reader() -> None:
        async for dead in sub:
            got.append(dead.id)
            if len(got) == 4:
                return

    task = asyncio.create_task(reader())
    await assert_eventually(lambda: got == ["2", "3"], message="backlog after id 1")
    await sink.publish(dead_letter(source, 3))
    await sink.publish(dead_letter(source, 4))
    await asyncio.wait_for(task, timeout=5)
    assert got == ["2", "3", "4", "5"]
    sub.close()
    assert sink.subscriber_count == 0


async def test_subscription_filters_and_no_follow(source: str, sink: DeadLetterSink) -> None:
    await sink.publish(dead_letter(source, 0, aggregate_id="a"))
    await sink.publish(dead_letter(source, 1, aggregate_id="b", error_type="KeyError"))
    await sink.publish(dead_letter(source, 2, aggregate_id="a", error_type="KeyError"))
    only_a = [d.id async for d in sink.subscribe(aggregate_id="a", follow=False)]
    assert only_a == ["1", "3"]
    key_errors = [d.id async for d in sink.subscribe(error_type="KeyError", follow=False)]
    assert key_errors == ["2", "3"]
    other_topic = [d.id async for d in sink.subscribe(topic="elsewhere", follow=False)]
    assert other_topic == []
    with pytest.raises(ValueError, match="after_id"):
        sink.subscribe(after_id="not-a-number")


async def test_never_reading_subscriber_does_not_block_publish(
    source: str, sink: DeadLetterSink
) -> None:
    stuck = sink.subscribe(buffer=2)  # never read
    reader = sink.subscribe(buffer=100)
    async with asyncio.timeout(10):
        for i in range(6):
            await sink.publish(dead_letter(source, i))
    assert stuck.skipped == 4
    assert stuck.pending == 2
    assert [d.id async for d in _take(stuck, 2)] == ["5", "6"]  # the newest were kept
    assert reader.skipped == 0
    assert [d.id async for d in _take(reader, 6)] == ["1", "2", "3", "4", "5", "6"]


async def _take(sub: DeadLetterSubscription, n: int) -> AsyncIterator[DeadLetter]:
    for _ in range(n):
        yield await asyncio.wait_for(anext(sub), timeout=5)


async def test_stop_ends_subscriptions_and_is_idempotent(
    broker: EmbeddedBroker, source: str
) -> None:
    sink = DeadLetterSink(broker.bootstrap, id_base=0)
    await sink.start()
    await sink.start()
    sub = sink.subscribe()
    await sink.publish(dead_letter(source, 0))
    await sink.stop()
    await sink.stop()
    assert [d.id async for d in sub] == ["1"]  # buffered ones, then the end
    with pytest.raises(DeadLetterSinkError):
        await sink.publish(dead_letter(source, 1))


async def test_select_by_filter_ids_and_limit(source: str, sink: DeadLetterSink) -> None:
    for i in range(5):
        await sink.publish(dead_letter(source, i, aggregate_id=f"a{i % 2}"))
    assert [d.id for d in sink.select()] == ["1", "2", "3", "4", "5"]
    assert [d.id for d in sink.select(DeadLetterFilter(aggregate_id="a1"))] == ["2", "4"]
    assert [d.id for d in sink.select(ids=["4", "2", "99"])] == ["2", "4"]
    assert [d.id for d in sink.select(limit=2)] == ["4", "5"]
    assert [d.id for d in sink.select(DeadLetterFilter(reason="retries-exhausted"))] == [
        "1",
        "2",
        "3",
        "4",
        "5",
    ]


async def test_listeners_are_called_and_unsubscribe(source: str, sink: DeadLetterSink) -> None:
    seen: list[str] = []
    unsubscribe = sink.add_listener(lambda d: seen.append(d.id))
    await sink.publish(dead_letter(source, 0))
    unsubscribe()
    unsubscribe()
    await sink.publish(dead_letter(source, 1))
    assert seen == ["1"]


async def test_redrive_republishes_original_record(
    broker: EmbeddedBroker, source: str, sink: DeadLetterSink
) -> None:
    first = await sink.publish(dead_letter(source, 10, aggregate_id="x-1"))
    second = await sink.publish(dead_letter(source, 11, aggregate_id="x-2"))
    republished, failed = await sink.redrive([first])
    assert republished == [first]
    assert failed == []
    assert [d.id for d in sink.recent()] == [second.id]  # redriven ones are forgotten

    (record,) = await read_all(broker.bootstrap, source, 1)
    assert record.topic == source  # type: ignore[attr-defined]
    assert record.key == b"x-1"  # type: ignore[attr-defined]
    assert record.value == b"value-10"  # type: ignore[attr-defined]
    assert list(record.headers) == [("trace", b"t-1"), ("bin", b"\xff\x00")]  # type: ignore[attr-defined]

    result = await sink.redrive_matching(ids=[second.id, "missing"])
    assert (result.matched, result.republished, result.failed) == (1, 1, 0)
    assert len(sink) == 0


async def test_redrive_reports_failures(broker: EmbeddedBroker, source: str) -> None:
    async with DeadLetterSink(
        broker.bootstrap, id_base=0, producer_options={"request_timeout_ms": 500}
    ) as sink:
        good = await sink.publish(dead_letter(source, 1))
        bad_topic = dataclasses.replace(
            good, message=dataclasses.replace(good.message, topic="bad topic name!")
        )
        republished, failed = await sink.redrive([good, bad_topic])
    assert republished == [good]
    assert len(failed) == 1
    assert failed[0][0] is bad_topic
    assert failed[0][1]
