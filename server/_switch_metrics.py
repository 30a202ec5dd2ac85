"""Metrics of the mode switch and of drains: mode, rollout, switches, durations.

Mode, rollout, change count and last-change time are read from the switch at
scrape time (a collector: always exact, nothing to keep in sync). Durations
are only known to whoever makes the change, so the caller reports them:
:meth:`SwitchMetrics.observe_switch` with the ``SwitchResult`` of
``set_mode``/``set_rollout``, :meth:`SwitchMetrics.observe_drain` when a drain
ends.

Wiring (one registry per service)::

    metrics = SwitchMetrics(switch, registry)
    switch.add_change_listener(metrics.on_change)   # every set_mode/set_rollout
    metrics.observe_drain(took_s, complete=True)     # when a drain ends
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pool import PoolMode
from pool._metric_defs import metric_name, names_of
from server._control import ModeSwitch, SwitchOutcome

__all__ = ["SWITCH_METRICS", "SwitchKind", "SwitchMetrics"]

SwitchKind = Literal["mode", "rollout"]

#: Every name this module exports, derived from ``pool._metric_defs.SwitchMetric``.
SWITCH_METRICS: Final = names_of("switch")

SWITCH_BUCKETS: Final = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
DRAIN_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class SwitchMetrics:
    """Prometheus metrics of a :class:`pool.PoolSwitch`; calls never raise."""

    def __init__(self, switch: ModeSwitch, registry: CollectorRegistry) -> None:
        self._switch = switch
        self._duration = Histogram(
            metric_name("switch", "switch_duration_seconds"),
            "Duration of a mode or rollout change until every waiting aggregate was handed over.",
            ["kind"],
            buckets=SWITCH_BUCKETS,
            registry=registry,
        )
        for kind in ("mode", "rollout"):
            self._duration.labels(kind)
        self._drains = Counter(
            metric_name("switch", "drains_total"),
            "Drains ended, by outcome (complete or timeout).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("complete", "timeout"):
            self._drains.labels(outcome)
        self._drain_duration = Histogram(
            metric_name("switch", "drain_duration_seconds"),
            "Duration of a drain, in seconds.",
            buckets=DRAIN_BUCKETS,
            registry=registry,
        )
        registry.register(_SwitchCollector(switch))

    def observe_switch(self, result: SwitchOutcome, kind: SwitchKind) -> None:
        """Record a ``set_mode`` (``kind="mode"``) or ``set_rollout`` result."""
        self._duration.labels(kind).observe(max(result.took_s, 0.0))

    def on_change(self, result: SwitchOutcome) -> None:
        """Change listener for ``PoolSwitch.add_change_listener``: a change that
        moved the mode counts as ``"mode"``, one that kept it as ``"rollout"``."""
        self.observe_switch(result, "mode" if result.previous_mode != result.mode else "rollout")

    def observe_drain(self, took_s: float, *, complete: bool) -> None:
        """Record a drain that ended (``complete=False``: it timed out)."""
        self._drains.labels("complete" if complete else "timeout").inc()
        self._drain_duration.observe(max(took_s, 0.0))


class _SwitchCollector(Collector):
    def __init__(self, switch: ModeSwitch) -> None:
        self._switch = switch

    def collect(self) -> Iterator[Metric]:
        sw = self._switch
        mode = GaugeMetricFamily(
            metric_name("switch", "mode"),
            "1 for the pool mode in force (keyed or actor), 0 for the other.",
            labels=["mode"],
        )
        for candidate in PoolMode:
            mode.add_metric([candidate.value], 1.0 if sw.mode is candidate else 0.0)
        yield mode
        yield GaugeMetricFamily(
            metric_name("switch", "rollout_percent"),
            "Share (0-100) of aggregates routed to the actor pool in ACTOR mode.",
            value=sw.rollout_percent,
        )
        yield CounterMetricFamily(
            metric_name("switch", "switches_total"),
            "Mode or rollout changes since start.",
            value=sw.generation,
        )
        yield GaugeMetricFamily(
            metric_name("switch", "last_switch_timestamp_seconds"),
            "Unix time of the last mode or rollout change (start time if none).",
            value=sw.since,
        )
        held = getattr(sw, "held", None)
        if isinstance(held, int):
            yield GaugeMetricFamily(
                metric_name("switch", "held_events"),
                "Events held for a handover: waiting for their aggregate's earlier events "
                "in the other pool.",
                value=held,
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())
