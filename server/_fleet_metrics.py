"""Metrics of fleet control, read from :class:`server._fleet.FleetControl` at
scrape time (a collector: always exact, nothing to keep in sync)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server._fleet import FleetControl

__all__ = ["FLEET_METRICS", "FleetMetrics"]

FleetMetricName = Literal[
    # Gauge: generation of the fleet's desired state as this replica read it
    # (0 = none written yet).
    "kafka_eventbus_fleet_desired_generation",
    # Gauge: generation this replica last applied.
    "kafka_eventbus_fleet_applied_generation",
    # Gauge: 1 when this replica differs from the fleet's desired state
    # (another generation, or a replica-scope change), else 0.
    "kafka_eventbus_fleet_diverged",
    # Gauge: 1 when the control topic cannot be read (running on the
    # configuration or the last state read, retrying), else 0.
    "kafka_eventbus_fleet_degraded",
    # Gauge {kind}: replicas known from their reports, "live" or "stale".
    "kafka_eventbus_fleet_replicas",
    # Counter {outcome}: fleet writes through this replica: accepted,
    # replayed, precondition, conflict.
    "kafka_eventbus_fleet_writes_total",
]

FLEET_METRICS: Final[tuple[FleetMetricName, ...]] = get_args(FleetMetricName)
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
            "kafka_eventbus_fleet_desired_generation",
            "Generation of the fleet's desired state as this replica read it (0: none yet).",
            value=f.desired.generation,
        )
        yield GaugeMetricFamily(
            "kafka_eventbus_fleet_applied_generation",
            "Generation of the fleet's desired state this replica last applied.",
            value=f.applied_generation,
        )
        try:
            diverged = bool(self._differences())
        except Exception:  # noqa: BLE001 - a scrape never fails on a half-started service
            diverged = False
        yield GaugeMetricFamily(
            "kafka_eventbus_fleet_diverged",
            "1 when this replica differs from the fleet's desired state, else 0.",
            value=1.0 if diverged else 0.0,
        )
        yield GaugeMetricFamily(
            "kafka_eventbus_fleet_degraded",
            "1 when the control topic cannot be read (running on the configuration), else 0.",
            value=1.0 if f.degraded is not None else 0.0,
        )
        live = len(f.live_reports())
        replicas = GaugeMetricFamily(
            "kafka_eventbus_fleet_replicas",
            "Replicas known from their reports on the control topic, live or stale.",
            labels=["kind"],
        )
        replicas.add_metric(["live"], live)
        replicas.add_metric(["stale"], len(f.reports) - live)
        yield replicas
        writes = CounterMetricFamily(
            "kafka_eventbus_fleet_writes",
            "Fleet writes through this replica, by outcome.",
            labels=["outcome"],
        )
        for outcome in WRITE_OUTCOMES:
            writes.add_metric([outcome], f.writes.get(outcome, 0))
        yield writes

    def describe(self) -> Iterator[Metric]:
        return iter(())
