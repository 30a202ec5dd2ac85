"""Kafka helpers shared by the tests and the reliability campaigns.

- :func:`committed_offsets`: what a consumer group has committed, per partition;
- :class:`RawName` and :func:`python_record_builder`: produce a header *name*
  that is not UTF-8, which other clients (Java, librdkafka) can send and the
  service must survive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["RawName", "committed_offsets", "python_record_builder"]


async def committed_offsets(
    bootstrap: str, group_id: str, topic: str, partitions: int
) -> dict[int, int | None]:
    """What ``group_id`` has committed on each partition (read through a consumer)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


class RawName(str):
    """A header name whose wire bytes are not UTF-8 (no Python producer can send
    one otherwise; Java and librdkafka clients can)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        obj = super().__new__(cls, raw.decode("latin-1"))
        obj.raw = raw
        return obj

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


@contextlib.contextmanager
def python_record_builder() -> Iterator[None]:
    """Use aiokafka's pure-Python batch builder (it calls ``name.encode()``)."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer_mod
    from aiokafka.record import default_records

    py = default_records._DefaultRecordBatchBuilderPy
    saved = accumulator.DefaultRecordBatchBuilder, producer_mod.DefaultRecordBatchBuilder
    accumulator.DefaultRecordBatchBuilder = py
    producer_mod.DefaultRecordBatchBuilder = py
    try:
        yield
    finally:
        accumulator.DefaultRecordBatchBuilder, producer_mod.DefaultRecordBatchBuilder = saved
