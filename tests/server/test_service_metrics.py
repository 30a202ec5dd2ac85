"""The scrape cost of the real service: what one replica's ``/metrics`` holds.

The assembled service in-process with the default pool sizes (256 workers and
256 actors), in ACTOR mode at 50 % rollout so both pools handle events on
nearly every executor, 16 partitions, some dead letters and control-plane
calls; then ``/metrics`` read over HTTP. By default the pools' metrics are one
series per name and label set, and the whole exposition stays within the
budget of 1 500 series a replica; ``metrics.perExecutor`` brings the
``actor_id``/``worker_id`` series back.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from clients import AsyncPoolControlClient
from server._broker import EmbeddedBroker
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, envelope, produce
from tests.server.recording_handler import MemoryRecorder
from tests.server.test_service import _scrape, service_settings

#: Series one replica may export by default: 50 replicas within 75 000 series.
SERIES_BUDGET = 1500
PARTITIONS = 16
AGGREGATES, PER_AGGREGATE, POISON = 3000, 2, 20
ACTOR = "kafka_eventbus_actor_pool_"
KEYED = "kafka_eventbus_keyed_pool_"


async def _scrape_busy_service(broker: EmbeddedBroker, make_topic: MakeTopic, *extra: str) -> str:
    topic = await make_topic(partitions=PARTITIONS)
    await broker.create_topics({f"{topic}.dlq": 1})
    events = aggregate_events(AGGREGATES, PER_AGGREGATE, PARTITIONS)
    events += [
        (i % PARTITIONS, None, envelope(f"poison-{i}", 0, payload={"seq": 0, "poison": True}))
        for i in range(POISON)
    ]
    recorder = MemoryRecorder()
    settings = service_settings(
        broker.bootstrap, topic, f"{topic}-g",
        "kafka.actorPool.enabled=true",
        "kafka.actorPool.rolloutPercent=50",
        *extra,
    )  # fmt: skip
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        assert svc.endpoints is not None
        assert svc.endpoints.grpc_address is not None
        assert svc.endpoints.metrics_address is not None
        await svc.consumer.wait_assigned(10)
        await produce(broker.bootstrap, topic, events)
        handled = AGGREGATES * PER_AGGREGATE
        await assert_eventually(lambda: len(recorder.events) == handled, timeout=60)
        await assert_eventually(
            lambda: sum(s.committed or 0 for s in svc.status().partitions) == handled + POISON,
            timeout=20,
            message="every offset committed (the poison events dead-lettered)",
        )
        async with AsyncPoolControlClient(svc.endpoints.grpc_address) as client:
            await client.status()
            await client.inbox_depth()
        return await asyncio.to_thread(_scrape, svc.endpoints.metrics_address)


def _samples(exposition: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    ]


def _series_lines(exposition: str) -> list[str]:
    return [line for line in exposition.splitlines() if line and not line.startswith("#")]


async def test_a_default_replica_exports_at_most_1500_series_one_per_pool_metric(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    exposition = await _scrape_busy_service(broker, make_topic)
    lines = _series_lines(exposition)
    print(f"\ndefault /metrics: {len(lines)} series, {len(exposition.encode())} bytes")
    assert len(lines) <= SERIES_BUDGET, len(lines)
    assert not re.search(r'\b(actor_id|worker_id)="', exposition)
    samples = _samples(exposition)
    per_name = Counter(name for name, _, _ in samples)
    for prefix in (ACTOR, KEYED):
        # The original's PromQL has no `sum by`: one series per name and label set.
        for name in ("messages_sent_total", "inbox_depth", "inbox_utilization", "inbox_depth_max"):
            assert per_name[prefix + name] == 1, prefix + name
        assert per_name[prefix + "messages_processed_total"] == 2  # success true / false
        assert per_name[prefix + "message_latency_seconds_count"] == 1
        assert per_name[prefix + "message_latency_seconds_bucket"] == 18
        value = {name: v for name, labels, v in samples if not labels}
        assert value[prefix + "messages_sent_total"] > 1000
        assert value[prefix + "message_latency_seconds_count"] > 1000
        executors = {
            labels["le"]: v
            for name, labels, v in samples
            if name == prefix + "inbox_depth_executors"
        }
        assert executors["+Inf"] == 256
    assert per_name[ACTOR + "actor_restarted_total"] == 1
    # The poison events, in whichever pool their aggregate went to: one series per reason.
    dead = [
        (labels["reason"], v)
        for name, labels, v in samples
        if name in (ACTOR + "dead_letters_total", KEYED + "dead_letters_total")
    ]
    assert {reason for reason, _ in dead} == {"non-retryable"}
    assert sum(v for _, v in dead) == POISON


async def test_per_executor_brings_the_actor_id_and_worker_id_series_back(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    exposition = await _scrape_busy_service(broker, make_topic, "metrics.perExecutor=true")
    lines = _series_lines(exposition)
    print(f"\nper-executor /metrics: {len(lines)} series, {len(exposition.encode())} bytes")
    assert len(lines) > 256 * 2 * 20  # every executor's latency histogram, at least
    samples = _samples(exposition)
    ids = {str(i) for i in range(256)}
    for prefix, label in ((ACTOR, "actor_id"), (KEYED, "worker_id")):
        for name in ("messages_sent_total", "inbox_depth", "inbox_utilization"):
            assert {labels[label] for n, labels, _ in samples if n == prefix + name} == ids, name
        counts = [v for n, _, v in samples if n == prefix + "message_latency_seconds_count"]
        assert len(counts) == 256
        assert sum(1 for v in counts if v > 0) > 200  # nearly every executor handled events
    restarted = [labels for n, labels, _ in samples if n == ACTOR + "actor_restarted_total"]
    assert {labels["actor_id"] for labels in restarted} == ids
