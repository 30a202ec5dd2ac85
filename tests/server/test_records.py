"""A header name that is not UTF-8 (other clients can send one) must not stop
the consumer: found by the bad-input reliability campaign, where such a record
made every fetch of its partition fail and the service exit."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from server._broker import EmbeddedBroker
from server._records import LenientMemoryRecords, install
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import envelope
from tests.server.recording_handler import MemoryRecorder
from tests.server.test_service import service_settings
from tests.support.kafka import RawName, python_record_builder


async def _produce_batch(bootstrap: str, topic: str, bad_at: set[int], count: int) -> None:
    """``count`` envelopes in one batch; those in ``bad_at`` carry a non-UTF-8 header name."""
    with python_record_builder():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            batch = producer.create_batch()
            for i in range(count):
                headers = [(RawName(b"\xff\xfe-bad"), b"v")] if i in bad_at else []
                agg = f"agg-{i % 3}"
                assert batch.append(
                    key=agg.encode(), value=envelope(agg, i // 3), timestamp=None, headers=headers
                )
            await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()


async def test_a_plain_consumer_reads_through_a_bad_header_name(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await _produce_batch(broker.bootstrap, topic, {0, 4, 9}, 10)
    install()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        got: list[Any] = []  # aiokafka ConsumerRecords
        while len(got) < 10:
            for records in (await consumer.getmany(timeout_ms=2000)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    assert [r.offset for r in got] == list(range(10))
    assert [r.headers for r in got if r.headers] == [(("\\xff\\xfe-bad", b"v"),)] * 3


async def test_the_service_handles_every_event_around_a_bad_header_name(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    recorder = MemoryRecorder()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        await _produce_batch(broker.bootstrap, topic, {2, 5}, 30)
        await assert_eventually(lambda: len(recorder.events) == 30)
        await assert_eventually(lambda: svc.status().partitions[0].committed == 30)
        assert svc.consumer.failure is None
    assert sorted(offset for *_, offset in recorder.events) == list(range(30))
    for agg in ("agg-0", "agg-1", "agg-2"):
        assert [seq for a, seq, *_ in recorder.events if a == agg] == list(range(10))


def test_installed_for_the_fetcher() -> None:
    from aiokafka.consumer import fetcher

    install()
    assert fetcher.MemoryRecords is LenientMemoryRecords
