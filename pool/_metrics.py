"""The metrics collector protocol, a no-op collector and a Prometheus one."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pool._metric_defs import (
    DEPTH_BUCKETS,
    LATENCY_BUCKETS,
    PoolKind,
    label_name,
    metric_name,
)


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


class PoolStats(Protocol):
    """The counts a pool keeps itself, for a collector bound to it
    (:meth:`PrometheusPoolMetrics.bind`), by executor index.

    Read at scrape time, from the scrape's thread: snapshots of the pool's own
    per-executor ints (C-level list copies, atomic under the GIL), never a lock
    on the event loop.
    """

    @property
    def capacity(self) -> int:
        """Bound on each executor's depth."""

    def depths(self) -> list[int]:
        """Each executor's depth (queued + running + held)."""

    def sent_counts(self) -> list[int]:
        """Events accepted into each executor's queue."""

    def attempt_counts(self) -> tuple[list[int], list[int]]:
        """Handler attempts that succeeded, and that failed, per executor."""

    def latency_histograms(self) -> tuple[list[list[int]], list[float]]:
        """Per executor: attempts per bucket of ``LATENCY_BUCKETS`` (not
        cumulative; the last slot counts those above the largest bound), and
        the sum of their durations in seconds."""


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
    """Prometheus implementation under the original's names (docs/operations.md).

    The hot path (two or three calls per event) keeps plain per-executor
    Python counters and latency bucket counts: an ``int`` increment per call,
    where prometheus-client's labelled children take a lock and do float
    arithmetic per call (measured: ~3 µs per event, a third of the consumer's
    budget at 100k events/s). A collector turns them into the families at
    scrape time: counters ``*_total``, the latency histogram (its ``_count``
    is the ``+Inf`` bucket by construction), and the depth gauges (the latest
    absolute depth per executor: exact, never a gauge that drifts). Every call
    comes from the pools' event-loop thread (single writer); the scrape thread
    reads snapshots of the lists.

    By default the collector sums the executors into one series per name and
    label set (a pool of 256 exports about 45 series, not 6 600): depth is the
    pool's total, utilization the fullest executor's, and two more gauges give
    the deepest executor's depth and how many executors are at each depth.
    ``per_executor=True`` exports the seven original names per executor
    instead, with an ``actor_id``/``worker_id`` label (the hot path is the
    same either way).

    Bound to the pool it measures (the pool calls :meth:`bind`), it reads
    the hot counts from the pool at scrape time instead of being told per
    event: events sent, handler attempts and their latency histogram (the
    pool keeps them as plain per-executor ints, over the same
    ``LATENCY_BUCKETS``), and the depths, read from the queues themselves
    when Prometheus asks. The pool then makes none of the per-event calls
    (``message_sent``, ``message_processed``, ``inbox_depth``); restarts and
    dead letters are still reported as they happen.
    """

    def __init__(
        self,
        kind: PoolKind,
        size: int,
        registry: CollectorRegistry | None = None,
        *,
        per_executor: bool = False,
    ) -> None:
        from prometheus_client import REGISTRY

        self.kind: PoolKind = kind
        self.size = size
        self.per_executor = per_executor
        registry = REGISTRY if registry is None else registry
        self._ids = [str(i) for i in range(size)]
        self._sent = [0] * size
        self._ok = [0] * size
        self._failed = [0] * size
        # Per executor: observations per latency bucket (not cumulative), the
        # last slot for those above the largest bound (+Inf); and their sum.
        self._buckets = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in range(size)]
        self._latency_sum = [0.0] * size
        # Only actors are restarted: the keyed pool exports no restart series.
        self._restarts: list[int] | None = [0] * size if kind == "actor" else None
        # (executor, reason) -> count, created on the first dead letter.
        self._dead: dict[tuple[int, str], int] = {}
        self._depth = [0] * size
        self._capacity = [1] * size
        self._source: PoolStats | None = None
        registry.register(_PoolCollector(self))

    def bind(self, source: PoolStats) -> bool:
        """Read the hot counts from ``source`` (the pool being measured) at scrape
        time; see the class docstring. True when bound: the pool then makes no
        per-event call. A collector binds to one pool, of its size; for a second
        one (or another size) it returns False and nothing changes."""
        if self._source is not None or len(source.depths()) != self.size:
            return False
        self._source = source
        return True

    def message_sent(self, executor: int) -> None:
        self._sent[executor] += 1

    def message_processed(self, executor: int, success: bool, duration: float) -> None:
        if success:
            self._ok[executor] += 1
        else:
            self._failed[executor] += 1
        # The first bound >= duration: Prometheus buckets are "less or equal".
        self._buckets[executor][bisect_left(LATENCY_BUCKETS, duration)] += 1
        self._latency_sum[executor] += duration

    def inbox_depth(self, executor: int, depth: int, capacity: int) -> None:
        self._depth[executor] = depth
        self._capacity[executor] = capacity

    def actor_restarted(self, executor: int) -> None:
        if self._restarts is not None:
            self._restarts[executor] += 1

    def dead_letter(self, executor: int, reason: str) -> None:
        key = (executor, reason)
        self._dead[key] = self._dead.get(key, 0) + 1

    def depth_samples(self) -> Iterable[tuple[str, int, int]]:
        depths, capacities = self._depths()
        return zip(self._ids, depths, capacities, strict=True)

    def _depths(self) -> tuple[list[int], list[int]]:
        """Snapshots of each executor's depth and capacity."""
        source = self._source
        if source is None:
            return list(self._depth), list(self._capacity)
        return source.depths(), [source.capacity] * self.size

    def _hot_counts(
        self,
    ) -> tuple[list[int], list[int], list[int], list[list[int]], list[float]]:
        """Snapshots of sent, succeeded and failed attempts, latency buckets and sums."""
        source = self._source
        if source is None:
            return (
                list(self._sent),
                list(self._ok),
                list(self._failed),
                [b[:] for b in self._buckets],
                list(self._latency_sum),
            )
        ok, failed = source.attempt_counts()
        buckets, sums = source.latency_histograms()
        return source.sent_counts(), ok, failed, buckets, sums


