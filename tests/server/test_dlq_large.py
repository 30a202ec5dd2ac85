"""A dead letter too large for the dead-letter producer is published without
its value (then without its key and original headers) instead of being retried
for ever. Found by the bad-input reliability campaign: a 1.5 MB value (over the
default 1 MiB intake limit) became an ``oversized-value`` dead letter whose
publish failed on every retry, so its partition never committed again."""

from __future__ import annotations

import dataclasses

from aiokafka import AIOKafkaConsumer, TopicPartition

from pool import DeadLetterReason
from server._broker import EmbeddedBroker
from server._dlq import DLQ_HEADERS, DLQ_OMITTED_HEADER, DeadLetterSink
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import produce
from tests.server.recording_handler import MemoryRecorder
from tests.server.test_dlq import dead_letter
from tests.server.test_service import service_settings

BIG = 1536 * 1024  # over aiokafka's default max_request_size (1 MiB)


async def _read(bootstrap: str, topic: str, count: int) -> list[object]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        out: list[object] = []

        async def enough() -> bool:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                out.extend(records)
            return len(out) >= count

        await assert_eventually(enough, timeout=10)
        return out
    finally:
        await consumer.stop()


async def test_a_value_too_large_is_left_out_and_said_so(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    big = dataclasses.replace(
        dead_letter(topic, 7, reason=DeadLetterReason.OVERSIZED_VALUE),
        message=dataclasses.replace(dead_letter(topic, 7).message, value=b"v" * BIG),
    )
    huge_key = dataclasses.replace(
        big, message=dataclasses.replace(big.message, offset=8, key=b"k" * BIG)
    )
    async with DeadLetterSink(broker.bootstrap, ring_size=10, id_base=0) as sink:
        first = await sink.publish(big)
        second = await sink.publish(huge_key)
        assert first.message.value == b"v" * BIG  # the ring keeps it whole
        assert second.message.key == b"k" * BIG
    one, two = await _read(broker.bootstrap, f"{topic}.dlq", 2)
    assert one.value == b""  # type: ignore[attr-defined]
    assert one.key == b"agg-1"  # type: ignore[attr-defined]
    h1 = dict(one.headers)  # type: ignore[attr-defined]
    assert [k for k, _ in one.headers][:2] == ["trace", "bin"]  # type: ignore[attr-defined]
    assert h1["dlq-reason"] == b"oversized-value"
    assert h1["dlq-original-offset"] == b"7"
    assert h1[DLQ_OMITTED_HEADER].startswith(b"value: too large")
    assert str(BIG).encode() in h1[DLQ_OMITTED_HEADER]
    assert two.value == b""  # type: ignore[attr-defined]
    assert two.key is None  # type: ignore[attr-defined]
    names = [k for k, _ in two.headers]  # type: ignore[attr-defined]
    assert names == [*DLQ_HEADERS, DLQ_OMITTED_HEADER]
    assert dict(two.headers)[DLQ_OMITTED_HEADER].startswith(b"value, key and original headers")  # type: ignore[attr-defined]


async def test_the_service_commits_past_a_value_over_the_default_limit(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    recorder = MemoryRecorder()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")  # maxValueBytes 1 MiB
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        await produce(
            broker.bootstrap, topic, [(0, b"huge-1", b"z" * BIG), (0, b"after-1", b"plain")]
        )
        await assert_eventually(lambda: [e[0] for e in recorder.events] == ["after-1"])
        await assert_eventually(lambda: svc.status().partitions[0].committed == 2)
    (record,) = await _read(broker.bootstrap, f"{topic}.dlq", 1)
    assert dict(record.headers)["dlq-reason"] == b"oversized-value"  # type: ignore[attr-defined]
