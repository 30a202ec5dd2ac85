"""Metric names of the gRPC control plane, typed, and their Prometheus collectors."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

ControlMetricName = Literal[
    # Counter, labels ``method`` (e.g. "SetPoolMode") and ``code`` (e.g. "OK",
    # "INVALID_ARGUMENT"): control-plane calls handled, like grpc_server_handled_total.
    "pool_control_grpc_calls_total",
    # Histogram, label ``method``: seconds from the call's arrival to its status
    # (a whole stream for StreamDeadLetters and Drain).
    "pool_control_grpc_call_duration_seconds",
    # Counter: dead letters a StreamDeadLetters reader skipped
    # because its buffer was full (a slow reader).
    "pool_control_dead_letter_stream_skipped_total",
]

CALLS: Final[ControlMetricName] = "pool_control_grpc_calls_total"
DURATION: Final[ControlMetricName] = "pool_control_grpc_call_duration_seconds"
STREAM_SKIPPED: Final[ControlMetricName] = "pool_control_dead_letter_stream_skipped_total"

DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


def _counter_name(name: ControlMetricName) -> str:
    # prometheus-client appends ``_total`` to counters itself.
    return name.removesuffix("_total")


@dataclass(frozen=True, slots=True)
class ControlMetrics:
    calls: Counter
    duration: Histogram
    stream_skipped: Counter


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, ControlMetrics] = (
    weakref.WeakKeyDictionary()
)


def control_metrics(registry: CollectorRegistry | None = None) -> ControlMetrics:
    """The control-plane metrics registered in ``registry`` (default: the global one).

    Created once per registry, so several servers in one process (tests) share them.
    """
    registry = REGISTRY if registry is None else registry
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = ControlMetrics(
            calls=Counter(
                _counter_name(CALLS),
                "Control-plane gRPC calls handled, by method and status code.",
                ["method", "code"],
                registry=registry,
            ),
            duration=Histogram(
                DURATION,
                "Duration of control-plane gRPC calls (whole stream for streams), in seconds.",
                ["method"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            stream_skipped=Counter(
                _counter_name(STREAM_SKIPPED),
                "Dead letters skipped by a slow StreamDeadLetters reader (buffer full).",
                registry=registry,
            ),
        )
        _BY_REGISTRY[registry] = metrics
    return metrics
