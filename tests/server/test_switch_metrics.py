"""server._switch_metrics over a real PoolSwitch with both real pools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pool import (
    ActorPool,
    ActorPoolOptions,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
)
from server._switch_metrics import SWITCH_METRICS, SwitchMetrics
from tests.helpers import assert_eventually
from tests.support.messages import msg


class _Gate:
    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        await self.open.wait()


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
async def gate() -> _Gate:
    return _Gate()


@pytest.fixture
async def switch(gate: _Gate) -> AsyncIterator[PoolSwitch]:
    sw = PoolSwitch(
        KeyedWorkerPool(gate, PoolOptions(size=4, capacity=10)),
        ActorPool(gate, ActorPoolOptions(size=4, capacity=10)),
        mode=PoolMode.KEYED,
        rollout_percent=100.0,
    )
    async with sw:
        yield sw
        gate.open.set()


async def test_mode_rollout_and_switch_count_follow_the_switch(switch: PoolSwitch) -> None:
    registry = CollectorRegistry()
    metrics = SwitchMetrics(switch, registry)
    s = samples(registry)
    assert s["kafka_eventbus_pool_mode", (("mode", "keyed"),)] == 1
    assert s["kafka_eventbus_pool_mode", (("mode", "actor"),)] == 0
    assert s["kafka_eventbus_pool_rollout_percent", ()] == 100
    assert s["kafka_eventbus_pool_switches_total", ()] == 0
    assert s["kafka_eventbus_pool_switch_duration_seconds_count", (("kind", "mode"),)] == 0

    before = time.time()
    metrics.observe_switch(await switch.set_rollout(10), "rollout")
    metrics.observe_switch(await switch.set_mode(PoolMode.ACTOR), "mode")
    s = samples(registry)
    assert s["kafka_eventbus_pool_mode", (("mode", "keyed"),)] == 0
    assert s["kafka_eventbus_pool_mode", (("mode", "actor"),)] == 1
    assert s["kafka_eventbus_pool_rollout_percent", ()] == 10
    assert s["kafka_eventbus_pool_switches_total", ()] == 2
    assert s["kafka_eventbus_pool_last_switch_timestamp_seconds", ()] >= before
    assert s["kafka_eventbus_pool_switch_duration_seconds_count", (("kind", "mode"),)] == 1
    assert s["kafka_eventbus_pool_switch_duration_seconds_count", (("kind", "rollout"),)] == 1


async def test_held_events_are_exposed_during_a_handover(switch: PoolSwitch, gate: _Gate) -> None:
    registry = CollectorRegistry()
    SwitchMetrics(switch, registry)
    await switch.submit(msg("order-1", 0))  # runs in the keyed pool, held by the gate
    await switch.set_mode(PoolMode.ACTOR, wait_timeout=0)
    await switch.submit(msg("order-1", 1))  # must wait for offset 0: held
    assert samples(registry)["kafka_eventbus_pool_held_events", ()] == 1
    gate.open.set()
    await assert_eventually(
        lambda: samples(registry)["kafka_eventbus_pool_held_events", ()] == 0,
        message="held event handed over",
    )


async def test_drains_are_counted_by_outcome_with_duration(switch: PoolSwitch) -> None:
    registry = CollectorRegistry()
    metrics = SwitchMetrics(switch, registry)
    metrics.observe_drain(0.25, complete=True)
    metrics.observe_drain(31.0, complete=False)
    s = samples(registry)
    assert s["kafka_eventbus_pool_drains_total", (("outcome", "complete"),)] == 1
    assert s["kafka_eventbus_pool_drains_total", (("outcome", "timeout"),)] == 1
    assert s["kafka_eventbus_pool_drain_duration_seconds_count", ()] == 2
    assert s["kafka_eventbus_pool_drain_duration_seconds_sum", ()] == pytest.approx(31.25)


async def test_every_declared_name_is_exported(switch: PoolSwitch) -> None:
    registry = CollectorRegistry()
    SwitchMetrics(switch, registry)
    names = {name for name, _ in samples(registry)}
    for declared in SWITCH_METRICS:
        assert any(n == declared or n.startswith(declared + "_") for n in names), declared
