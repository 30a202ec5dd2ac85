"""The embedded broker: starts, answers Kafka, round-trips records, stores commits, stops."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from server._broker import BrokerError, EmbeddedBroker, probe_kafka
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually, find_free_port


def test_session_broker_answers_metadata(broker: EmbeddedBroker) -> None:
    assert broker.running
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert probe_kafka("127.0.0.1", broker.port)
    assert broker.pid == broker.process.pid
    assert "listening on" in broker.read_log()


async def test_produce_consume_round_trip(broker: EmbeddedBroker, make_topic: MakeTopic) -> None:
    topic = await make_topic(partitions=3)
    async with AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, enable_idempotence=False, acks="all"
    ) as producer:
        md = await producer.send_and_wait(
            topic, b"value-1", key=b"key-1", partition=2, headers=[("h", b"\xff\x00")]
        )
    assert (md.topic, md.partition, md.offset) == (topic, 2, 0)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 2)])
        record = await asyncio.wait_for(consumer.getone(), timeout=10)
    finally:
        await consumer.stop()
    assert (record.key, record.value, record.offset) == (b"key-1", b"value-1", 0)
    assert list(record.headers) == [("h", b"\xff\x00")]


async def test_committed_offset_reads_back(broker: EmbeddedBroker, make_topic: MakeTopic) -> None:
    topic = await make_topic(partitions=2)
    tp = TopicPartition(topic, 1)
    group = f"g-{topic}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 42})
    finally:
        await consumer.stop()

    reader = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        reader.assign([tp])
        assert await reader.committed(tp) == 42
        assert await reader.committed(TopicPartition(topic, 0)) is None
    finally:
        await reader.stop()


async def test_create_topics_is_idempotent_and_sets_partitions(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    await broker.create_topics({topic: 4})  # already exists: no error
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        await assert_eventually(
            lambda: consumer.partitions_for_topic(topic) == {0, 1, 2, 3},
            message="4 partitions visible",
        )
        await consumer.topics()
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}
    finally:
        await consumer.stop()


async def test_own_broker_lifecycle_stop_is_idempotent(tmp_path: Path) -> None:
    log_path = tmp_path / "b.log"
    async with EmbeddedBroker(log_path=log_path) as b:
        port = b.port
        assert probe_kafka("127.0.0.1", port)
        pid = b.pid
    assert not b.running
    assert b.process.returncode is not None
    b.stop()  # again: no error
    assert not probe_kafka("127.0.0.1", port)
    assert log_path.read_text()  # the log was kept
    assert pid > 0
    with pytest.raises(BrokerError):
        b.start()


def test_sync_start_stop_and_suspend_resume(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "b.log") as b:
        b.suspend()
        assert not probe_kafka("127.0.0.1", b.port, timeout=0.2)
        b.resume()
        assert probe_kafka("127.0.0.1", b.port, timeout=2.0)
    assert not b.running


def test_start_fails_clearly_when_port_is_taken(tmp_path: Path) -> None:
    port = find_free_port()
    with EmbeddedBroker(port=port, log_path=tmp_path / "a.log") as first:
        second = EmbeddedBroker(port=port, log_path=tmp_path / "b.log", start_timeout=3.0)
        with pytest.raises(BrokerError, match="already in use"):
            second.start()
        second.stop()
        assert first.running


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory where a broker without ``log_path`` writes its log."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_its_own_log_is_removed_on_a_clean_stop_and_kept_when_asked(own_tmp: Path) -> None:
    with EmbeddedBroker() as b:
        log = b.log_path
        assert log.parent == own_tmp
        assert log.exists()
    assert not log.exists()
    kept = EmbeddedBroker().start()
    kept.stop(keep_log=True)
    assert kept.log_path.exists()


def test_its_own_log_is_kept_when_the_broker_died(own_tmp: Path) -> None:
    b = EmbeddedBroker().start()
    b.process.kill()
    b.process.wait(5)
    b.stop()
    assert b.log_path.exists()


def test_a_broker_that_does_not_start_names_its_log_and_keeps_it(own_tmp: Path) -> None:
    fake = own_tmp / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'tansu: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    b = EmbeddedBroker(binary=str(fake), start_timeout=3.0)
    with pytest.raises(BrokerError) as info:
        b.start()
    (log,) = own_tmp.glob("tansu-*.log")
    assert (
        str(info.value) == f"embedded broker failed to start: exited with code 3 (its log: {log})"
    )
    assert info.value.log_path == log
    assert "tansu: boom" in info.value.log_tail
    b.stop()
    assert log.exists()