#: ``le`` label values, formatted as prometheus-client formats its own buckets.
_LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
_DEPTH_LE = [floatToGoString(b) for b in DEPTH_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


class _Families:
    """The empty metric families of one pool kind, in exposition order."""

    def __init__(self, kind: PoolKind, per_executor: bool) -> None:
        label = [label_name(kind)] if per_executor else []
        noun = "an actor" if kind == "actor" else "a worker"
        where = "an actor's inbox" if kind == "actor" else "a worker's queue"
        whose = "" if per_executor else " (sum over the pool)"
        self.sent = CounterMetricFamily(
            metric_name(kind, "messages_sent_total"),
            f"Events accepted into {noun}'s queue{whose}.",
            labels=label,
        )
        self.processed = CounterMetricFamily(
            metric_name(kind, "messages_processed_total"),
            f"Handler attempts finished by {noun}, by success{whose}.",
            labels=[*label, "success"],
        )
        self.latency = HistogramMetricFamily(
            metric_name(kind, "message_latency_seconds"),
            f"Duration of one handler attempt in {noun}, in seconds (not time queued){whose}.",
            labels=label,
        )
        self.restarted = CounterMetricFamily(
            metric_name(kind, "actor_restarted_total"),
            f"Supervisor restarts of an actor after its handler crashed{whose}.",
            labels=label,
        )
        self.dead = CounterMetricFamily(
            metric_name(kind, "dead_letters_total"),
            f"Events of {noun} that became dead letters, by reason{whose}.",
            labels=[*label, "reason"],
        )
        self.depth = GaugeMetricFamily(
            metric_name(kind, "inbox_depth"),
            f"Events queued or running in {where}{whose}, read at scrape time.",
            labels=label,
        )
        self.util = GaugeMetricFamily(
            metric_name(kind, "inbox_utilization"),
            f"Depth divided by capacity of {where} (0..1)"
            + ("." if per_executor else ": the fullest one's."),
            labels=label,
        )
        self.depth_max = GaugeMetricFamily(
            metric_name(kind, "inbox_depth_max"),
            f"Events queued or running in the deepest {'inbox' if kind == 'actor' else 'queue'}, "
            "read at scrape time.",
        )
        self.depth_executors = GaugeMetricFamily(
            metric_name(kind, "inbox_depth_executors"),
            "Executors whose depth is at most le (cumulative; +Inf is the pool size).",
            labels=["le"],
        )
        # Only actors are restarted: the keyed pool exports no restart series.
        restarted = [self.restarted] if kind == "actor" else []
        self.all: list[Metric] = [
            self.sent, self.processed, self.latency, *restarted, self.dead,
            self.depth, self.util, self.depth_max, self.depth_executors,
        ]  # fmt: skip


class _PoolCollector(Collector):
    """Exposes a :class:`PrometheusPoolMetrics`' counts at scrape time."""

    def __init__(self, owner: PrometheusPoolMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        owner = self._owner
        f = _Families(owner.kind, owner.per_executor)
        # Snapshots (C-level copies, atomic under the GIL) of what the loop thread writes.
        sent, ok, failed, buckets, sums = owner._hot_counts()
        restarts = None if owner._restarts is None else list(owner._restarts)
        dead = owner._dead.copy()
        depths, capacities = owner._depths()
        utils = [d / cap if cap else 0.0 for d, cap in zip(depths, capacities, strict=True)]
        if owner.per_executor:
            _add_per_executor(f, owner._ids, sent, ok, failed, buckets, sums, restarts, dead)
            for ident, d, u in zip(owner._ids, depths, utils, strict=True):
                f.depth.add_metric([ident], d)
                f.util.add_metric([ident], u)
        else:
            f.sent.add_metric([], sum(sent))
            f.processed.add_metric(["true"], sum(ok))
            f.processed.add_metric(["false"], sum(failed))
            pool_buckets = [sum(column) for column in zip(*buckets, strict=True)] or [0] * len(_LE)
            f.latency.add_metric(
                [], list(zip(_LE, accumulate(pool_buckets), strict=True)), sum(sums)
            )
            if restarts is not None:
                f.restarted.add_metric([], sum(restarts))
            by_reason: dict[str, int] = {}
            for (_, reason), n in dead.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
            for reason, n in by_reason.items():
                f.dead.add_metric([reason], n)
            f.depth.add_metric([], sum(depths))
            f.util.add_metric([], max(utils, default=0.0))
        f.depth_max.add_metric([], max(depths, default=0))
        at_depth = [0] * (len(DEPTH_BUCKETS) + 1)
        for d in depths:
            at_depth[bisect_left(DEPTH_BUCKETS, d)] += 1
        for le, n in zip(_DEPTH_LE, accumulate(at_depth), strict=True):
            f.depth_executors.add_metric([le], n)
        return iter(f.all)

    def describe(self) -> Iterator[Metric]:
        # The names, so registering a second collector of the same kind fails.
        return iter(_Families(self._owner.kind, self._owner.per_executor).all)


def _add_per_executor(
    f: _Families,
    ids: list[str],
    sent: list[int],
    ok: list[int],
    failed: list[int],
    buckets: list[list[int]],
    sums: list[float],
    restarts: list[int] | None,
    dead: dict[tuple[int, str], int],
) -> None:
    for ident, n in zip(ids, sent, strict=True):
        f.sent.add_metric([ident], n)
    for ident, n in zip(ids, ok, strict=True):
        f.processed.add_metric([ident, "true"], n)
    for ident, n in zip(ids, failed, strict=True):
        f.processed.add_metric([ident, "false"], n)
    for ident, counts, total in zip(ids, buckets, sums, strict=True):
        # Cumulative counts; _count is the +Inf bucket, so the two always agree.
        f.latency.add_metric([ident], list(zip(_LE, accumulate(counts), strict=True)), total)
    if restarts is not None:
        for ident, n in zip(ids, restarts, strict=True):
            f.restarted.add_metric([ident], n)
    for (executor, reason), n in dead.items():
        f.dead.add_metric([ids[executor], reason], n)
