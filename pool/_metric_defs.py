"""Every metric name the project exports, typed, and the one helper that builds them.

Names are typed ``Literal`` suffixes, one type per subsystem, each with a
comment saying what it measures (the model is arroyo's ``metric_defs``). Every
call site, here and in ``server/``, builds its name with :func:`metric_name`
(a typo is a type error); the name tuples are derived from the ``Literal``
types, never listed a second time. The service's names live here too, beside
the pool's, so this module is the one list (``pool/`` stays free of Kafka and
gRPC: these are strings).

The actor pool's seven names are the Go original's, unprefixed by client ID,
so its PromQL keeps working. By default they are per pool (one series per name
and label set, so that PromQL without ``sum by`` gives one figure); with
``per_executor`` (config ``metrics.perExecutor``) they carry an ``actor_id``
label. The keyed pool mirrors them under ``kafka_eventbus_keyed_pool_`` with a
``worker_id`` label. Counters end in ``_total``: prometheus-client exposes
them under that name (it strips and re-adds the suffix itself).
"""

from __future__ import annotations

from typing import Final, Literal, get_args, overload

PoolKind = Literal["actor", "keyed"]

#: Whose metric: a pool kind (``kafka_eventbus_{actor,keyed}_pool_``), the mode
#: switch (``kafka_eventbus_pool_``), the consumer, the process, fleet control
#: (``kafka_eventbus_fleet_``), or the gRPC control plane (``pool_control_``).
Subsystem = Literal["actor", "keyed", "switch", "consumer", "process", "fleet", "control"]

PREFIXES: Final[dict[Subsystem, str]] = {
    "actor": "kafka_eventbus_actor_pool_",
    "keyed": "kafka_eventbus_keyed_pool_",
    "switch": "kafka_eventbus_pool_",
    "consumer": "kafka_eventbus_consumer_",
    "process": "kafka_eventbus_process_",
    "fleet": "kafka_eventbus_fleet_",
    "control": "pool_control_",
}

PoolMetric = Literal[
    # Counter: events accepted into an executor's queue/inbox.
    "messages_sent_total",
    # Counter, label ``success`` ("true"/"false"): handler attempts that finished.
    "messages_processed_total",
    # Histogram: time from the start of a handler attempt to its end.
    "message_latency_seconds",
    # Gauge: events queued or running, read exactly at scrape time: the pool's
    # total (per executor with per_executor).
    "inbox_depth",
    # Gauge: depth / capacity: the fullest executor's (per executor with per_executor).
    "inbox_utilization",
    # Counter: supervisor restarts of an actor (the keyed pool has none: not exported).
    "actor_restarted_total",
    # Counter, label ``reason``: events that became dead letters.
    "dead_letters_total",
    # Gauge: the deepest executor's depth, at scrape time.
    "inbox_depth_max",
    # Gauge, label ``le``: executors whose depth is at most ``le`` (cumulative,
    # like histogram buckets: ``+Inf`` is the pool size), at scrape time.
    "inbox_depth_executors",
]

SwitchMetric = Literal[
    # Gauge {mode}: 1 for the mode in force, 0 for the other.
    "mode",
    # Gauge: share (0-100) of aggregates routed to the actor pool in ACTOR mode.
    "rollout_percent",
    # Counter: mode or rollout changes since start (the switch's generation).
    "switches_total",
    # Gauge: Unix time of the last mode or rollout change (start time if none).
    "last_switch_timestamp_seconds",
    # Gauge: events held for a handover (waiting for their aggregate's earlier
    # events in the other pool).
    "held_events",
    # Histogram {kind}: from a change's call until every waiting aggregate was
    # handed over (or the wait timed out).
    "switch_duration_seconds",
    # Counter {outcome}: drains ended, "complete" or "timeout".
    "drains_total",
    # Histogram: duration of a drain.
    "drain_duration_seconds",
]

