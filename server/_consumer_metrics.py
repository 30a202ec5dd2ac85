"""The consumer's Prometheus metrics: typed names, one collector object.

Names share the ``kafka_eventbus_consumer_`` prefix so dashboards can select
them together. Per-partition series carry ``topic`` and ``partition`` labels
and are removed when the partition is revoked, so a replica only exports the
partitions it owns.
"""

from __future__ import annotations

import contextlib
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX: Final = "kafka_eventbus_consumer_"

ConsumerMetricSuffix = Literal[
    # Gauge {topic, partition}: high watermark - committed offset (events not yet committed).
    "lag",
    # Gauge {topic, partition}: the last offset committed by this replica (next to read).
    "committed_offset",
    # Gauge {topic, partition}: the next offset this replica will fetch.
    "position",
    # Gauge {reason}: assigned partitions paused, by reason (operator, drain, backpressure).
    "paused_partitions",
    # Gauge: events fetched and not yet finished (queued, running or awaiting a DLQ ack).
    "in_flight",
    # Counter {topic, partition}: events delivered again at or below an offset this
    # process already dispatched (after a rebalance or a seek). Not across restarts.
    "redeliveries_total",
    # Counter {topic, partition}: records fetched from the broker.
    "records_consumed_total",
    # Histogram: duration of one offset commit request.
    "commit_latency_seconds",
    # Counter: offset commits that failed (the next commit retries them).
    "commit_failures_total",
    # Counter {reason}: events rejected at intake (bad envelope, ID, size) and dead-lettered.
    "intake_dead_letters_total",
    # Counter {event}: partitions assigned / revoked.
    "rebalance_partitions_total",
    # Gauge: 1 while intake is throttled because total in-flight reached maxInFlight.
    "throttled",
]

COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

PAUSE_REASONS: Final = ("operator", "drain", "backpressure")


def consumer_metric(suffix: ConsumerMetricSuffix) -> str:
    """Exposition name (counters without ``_total``: prometheus-client adds it)."""
    name = PREFIX + suffix
    return name.removesuffix("_total")


class ConsumerMetrics:
    """Prometheus metrics of :class:`server.EventConsumer`. Calls never raise."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
        self.registry = registry
        tp = ["topic", "partition"]
        self.lag = Gauge(
            consumer_metric("lag"), "Lag behind the high watermark.", tp, registry=registry
        )
        self.committed = Gauge(
            consumer_metric("committed_offset"), "Last committed offset.", tp, registry=registry
        )
        self.position = Gauge(
            consumer_metric("position"), "Next offset to fetch.", tp, registry=registry
        )
        self.paused = Gauge(
            consumer_metric("paused_partitions"),
            "Assigned partitions paused, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in PAUSE_REASONS:
            self.paused.labels(reason).set(0)
        self.in_flight = Gauge(
            consumer_metric("in_flight"), "Events fetched and not finished.", registry=registry
        )
        self.redeliveries = Counter(
            consumer_metric("redeliveries_total"),
            "Events delivered again at or below an offset this process already dispatched.",
            tp,
            registry=registry,
        )
        self.consumed = Counter(
            consumer_metric("records_consumed_total"),
            "Records fetched from the broker.",
            tp,
            registry=registry,
        )
        self.commit_latency = Histogram(
            consumer_metric("commit_latency_seconds"),
            "Duration of one offset commit request.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_failures = Counter(
            consumer_metric("commit_failures_total"), "Failed offset commits.", registry=registry
        )
        self.intake_dead_letters = Counter(
            consumer_metric("intake_dead_letters_total"),
            "Events rejected at intake and dead-lettered, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rebalances = Counter(
            consumer_metric("rebalance_partitions_total"),
            "Partitions assigned or revoked.",
            ["event"],
            registry=registry,
        )
        self.throttled = Gauge(
            consumer_metric("throttled"),
            "1 while intake waits for total in-flight to fall under the low watermark.",
            registry=registry,
        )

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the per-partition gauges of a revoked partition."""
        labels = (topic, str(partition))
        for gauge in (self.lag, self.committed, self.position):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
