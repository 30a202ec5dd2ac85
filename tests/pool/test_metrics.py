"""The Prometheus collector under the original's names, read back from real exposition."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pool import (
    ActorPool,
    ActorPoolOptions,
    DeadLetterReason,
    Handler,
    KeyedWorkerPool,
    Message,
    NoopMetrics,
    PoolOptions,
    PrometheusPoolMetrics,
    RetryPolicy,
)
from pool._metrics import PoolStats
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


def gated_handler(gate: asyncio.Event, *, failing: str) -> Handler:
    """Aggregate ``held`` waits for ``gate``; aggregate ``failing`` always raises."""

    async def handler(m: Message) -> None:
        if m.aggregate_id == "held":
            await gate.wait()
        if m.aggregate_id == failing:
            raise RuntimeError("x")

    return handler


def four_actors(handler: Handler, metrics: PrometheusPoolMetrics) -> ActorPool:
    """Four actors, inboxes of 10, two attempts without backoff."""
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.0, jitter=0.0)
    options = ActorPoolOptions(size=4, capacity=10, retry=retry)
    return ActorPool(handler, options, metrics=metrics)


def assert_the_original_seven(s: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    families = {name for name, _ in s}
    for name in ORIGINAL_SEVEN:
        assert any(f.startswith(name) for f in families), name


async def test_actor_pool_exports_the_original_seven_metrics_per_executor() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusPoolMetrics("actor", 4, registry, per_executor=True)
    gate = asyncio.Event()
    async with four_actors(gated_handler(gate, failing="bad"), metrics) as pool:
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
        assert_the_original_seven(s)
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
    metrics = PrometheusPoolMetrics("keyed", 2, registry, per_executor=True)

    async def handler(m: Message) -> None:
        pass

    async with KeyedWorkerPool(handler, PoolOptions(size=2), metrics=metrics) as pool:
        await (await pool.submit(msg("a", 0)))
        index = pool.executor_for("a")
    s = samples(registry)
    assert s[("kafka_eventbus_keyed_pool_messages_sent_total", (("worker_id", str(index)),))] == 1
    assert ("kafka_eventbus_keyed_pool_inbox_depth", (("worker_id", "0"),)) in s
    assert not any(name.startswith("kafka_eventbus_actor_pool") for name, _ in s)


async def test_by_default_each_name_is_one_series_per_pool_summed_over_executors() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusPoolMetrics("actor", 4, registry)
    gate = asyncio.Event()
    async with four_actors(gated_handler(gate, failing="poison"), metrics) as pool:
        assert len({pool.executor_for(a) for a in ("good", "held", "poison")}) == 3
        await (await pool.submit(msg("good", 0)))
        await (await pool.submit(msg("good", 1)))
        await (await pool.submit(msg("poison", 2)))
        for i in range(3):
            await pool.submit(msg("held", 10 + i))
        await asyncio.sleep(0)
        s = samples(registry)
        assert_the_original_seven(s)
        assert all(dict(labels).keys() <= {"success", "reason", "le"} for _, labels in s), s
        p = "kafka_eventbus_actor_pool_"
        assert s[(f"{p}messages_sent_total", ())] == 6
        assert s[(f"{p}messages_processed_total", (("success", "true"),))] == 2
        assert s[(f"{p}messages_processed_total", (("success", "false"),))] == 2
        assert s[(f"{p}message_latency_seconds_count", ())] == 4
        assert s[(f"{p}message_latency_seconds_bucket", (("le", "+Inf"),))] == 4
        assert s[(f"{p}actor_restarted_total", ())] == 2
        assert s[(f"{p}dead_letters_total", (("reason", "retries-exhausted"),))] == 1
        # Depth is the pool's total; utilization, the fullest executor's (3 of 10).
        assert s[(f"{p}inbox_depth", ())] == 3
        assert s[(f"{p}inbox_utilization", ())] == 0.3
        assert s[(f"{p}inbox_depth_max", ())] == 3
        executors = f"{p}inbox_depth_executors"
        assert s[(executors, (("le", "0.0"),))] == 3
        assert s[(executors, (("le", "2.0"),))] == 3
        assert s[(executors, (("le", "5.0"),))] == 4
        assert s[(executors, (("le", "+Inf"),))] == 4
        gate.set()
        await pool.drain(5)
        s = samples(registry)
        assert s[(f"{p}inbox_depth", ())] == 0
        assert s[(f"{p}inbox_depth_max", ())] == 0
        assert s[(executors, (("le", "0.0"),))] == 4


def test_default_latency_histogram_sums_the_executors_buckets() -> None:
    registry = CollectorRegistry()
    m = PrometheusPoolMetrics("keyed", 3, registry)
    m.message_processed(0, True, 0.0001)
    m.message_processed(1, True, 0.001)
    m.message_processed(2, False, 0.002)
    m.message_processed(2, True, 31.0)
    s = samples(registry)
    name = "kafka_eventbus_keyed_pool_message_latency_seconds"

    def bucket(le: str) -> float:
        return s[(f"{name}_bucket", (("le", le),))]

    assert bucket("0.0001") == 1
    assert bucket("0.001") == 2
    assert bucket("0.0025") == 3
    assert bucket("30.0") == 3
    assert bucket("+Inf") == 4
    assert s[(f"{name}_count", ())] == 4
    assert s[(f"{name}_sum", ())] == pytest.approx(0.0001 + 0.001 + 0.002 + 31.0)
    processed = "kafka_eventbus_keyed_pool_messages_processed_total"
    assert s[(processed, (("success", "true"),))] == 3
    assert s[(processed, (("success", "false"),))] == 1
    assert not any(name.startswith("kafka_eventbus_keyed_pool_actor_") for name, _ in s)


@pytest.mark.parametrize("per_executor", [False, True])
def test_depth_max_and_distribution_count_executors_by_depth(per_executor: bool) -> None:
    registry = CollectorRegistry()
    m = PrometheusPoolMetrics("actor", 6, registry, per_executor=per_executor)
    for executor, depth in enumerate((0, 1, 3, 1000, 7, 0)):
        m.inbox_depth(executor, depth, 1000)
    s = samples(registry)
    p = "kafka_eventbus_actor_pool_"
    assert s[(f"{p}inbox_depth_max", ())] == 1000
    counts = {
        dict(labels)["le"]: v
        for (name, labels), v in s.items()
        if name == f"{p}inbox_depth_executors"
    }
    assert counts == {
        "0.0": 2, "1.0": 3, "2.0": 3, "5.0": 4, "10.0": 5, "20.0": 5, "50.0": 5, "100.0": 5,
        "200.0": 5, "500.0": 5, "1000.0": 6, "2000.0": 6, "5000.0": 6, "10000.0": 6, "+Inf": 6,
    }  # fmt: skip
    if per_executor:
        assert s[(f"{p}inbox_depth", (("actor_id", "3"),))] == 1000
        assert s[(f"{p}inbox_utilization", (("actor_id", "2"),))] == 0.003
    else:
        assert s[(f"{p}inbox_depth", ())] == 1011
        assert s[(f"{p}inbox_utilization", ())] == 1.0


def _series(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_two_pools_of_256_export_under_a_hundred_series_each_by_default() -> None:
    """Every executor busy and every reason seen: still one series per name and labels."""
    registry = CollectorRegistry()
    per_executor = CollectorRegistry()
    for kind in ("actor", "keyed"):
        for m in (
            PrometheusPoolMetrics(kind, 256, registry),
            PrometheusPoolMetrics(kind, 256, per_executor, per_executor=True),
        ):
            for executor in range(256):
                m.message_sent(executor)
                m.message_processed(executor, executor % 2 == 0, executor / 1000)
                m.inbox_depth(executor, executor, 1000)
                m.actor_restarted(executor)
                for reason in DeadLetterReason:
                    m.dead_letter(executor, reason.value)
    default = _series(registry)
    assert len(default) < 2 * 100, len(default)
    assert not [line for line in default if "actor_id" in line or "worker_id" in line]
    detailed = _series(per_executor)
    assert len(detailed) > 256 * 2 * 20, len(detailed)
    assert sum('actor_id="255"' in line for line in detailed) > 20
    assert sum('worker_id="255"' in line for line in detailed) > 20


def test_noop_metrics_accepts_every_call() -> None:
    m = NoopMetrics()
    m.message_sent(0)
    m.message_processed(0, True, 0.1)
    m.inbox_depth(0, 1, 2)
    m.actor_restarted(0)
    m.dead_letter(0, "x")


def test_latency_histogram_is_exact_and_its_count_is_the_inf_bucket() -> None:
    registry = CollectorRegistry()
    m = PrometheusPoolMetrics("keyed", 2, registry, per_executor=True)
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


class _Counting(PrometheusPoolMetrics):
    """Counts the per-event calls it gets; ``bindable=False`` refuses to bind,
    so its pool tells it everything per event (any collector without ``bind``)."""

    def __init__(self, *args: Any, bindable: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bindable = bindable
        self.calls: Counter[str] = Counter()

    def bind(self, source: PoolStats) -> bool:
        return self.bindable and super().bind(source)

    def message_sent(self, executor: int) -> None:
        self.calls["sent"] += 1
        super().message_sent(executor)

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        self.calls["processed"] += 1
        super().message_processed(executor, success, duration)

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        self.calls["depth"] += 1
        super().inbox_depth(executor, depth, capacity)


@pytest.mark.parametrize("per_executor", [False, True])
async def test_a_collector_bound_to_its_pool_gets_no_call_per_event_and_exports_the_same(
    per_executor: bool,
) -> None:
    """The pool keeps the hot counts (sent, attempts, latency, depth) itself for a
    bound collector: the exposition is what a collector told per event shows."""
    gate = asyncio.Event()

    async def handler(m: Message) -> None:
        if m.aggregate_id == "held":
            await gate.wait()
        if m.aggregate_id == "poison":
            raise RuntimeError("x")

    retry = RetryPolicy(max_attempts=2, initial_backoff=0.0, jitter=0.0)
    exposed = []
    collectors = []
    for bindable in (True, False):
        registry = CollectorRegistry()
        metrics = _Counting("actor", 4, registry, bindable=bindable, per_executor=per_executor)
        collectors.append(metrics)
        pool = ActorPool(
            handler, ActorPoolOptions(size=4, capacity=10, retry=retry), metrics=metrics
        )
        async with pool:
            for i in range(20):
                await (await pool.submit(msg(f"good-{i % 5}", i)))
            await (await pool.submit(msg("poison", 20)))
            for i in range(3):
                await pool.submit(msg("held", 30 + i))
            await asyncio.sleep(0)
            # Durations differ between the two runs: only the latency counts compare.
            exposed.append(
                {
                    k: v
                    for k, v in samples(registry).items()
                    if not k[0].endswith(("_sum", "_bucket"))
                }
            )
            gate.set()
            await pool.drain(5)
            gate.clear()
    bound, told = collectors
    assert bound.calls == {}
    assert told.calls["sent"] == 24
    assert told.calls["processed"] == 25
    assert told.calls["depth"] > 0
    assert exposed[0] == exposed[1]
    p = "kafka_eventbus_actor_pool_"
    assert sum(v for (name, _), v in exposed[0].items() if name == f"{p}messages_sent_total") == 24
    assert sum(v for (name, _), v in exposed[0].items() if name == f"{p}inbox_depth") == 3


def test_a_collector_binds_to_one_pool_of_its_size() -> None:
    async def handler(m: Message) -> None:
        pass

    metrics = _Counting("keyed", 2, CollectorRegistry(), bindable=True)
    other_size = KeyedWorkerPool(handler, PoolOptions(size=3), metrics=metrics)
    first = KeyedWorkerPool(handler, PoolOptions(size=2), metrics=metrics)
    second = KeyedWorkerPool(handler, PoolOptions(size=2), metrics=metrics)
    assert metrics._source is first
    assert not first._report_each
    assert other_size._report_each  # told per event, as any collector without bind
    assert second._report_each


async def test_a_bound_collector_buckets_each_attempt_as_one_told_per_event() -> None:
    """The pool's own latency buckets (a bound collector's) place each duration
    where ``message_processed`` does, bounds included."""
    durations = [0.00005, 0.0001, 0.00011, 0.003, 0.003, 40.0]
    ticks: list[float] = []
    for d in durations:  # start and end of each attempt, in call order
        ticks += [0.0, d]  # exact differences
    clock = iter(ticks)

    async def handler(m: Message) -> None:
        pass

    bound_registry, told_registry = CollectorRegistry(), CollectorRegistry()
    bound = PrometheusPoolMetrics("keyed", 1, bound_registry)
    told = PrometheusPoolMetrics("keyed", 1, told_registry)
    pool = KeyedWorkerPool(handler, PoolOptions(size=1), metrics=bound, clock=lambda: next(clock))
    async with pool:
        for i in range(len(durations)):
            await (await pool.submit(msg("a", i)))
    for d in durations:
        told.message_processed(0, True, d)
        told.message_sent(0)
    assert samples(bound_registry) == samples(told_registry)
