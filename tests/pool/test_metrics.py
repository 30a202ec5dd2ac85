"""The Prometheus collector under DESIGN.md's names, read back from real exposition."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pool import (
    ActorPool,
    ActorPoolOptions,
    KeyedWorkerPool,
    Message,
    NoopMetrics,
    PoolOptions,
    PrometheusPoolMetrics,
    RetryPolicy,
)
from tests.pool.conftest import msg

ORIGINAL_SEVEN = [
    "kafka_eventbus_actor_pool_messages_sent",
    "kafka_eventbus_actor_pool_messages_processed",
    "kafka_eventbus_actor_pool_message_latency_seconds",
    "kafka_eventbus_actor_pool_inbox_depth",
    "kafka_eventbus_actor_pool_inbox_utilization",
    "kafka_eventbus_actor_pool_actor_restarted",
    "kafka_eventbus_actor_pool_dead_letters",
]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_actor_pool_exports_the_original_seven_metrics() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusPoolMetrics("actor", 4, registry)
    gate = asyncio.Event()

    async def handler(m: Message) -> None:
        if m.aggregate_id == "held":
            await gate.wait()
        if m.aggregate_id == "bad":
            raise RuntimeError("x")

    retry = RetryPolicy(max_attempts=2, initial_backoff=0.0, jitter=0.0)
    async with ActorPool(
        handler, ActorPoolOptions(size=4, capacity=10, retry=retry), metrics=metrics
    ) as pool:
        good = pool.executor_for("good")
        held = pool.executor_for("held")
        bad = pool.executor_for("bad")
        assert len({good, held, bad}) >= 2
        await (await pool.submit(msg("good", 0)))
        await (await pool.submit(msg("bad", 1)))
        for i in range(3):
            await pool.submit(msg("held", 10 + i))
        await asyncio.sleep(0)
        s = samples(registry)
        families = {name for name, _ in s}
        for name in ORIGINAL_SEVEN:
            assert any(f.startswith(name) for f in families), name
        aid = (("actor_id", str(held)),)
        assert s[("kafka_eventbus_actor_pool_inbox_depth", aid)] == 3
        assert s[("kafka_eventbus_actor_pool_inbox_utilization", aid)] == 0.3
        assert s[("kafka_eventbus_actor_pool_messages_sent_total", (("actor_id", str(good)),))] >= 1
        ok = (("actor_id", str(good)), ("success", "true"))
        assert s[("kafka_eventbus_actor_pool_messages_processed_total", ok)] >= 1
        failed = (("actor_id", str(bad)), ("success", "false"))
        assert s[("kafka_eventbus_actor_pool_messages_processed_total", failed)] == 2
        restarted = (("actor_id", str(bad)),)
        assert s[("kafka_eventbus_actor_pool_actor_restarted_total", restarted)] == 2
        dead = (("actor_id", str(bad)), ("reason", "retries-exhausted"))
        assert s[("kafka_eventbus_actor_pool_dead_letters_total", dead)] == 1
        count = s[
            ("kafka_eventbus_actor_pool_message_latency_seconds_count", (("actor_id", str(good)),))
        ]
        assert count >= 1
        gate.set()
        await pool.drain(5)
        s = samples(registry)
        assert s[("kafka_eventbus_actor_pool_inbox_depth", aid)] == 0


async def test_keyed_pool_mirrors_the_names_with_worker_id() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusPoolMetrics("keyed", 2, registry)

    async def handler(m: Message) -> None:
        pass

    async with KeyedWorkerPool(handler, PoolOptions(size=2), metrics=metrics) as pool:
        await (await pool.submit(msg("a", 0)))
        index = pool.executor_for("a")
    s = samples(registry)
    assert s[("kafka_eventbus_keyed_pool_messages_sent_total", (("worker_id", str(index)),))] == 1
    assert ("kafka_eventbus_keyed_pool_inbox_depth", (("worker_id", "0"),)) in s
    assert not any(name.startswith("kafka_eventbus_actor_pool") for name, _ in s)


def test_noop_metrics_accepts_every_call() -> None:
    m = NoopMetrics()
    m.message_sent(0)
    m.message_processed(0, True, 0.1)
    m.inbox_depth(0, 1, 2)
    m.actor_restarted(0)
    m.dead_letter(0, "x")


def test_latency_histogram_is_exact_and_its_count_is_the_inf_bucket() -> None:
    registry = CollectorRegistry()
    m = PrometheusPoolMetrics("keyed", 2, registry)
    for duration in (0.0001, 0.00011, 0.001, 31.0):
        m.message_processed(1, True, duration)
    m.message_processed(1, False, 0.002)
    s = samples(registry)
    name = "kafka_eventbus_keyed_pool_message_latency_seconds"

    def bucket(le: str, worker: str = "1") -> float:
        return s[(f"{name}_bucket", (("le", le), ("worker_id", worker)))]

    assert bucket("0.0001") == 1  # a duration equal to a bound counts in that bucket
    assert bucket("0.00025") == 2
    assert bucket("0.001") == 3
    assert bucket("0.0025") == 4
    assert bucket("30.0") == 4
    assert bucket("+Inf") == 5
    assert s[(f"{name}_count", (("worker_id", "1"),))] == bucket("+Inf")
    assert s[(f"{name}_sum", (("worker_id", "1"),))] == 0.0001 + 0.00011 + 0.001 + 31.0 + 0.002
    assert bucket("+Inf", "0") == 0
    processed = "kafka_eventbus_keyed_pool_messages_processed_total"
    assert s[(processed, (("success", "true"), ("worker_id", "1")))] == 4
    assert s[(processed, (("success", "false"), ("worker_id", "1")))] == 1


def test_a_second_collector_of_the_same_kind_is_refused() -> None:
    registry = CollectorRegistry()
    PrometheusPoolMetrics("actor", 2, registry)
    PrometheusPoolMetrics("keyed", 2, registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusPoolMetrics("actor", 2, registry)
