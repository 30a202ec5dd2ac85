"""The assembled service in-process, against the real embedded broker.

End to end through intake, the switch, the pools, the offset tracker, the
dead-letter sink and ``/metrics`` over HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections import defaultdict
from importlib import metadata
from typing import Any

import pytest

from pool import Message, NonRetryableError
from server._broker import EmbeddedBroker
from server._config import Settings, load_settings
from server._control import (
    DeadLetterFilter,
    DrainIncompleteError,
    DrainProgress,
    PreconditionError,
    UnknownPartitionError,
)
from server._grpc import GrpcConfigError
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import (
    aggregate_events,
    committed_offsets,
    envelope,
    produce,
    read_all,
)
from tests.server.recording_handler import MemoryRecorder


def service_settings(bootstrap: str, topic: str, group: str, *extra: str) -> Settings:
    args = [
        "--brokers", bootstrap,
        "--topic", topic,
        "--group-id", group,
        "--grpc-address", "127.0.0.1:0",
        "--metrics-address", "127.0.0.1:0",
        "--set", "kafka.consumer.sessionTimeoutMs=2000",
        "--set", "kafka.consumer.heartbeatIntervalMs=500",
        "--set", "kafka.consumer.commitIntervalMs=100",
        "--set", "kafka.consumer.revokeTimeoutMs=5000",
        "--set", "pool.retry.initialBackoffMs=1",
        "--set", "pool.retry.maxBackoffMs=5",
        "--set", "pool.drainTimeoutS=5",
    ]  # fmt: skip
    for item in extra:
        args += ["--set", item]
    return load_settings(args, env={})


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


async def test_end_to_end_50k_events_ordered_per_aggregate_and_every_offset_committed(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    partitions, aggregates, per_aggregate = 8, 1000, 50
    topic = await make_topic(partitions=partitions)
    events = aggregate_events(aggregates, per_aggregate, partitions)
    assert len(events) == 50_000
    produced_at = time.monotonic()
    ends = await produce(broker.bootstrap, topic, events)
    produce_s = time.monotonic() - produced_at
    assert sum(ends.values()) == 50_000
    recorder = MemoryRecorder()
    group = f"{topic}-g"
    settings = service_settings(
        broker.bootstrap, topic, group, "kafka.consumer.maxPollRecords=2000"
    )
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        started = time.monotonic()
        await assert_eventually(lambda: len(recorder.events) >= 50_000, timeout=60, interval=0.05)
        handled_s = time.monotonic() - started
        await assert_eventually(
            lambda: {s.partition: s.committed for s in svc.status().partitions} == ends,
            timeout=10,
            message="every offset committed",
        )
        assert svc.endpoints is not None
        assert svc.endpoints.metrics_address is not None
        assert not svc.endpoints.metrics_address.endswith(":0")
        text = await asyncio.to_thread(_scrape, svc.endpoints.metrics_address)
    print(f"\n50k e2e: produce {produce_s:.2f}s, consume+handle {handled_s:.2f}s "
          f"({50_000 / handled_s:,.0f} events/s incl. group join)")  # fmt: skip
    assert len(recorder.events) == 50_000
    by_agg: dict[str, list[int]] = defaultdict(list)
    for agg, seq, _partition, _offset in recorder.events:
        by_agg[agg].append(seq)
    assert len(by_agg) == aggregates
    for agg, seqs in by_agg.items():
        assert seqs == list(range(per_aggregate)), f"{agg} out of order or duplicated"
    assert await committed_offsets(broker.bootstrap, group, topic, partitions) == ends
    assert "kafka_eventbus_consumer_records_consumed_total" in text
    assert 'kafka_eventbus_consumer_committed_offset{partition="0"' in text
    assert "kafka_eventbus_keyed_pool_messages_sent_total" in text
    assert "kafka_eventbus_actor_pool_inbox_depth" in text


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


async def test_bad_input_each_gets_its_defined_outcome(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    dlq = f"{topic}.dlq"
    await broker.create_topics({dlq: 1})
    recorder = MemoryRecorder()
    settings = service_settings(
        broker.bootstrap, topic, f"{topic}-g",
        "intake.maxValueBytes=2000",
        "intake.missingIdPolicy=dead-letter",
    )  # fmt: skip
    events: list[tuple[int, bytes | None, bytes]] = [
        (0, None, envelope("ok-1", 0)),  # 0: handled
        (0, None, b'{"event_id": "x", "aggregate_id": '),  # 1: malformed-envelope
        (0, None, b"plain text, no key"),  # 2: missing-aggregate-id
        (0, b"bad id with spaces", b"plain text"),  # 3: invalid-aggregate-id
        (0, b"big", b"x" * 5000),  # 4: oversized-value
        (0, None, envelope("poison-1", 0, payload={"seq": 0, "poison": True})),  # 5
        (0, b"keyed-1", b"plain text routed by key"),  # 6: handled
    ]
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        await produce(broker.bootstrap, topic, events)
        dead = await read_all(broker.bootstrap, dlq, expected=5)
        await assert_eventually(lambda: svc.status().partitions[0].committed == 7)
        held = svc.select_dead_letters(DeadLetterFilter())
    by_offset = {int(_headers(r)["dlq-original-offset"]): _headers(r) for r in dead}
    reasons = {o: h["dlq-reason"] for o, h in by_offset.items()}
    assert reasons == {
        1: "malformed-envelope",
        2: "missing-aggregate-id",
        3: "invalid-aggregate-id",
        4: "oversized-value",
        5: "non-retryable",
    }
    assert by_offset[5]["dlq-error-type"] == "NonRetryableError"
    assert by_offset[5]["dlq-aggregate-id"] == "poison-1"
    assert all(h["dlq-original-topic"] == topic for h in by_offset.values())
    assert sorted(a for a, *_ in recorder.events) == ["keyed-1", "ok-1"]
    assert sorted(d.message.offset for d in held) == [1, 2, 3, 4, 5]


class GatedRecorder(MemoryRecorder):
    """Holds every event of the aggregates in ``gates`` until their event is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, message: Message) -> None:
        gate = self.gates.get(message.aggregate_id)
        if gate is not None:
            await gate.wait()
        await super().__call__(message)


