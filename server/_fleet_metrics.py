"""Metrics of fleet control, read from :class:`server._fleet.FleetControl` at
scrape time (a collector: always exact, nothing to keep in sync)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pool._metric_defs import metric_name, names_of
from server._fleet import FleetControl

__all__ = ["FLEET_METRICS", "FleetMetrics"]

#: Every name this module exports, derived from ``pool._metric_defs.FleetMetric``.
FLEET_METRICS: Final = names_of("fleet")
WRITE_OUTCOMES: Final = ("accepted", "replayed", "precondition", "conflict")


class FleetMetrics:
    """Registers the fleet collector on ``registry``."""

    def __init__(
        self,
        fleet: FleetControl,
        registry: CollectorRegistry,
        differences: Callable[[], list[str]],
    ) -> None:
        registry.register(_FleetCollector(fleet, differences))


class _FleetCollector(Collector):
    def __init__(self, fleet: FleetControl, differences: Callable[[], list[str]]) -> None:
        self._fleet = fleet
        self._differences = differences

    def collect(self) -> Iterator[Metric]:
        f = self._fleet
        yield GaugeMetricFamily(
            metric_name("fleet", "desired_generation"),
            "Generation of the fleet's desired state as this replica read it (0: none yet).",
            value=f.desired.generation,
        )
        yield GaugeMetricFamily(
            metric_name("fleet", "applied_generation"),
            "Generation of the fleet's desired state this replica last applied.",
            value=f.applied_generation,
        )
        try:
            diverged = bool(self._differences())
        except Exception:  # noqa: BLE001 - a scrape never fails on a half-started service
            diverged = False
        yield GaugeMetricFamily(
            metric_name("fleet", "diverged"),
            "1 when this replica differs from the fleet's desired state, else 0.",
            value=1.0 if diverged else 0.0,
        )
        yield GaugeMetricFamily(
            metric_name("fleet", "degraded"),
            "1 when the control topic cannot be read (running on the configuration), else 0.",
            value=1.0 if f.degraded is not None else 0.0,
        )
        live = len(f.live_reports())
        replicas = GaugeMetricFamily(
            metric_name("fleet", "replicas"),
            "Replicas known from their reports on the control topic, live or stale.",
            labels=["kind"],
        )
        replicas.add_metric(["live"], live)
        replicas.add_metric(["stale"], len(f.reports) - live)
        yield replicas
        writes = CounterMetricFamily(
            metric_name("fleet", "writes_total"),
            "Fleet writes through this replica, by outcome.",
            labels=["outcome"],
        )
        for outcome in WRITE_OUTCOMES:
            writes.add_metric([outcome], f.writes.get(outcome, 0))
        yield writes

    def describe(self) -> Iterator[Metric]:
        return iter(())
