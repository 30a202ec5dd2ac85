"""The metrics collector protocol, a no-op collector and a Prometheus one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pool._metric_defs import LATENCY_BUCKETS, PoolKind, label_name, metric_name


class PoolMetrics(Protocol):
    """What a pool reports. Every call is synchronous, cheap and never raises.

    The five calls of the Go original; ``executor`` is the worker/actor index.
    """

    def message_sent(self, executor: int) -> None:
        """An event entered the executor's queue."""

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        """A handler attempt ended after ``duration`` seconds."""

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        """The executor's depth (queued + running) is now ``depth`` of ``capacity``."""

    def actor_restarted(self, executor: int) -> None:
        """The supervisor restarted the actor."""

    def dead_letter(self, executor: int, reason: str) -> None:
        """An event of the executor became a dead letter."""


class NoopMetrics:
    """Discards everything (tests, benchmarks, embedding without Prometheus)."""

    def message_sent(self, executor: int) -> None:
        pass

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        pass

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        pass

    def actor_restarted(self, executor: int) -> None:
        pass

    def dead_letter(self, executor: int, reason: str) -> None:
        pass


class PrometheusPoolMetrics:
    """Prometheus implementation under DESIGN.md's names.

    Counters and the latency histogram are prometheus-client metrics with their
    labelled children resolved once per executor. Depth and utilization are not
    gauges updated on every event (the original's gauge drifted): the latest
    absolute depth is stored per executor and exposed at scrape time by a
    collector, so the value is exact and the hot path pays a list store.
    """

    def __init__(
        self, kind: PoolKind, size: int, registry: CollectorRegistry | None = None
    ) -> None:
        from prometheus_client import REGISTRY

        self.kind: PoolKind = kind
        self.size = size
        registry = REGISTRY if registry is None else registry
        label = label_name(kind)
        noun = "an actor" if kind == "actor" else "a worker"
        sent = Counter(
            metric_name(kind, "messages_sent_total"),
            f"Events accepted into {noun}'s queue.",
            [label],
            registry=registry,
        )
        processed = Counter(
            metric_name(kind, "messages_processed_total"),
            f"Handler attempts finished by {noun}, by success.",
            [label, "success"],
            registry=registry,
        )
        latency = Histogram(
            metric_name(kind, "message_latency_seconds"),
            f"Duration of one handler attempt in {noun}, in seconds (not time queued).",
            [label],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Only actors are restarted: the keyed pool exports no restart series.
        self._restarted = (
            Counter(
                metric_name(kind, "actor_restarted_total"),
                "Supervisor restarts of an actor after its handler crashed.",
                [label],
                registry=registry,
            )
            if kind == "actor"
            else None
        )
        self._dead = Counter(
            metric_name(kind, "dead_letters_total"),
            f"Events of {noun} that became dead letters, by reason.",
            [label, "reason"],
            registry=registry,
        )
        ids = [str(i) for i in range(size)]
        self._ids = ids
        self._sent = [sent.labels(i) for i in ids]
        self._ok = [processed.labels(i, "true") for i in ids]
        self._failed = [processed.labels(i, "false") for i in ids]
        self._latency = [latency.labels(i) for i in ids]
        # Pre-create restart series so rate() has a zero baseline.
        for i in ids:
            if self._restarted is not None:
                self._restarted.labels(i)
        self._depth = [0] * size
        self._capacity = [1] * size
        registry.register(_DepthCollector(self))

    def message_sent(self, executor: int) -> None:
        self._sent[executor].inc()

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        (self._ok if success else self._failed)[executor].inc()
        self._latency[executor].observe(duration)

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        self._depth[executor] = depth
        self._capacity[executor] = capacity

    def actor_restarted(self, executor: int) -> None:
        if self._restarted is not None:
            self._restarted.labels(self._ids[executor]).inc()

    def dead_letter(self, executor: int, reason: str) -> None:
        self._dead.labels(self._ids[executor], reason).inc()

    def depth_samples(self) -> Iterable[tuple[str, int, int]]:
        return zip(self._ids, self._depth, self._capacity, strict=True)


class _DepthCollector(Collector):
    def __init__(self, owner: PrometheusPoolMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        owner = self._owner
        label = label_name(owner.kind)
        where = "an actor's inbox" if owner.kind == "actor" else "a worker's queue"
        depth = GaugeMetricFamily(
            metric_name(owner.kind, "inbox_depth"),
            f"Events queued or running in {where}, read at scrape time.",
            labels=[label],
        )
        util = GaugeMetricFamily(
            metric_name(owner.kind, "inbox_utilization"),
            f"Depth divided by capacity of {where} (0..1).",
            labels=[label],
        )
        for ident, d, cap in owner.depth_samples():
            depth.add_metric([ident], d)
            util.add_metric([ident], d / cap if cap else 0.0)
        yield depth
        yield util

    def describe(self) -> Iterator[Metric]:
        return iter(())