async def test_pause_resume_and_drain_through_the_control_target(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    recorder = GatedRecorder()
    recorder.gates["slow-0"] = asyncio.Event()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        with pytest.raises(UnknownPartitionError):
            await svc.pause([(topic, 7)])
        assert await svc.pause([(topic, 0)]) == [(topic, 0)]
        await produce(broker.bootstrap, topic, aggregate_events(20, 1, 2))
        await assert_eventually(lambda: len(recorder.events) == 10, message="partition 1 flows")
        st = {p.partition: p for p in svc.status().partitions}
        assert st[0].paused_reasons == ("operator",)
        assert not st[1].paused
        assert await svc.resume() == [(topic, 0)]
        await assert_eventually(lambda: len(recorder.events) == 20)

        # Drain waits for the gated event, reports progress, commits, then holds intake.
        await produce(broker.bootstrap, topic, [(0, b"slow-0", envelope("slow-0", 0))])
        await assert_eventually(lambda: svc.consumer.in_flight == 1)
        progress: list[DrainProgress] = []
        drain = asyncio.ensure_future(svc.drain(timeout=10, progress=progress.append))
        await assert_eventually(lambda: svc.status().draining)
        with pytest.raises(PreconditionError):
            await svc.drain(timeout=1)
        recorder.gates["slow-0"].set()
        result = await drain
        assert result.remaining == 0
        assert result.finished == 1
        assert {(c.partition, c.offset) for c in result.committed} == {(0, 11), (1, 10)}
        assert progress
        assert progress[-1].remaining == 0
        assert all(p.paused_reasons == ("drain",) for p in svc.status().partitions)
        await produce(broker.bootstrap, topic, [(1, b"late", envelope("late", 0))])
        with pytest.raises(AssertionError):
            await assert_eventually(lambda: len(recorder.events) > 21, timeout=0.5)
        await svc.resume()
        await assert_eventually(lambda: len(recorder.events) == 22)


async def test_drain_timeout_reports_what_remains_and_resumes_when_asked(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    recorder = GatedRecorder()
    recorder.gates["stuck"] = asyncio.Event()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        await produce(
            broker.bootstrap,
            topic,
            [(0, b"a", envelope("a", 0)), (0, b"stuck", envelope("stuck", 0)),
             (0, b"b", envelope("b", 0))],
        )  # fmt: skip
        await assert_eventually(lambda: len(recorder.events) == 2)
        with pytest.raises(DrainIncompleteError) as info:
            await svc.drain(timeout=0.3, resume_after=True)
        result = info.value.result
        assert result.remaining == 1
        assert result.resumed
        assert [(c.partition, c.offset) for c in result.committed] == [(0, 1)]
        assert not svc.status().partitions[0].paused
        recorder.gates["stuck"].set()
        await assert_eventually(lambda: svc.status().partitions[0].committed == 3)


async def test_a_port_in_use_fails_the_start_and_releases_everything(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = service_settings(
            broker.bootstrap, topic, f"{topic}-g", f"grpc.address=127.0.0.1:{port}"
        )
        svc = Service(settings, bootstrap_servers=broker.bootstrap, handler=MemoryRecorder())
        with pytest.raises(GrpcConfigError, match="cannot bind"):
            async with svc:
                pass
    assert svc._http is None  # the /metrics server it had started is stopped
    assert not svc.status().ready


class FailOnce(MemoryRecorder):
    """Dead-letters each poison event the first time it is seen, handles it after."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    async def __call__(self, message: Message) -> None:
        payload = (message.envelope or {}).get("payload") or {}
        if payload.get("poison") and message.aggregate_id not in self.failed:
            self.failed.add(message.aggregate_id)
            raise NonRetryableError("first time")
        self.events.append((message.aggregate_id, payload.get("seq", -1), 0, message.offset))


async def test_a_dead_letter_redriven_by_id_is_handled_and_committed(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    recorder = FailOnce()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        poison = envelope("p-1", 0, payload={"seq": 0, "poison": True})
        await produce(broker.bootstrap, topic, [(0, b"p-1", poison)])
        await assert_eventually(lambda: len(svc.select_dead_letters(DeadLetterFilter())) == 1)
        await assert_eventually(lambda: svc.status().partitions[0].committed == 1)
        dead = svc.select_dead_letters(DeadLetterFilter())[0]
        seen: list[str] = []
        unsubscribe = svc.subscribe_dead_letters(lambda d: seen.append(d.id))
        result = await svc.redrive(ids=[dead.id])
        unsubscribe()
        assert (result.matched, result.republished, result.failed) == (1, 1, 0)
        await assert_eventually(lambda: [e[0] for e in recorder.events] == ["p-1"])
        await assert_eventually(lambda: svc.status().partitions[0].committed == 2)
        assert svc.select_dead_letters(DeadLetterFilter()) == []
        assert seen == []


async def test_wait_raises_a_consumer_failure_as_it_happens_and_returns_on_stop(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(
        settings, bootstrap_servers=broker.bootstrap, handler=MemoryRecorder(), grpc=False
    ) as svc:
        assert svc.status().version == metadata.version("kafka-actor-pool")
        waiter = asyncio.ensure_future(svc.wait())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        boom = RuntimeError("fetch loop broke")

        async def fail() -> None:
            raise boom

        # A consumer task failing, as the fetch loop would.
        svc.consumer._spawn(fail(), "test.failure")
        # Woken by the failure itself within a few loop turns, not by a poll.
        for _ in range(50):
            if waiter.done():
                break
            await asyncio.sleep(0)
        assert waiter.done()
        assert waiter.exception() is boom
        with pytest.raises(RuntimeError, match="fetch loop broke"):
            await svc.wait()  # already failed: at once
    await asyncio.wait_for(svc.wait(), 1)  # stopped: returns


async def test_wait_returns_when_the_service_stops(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    svc = Service(
        settings, bootstrap_servers=broker.bootstrap, handler=MemoryRecorder(), grpc=False
    )
    async with svc:
        waiter = asyncio.ensure_future(svc.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
    await asyncio.wait_for(waiter, 1)
    assert waiter.result() is None
