"""Metric names of the pool, typed so a typo is a type error.

The actor pool's seven names are the Go original's, unprefixed by client ID,
so its PromQL and dashboards keep working. The keyed pool mirrors them under
``kafka_eventbus_keyed_pool_`` with a ``worker_id`` label.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

PoolKind = Literal["actor", "keyed"]

ACTOR_PREFIX: Final = "kafka_eventbus_actor_pool_"
KEYED_PREFIX: Final = "kafka_eventbus_keyed_pool_"

MetricSuffix = Literal[
    # Counter: events accepted into an executor's queue/inbox.
    "messages_sent_total",
    # Counter, label ``success`` ("true"/"false"): handler attempts that finished.
    "messages_processed_total",
    # Histogram: time from the start of a handler attempt to its end.
    "message_latency_seconds",
    # Gauge: events queued or running in an executor, read exactly at scrape.
    "inbox_depth",
    # Gauge: inbox_depth / capacity.
    "inbox_utilization",
    # Counter: supervisor restarts of an actor (the keyed pool has none: not exported).
    "actor_restarted_total",
    # Counter, label ``reason``: events that became dead letters.
    "dead_letters_total",
]

SUFFIXES: Final[tuple[MetricSuffix, ...]] = get_args(MetricSuffix)

# Sub-millisecond to tens of seconds.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def metric_name(kind: PoolKind, suffix: MetricSuffix) -> str:
    """Full exposition name (counters without their ``_total``: prometheus-client adds it)."""
    return (ACTOR_PREFIX if kind == "actor" else KEYED_PREFIX) + suffix


def label_name(kind: PoolKind) -> str:
    return "actor_id" if kind == "actor" else "worker_id"
