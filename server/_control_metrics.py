"""The gRPC control plane's Prometheus metrics (names: ``pool._metric_defs.ControlMetric``)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from pool._metric_defs import metric_name

DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


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
                metric_name("control", "grpc_calls_total"),
                "Control-plane gRPC calls handled, by method and status code.",
                ["method", "code"],
                registry=registry,
            ),
            duration=Histogram(
                metric_name("control", "grpc_call_duration_seconds"),
                "Duration of control-plane gRPC calls (whole stream for streams), in seconds.",
                ["method"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            stream_skipped=Counter(
                metric_name("control", "dead_letter_stream_skipped_total"),
                "Dead letters skipped by a slow StreamDeadLetters reader (buffer full).",
                registry=registry,
            ),
        )
        _BY_REGISTRY[registry] = metrics
    return metrics
