"""The consumer's Prometheus metrics, one collector object.

Names (``pool._metric_defs.ConsumerMetric``) share the
``kafka_eventbus_consumer_`` prefix so dashboards can select them together.
Per-partition series carry ``topic`` and ``partition`` labels and are removed
when the partition is revoked, so a replica only exports the partitions it
owns.
"""

from __future__ import annotations

import contextlib
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pool._metric_defs import metric_name

COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

PAUSE_REASONS: Final = ("operator", "drain", "backpressure")


class ConsumerMetrics:
    """Prometheus metrics of :class:`server.EventConsumer`. Calls never raise."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
        self.registry = registry
        tp = ["topic", "partition"]
        self.lag = Gauge(
            metric_name("consumer", "lag"), "Lag behind the high watermark.", tp, registry=registry
        )
        self.committed = Gauge(
            metric_name("consumer", "committed_offset"),
            "Last committed offset.",
            tp,
            registry=registry,
        )
        self.position = Gauge(
            metric_name("consumer", "position"), "Next offset to fetch.", tp, registry=registry
        )
        self.paused = Gauge(
            metric_name("consumer", "paused_partitions"),
            "Assigned partitions paused, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in PAUSE_REASONS:
            self.paused.labels(reason).set(0)
        self.in_flight = Gauge(
            metric_name("consumer", "in_flight"),
            "Events fetched and not finished.",
            registry=registry,
        )
        self.redeliveries = Counter(
            metric_name("consumer", "redeliveries_total"),
            "Events delivered again at or below an offset this process already dispatched.",
            tp,
            registry=registry,
        )
        self.consumed = Counter(
            metric_name("consumer", "records_consumed_total"),
            "Records fetched from the broker.",
            tp,
            registry=registry,
        )
        self.commit_latency = Histogram(
            metric_name("consumer", "commit_latency_seconds"),
            "Duration of one offset commit request.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_failures = Counter(
            metric_name("consumer", "commit_failures_total"),
            "Failed offset commits.",
            registry=registry,
        )
        self.intake_dead_letters = Counter(
            metric_name("consumer", "intake_dead_letters_total"),
            "Events rejected at intake and dead-lettered, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rebalances = Counter(
            metric_name("consumer", "rebalance_partitions_total"),
            "Partitions assigned or revoked.",
            ["event"],
            registry=registry,
        )
        self.throttled = Gauge(
            metric_name("consumer", "throttled"),
            "1 while intake waits for total in-flight to fall under the low watermark.",
            registry=registry,
        )

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the per-partition gauges of a revoked partition."""
        labels = (topic, str(partition))
        for gauge in (self.lag, self.committed, self.position):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
