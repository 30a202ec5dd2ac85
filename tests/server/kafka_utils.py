"""Producing test events and reading committed offsets back from the broker."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

# One copy, shared with the reliability campaigns.
from tests.support.kafka import committed_offsets as committed_offsets


def envelope(aggregate_id: str, seq: int, **extra: object) -> bytes:
    """A valid JSON envelope whose payload carries ``seq`` (the per-aggregate order)."""
    body = {
        "event_id": f"{aggregate_id}-{seq}",
        "aggregate_id": aggregate_id,
        "event_type": "test.event",
        "event_version": 1,
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": {"seq": seq},
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def produce(
    bootstrap: str,
    topic: str,
    events: Iterable[tuple[int, bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> dict[int, int]:
    """Send ``(partition, key, value)`` events and wait for every ack.

    Returns the end offset (last acked offset + 1) of each partition written to;
    the broker's ListOffsets answer is not relied on.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, partition=partition, headers=headers)
            for partition, key, value in events
        ]
        ends: dict[int, int] = {}
        for fut in futures:
            meta = await fut
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
        return ends
    finally:
        await producer.stop()


def aggregate_events(
    aggregates: int, per_aggregate: int, partitions: int, prefix: str = "agg"
) -> list[tuple[int, bytes | None, bytes]]:
    """Round-robin events of ``aggregates`` aggregates; aggregate ``i`` lives on
    partition ``i % partitions`` (as a keyed producer would place it)."""
    out: list[tuple[int, bytes | None, bytes]] = []
    for seq in range(per_aggregate):
        for i in range(aggregates):
            agg = f"{prefix}-{i}"
            out.append((i % partitions, agg.encode(), envelope(agg, seq)))
    return out


async def read_all(
    bootstrap: str, topic: str, expected: int, timeout_ms: int = 10_000
) -> list[object]:
    """Read ``expected`` records of ``topic`` from the beginning (no group)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[object] = []
    try:
        import time

        deadline = time.monotonic() + timeout_ms / 1000
        while len(out) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()