ConsumerMetric = Literal[
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

ProcessMetric = Literal[
    # Gauge: asyncio tasks of the service's event loop not yet done, at scrape
    # time (a number rising under steady load is a task leak).
    "asyncio_tasks",
]

FleetMetric = Literal[
    # Gauge: generation of the fleet's desired state as this replica read it
    # from the control topic (0 = none written yet).
    "desired_generation",
    # Gauge: generation of the desired state this replica last applied.
    "applied_generation",
    # Gauge: 1 when this replica differs from the fleet's desired state
    # (another generation, or a replica-scope change), else 0.
    "diverged",
    # Gauge: 1 when the control topic cannot be read (running on the
    # configuration or the last state read, retrying), else 0.
    "degraded",
    # Gauge {kind}: replicas known from their reports, "live" or "stale" (no
    # report for three heartbeats).
    "replicas",
    # Counter {outcome}: fleet writes through this replica: "accepted",
    # "replayed", "precondition", "conflict".
    "writes_total",
]

ControlMetric = Literal[
    # Counter, labels ``method`` (e.g. "SetPoolMode") and ``code`` (e.g. "OK",
    # "INVALID_ARGUMENT"): control-plane calls handled, like grpc_server_handled_total.
    "grpc_calls_total",
    # Histogram, label ``method``: seconds from the call's arrival to its status
    # (a whole stream for StreamDeadLetters and Drain).
    "grpc_call_duration_seconds",
    # Counter: dead letters a StreamDeadLetters reader skipped
    # because its buffer was full (a slow reader).
    "dead_letter_stream_skipped_total",
]

POOL_METRICS: Final[tuple[PoolMetric, ...]] = get_args(PoolMetric)
SWITCH_METRICS: Final[tuple[SwitchMetric, ...]] = get_args(SwitchMetric)
CONSUMER_METRICS: Final[tuple[ConsumerMetric, ...]] = get_args(ConsumerMetric)
PROCESS_METRICS: Final[tuple[ProcessMetric, ...]] = get_args(ProcessMetric)
FLEET_METRICS: Final[tuple[FleetMetric, ...]] = get_args(FleetMetric)
CONTROL_METRICS: Final[tuple[ControlMetric, ...]] = get_args(ControlMetric)

#: Each subsystem's names.
METRICS_OF: Final[dict[Subsystem, tuple[str, ...]]] = {
    "actor": POOL_METRICS,
    "keyed": tuple(m for m in POOL_METRICS if m != "actor_restarted_total"),
    "switch": SWITCH_METRICS,
    "consumer": CONSUMER_METRICS,
    "process": PROCESS_METRICS,
    "fleet": FLEET_METRICS,
    "control": CONTROL_METRICS,
}

# Sub-millisecond to tens of seconds.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: Upper bounds of ``inbox_depth_executors`` (``+Inf`` added): idle, then 1-2-5 steps.
DEPTH_BUCKETS: Final = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@overload
def metric_name(subsystem: PoolKind, name: PoolMetric) -> str: ...
@overload
def metric_name(subsystem: Literal["switch"], name: SwitchMetric) -> str: ...
@overload
def metric_name(subsystem: Literal["consumer"], name: ConsumerMetric) -> str: ...
@overload
def metric_name(subsystem: Literal["process"], name: ProcessMetric) -> str: ...
@overload
def metric_name(subsystem: Literal["fleet"], name: FleetMetric) -> str: ...
@overload
def metric_name(subsystem: Literal["control"], name: ControlMetric) -> str: ...
def metric_name(subsystem: Subsystem, name: str) -> str:
    """The exposition name of ``name`` of ``subsystem``, e.g.
    ``metric_name("consumer", "lag") == "kafka_eventbus_consumer_lag"``."""
    return PREFIXES[subsystem] + name


def names_of(subsystem: Subsystem) -> tuple[str, ...]:
    """The exposition names of ``subsystem``, derived from its ``Literal`` type."""
    return tuple(PREFIXES[subsystem] + name for name in METRICS_OF[subsystem])


#: Every exposition name of the project.
METRIC_NAMES: Final[tuple[str, ...]] = tuple(
    name for subsystem in METRICS_OF for name in names_of(subsystem)
)


def label_name(kind: PoolKind) -> str:
    """The per-executor label of a pool kind (exported with ``per_executor`` only)."""
    return "actor_id" if kind == "actor" else "worker_id"
