"""Protobuf <-> domain: the control API's messages to and from :mod:`server._control` types.

``*_from_pb`` read a request field and validate it, raising
:class:`~server._grpc._status.InvalidArgumentError` (never a bare
``ValueError``) for a value the API does not accept. ``*_to_pb`` build
response messages and never raise for a value the service produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from actorpool.control.v1 import control_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2

from pool import DeadLetter, PoolMode
from server._control import (
    DeadLetterFilter,
    DrainProgress,
    DrainResult,
    Partition,
    ServiceStatus,
    SwitchOutcome,
)
from server._grpc._status import InvalidArgumentError

#: How long SetPoolMode/SetRollout wait for in-flight aggregates, and a fleet
#: call for the replicas, by default (s).
DEFAULT_SWITCH_WAIT: Final = 5.0
#: The longest wait_timeout and Drain timeout accepted (s).
MAX_DRAIN_TIMEOUT: Final = 3600.0

_MODE_TO_PB: Final = {PoolMode.KEYED: pb.POOL_MODE_KEYED, PoolMode.ACTOR: pb.POOL_MODE_ACTOR}
_MODE_FROM_PB: Final = {v: k for k, v in _MODE_TO_PB.items()}


# ------------------------------------------------------------ requests


def seconds_from_pb(value: duration_pb2.Duration | timestamp_pb2.Timestamp, field: str) -> float:
    """A Duration (or a Timestamp, since the epoch) in seconds; a value protobuf
    itself refuses (e.g. a Timestamp's nanos outside 0..999 999 999) is invalid."""
    try:
        return value.ToNanoseconds() / 1e9
    except ValueError as exc:  # protobuf's own check of the message
        raise InvalidArgumentError(f"{field}: {exc}") from exc


def mode_from_pb(value: int, field: str) -> PoolMode:
    mode: PoolMode | None = _MODE_FROM_PB.get(value)  # type: ignore[call-overload]
    if mode is None:
        name = "POOL_MODE_UNSPECIFIED" if value == pb.POOL_MODE_UNSPECIFIED else str(value)
        raise InvalidArgumentError(
            f"{field} must be POOL_MODE_KEYED or POOL_MODE_ACTOR, got {name}"
        )
    return mode


def wait_timeout_from_pb(
    request: pb.SetPoolModeRequest | pb.SetRolloutRequest | pb.PauseRequest | pb.ResumeRequest,
) -> float:
    """``wait_timeout`` in seconds (:data:`DEFAULT_SWITCH_WAIT` when unset): how
    long a switch waits for in-flight aggregates, and a fleet call for every
    live replica to apply."""
    if not request.HasField("wait_timeout"):
        return DEFAULT_SWITCH_WAIT
    wait = seconds_from_pb(request.wait_timeout, "wait_timeout")
    if not 0 <= wait <= MAX_DRAIN_TIMEOUT:
        raise InvalidArgumentError(f"wait_timeout must be within 0..{MAX_DRAIN_TIMEOUT:g} s")
    return wait


def drain_timeout_from_pb(request: pb.DrainRequest) -> float:
    """``timeout`` in seconds: required, within (0, :data:`MAX_DRAIN_TIMEOUT`]."""
    if not request.HasField("timeout"):
        raise InvalidArgumentError("timeout is required")
    timeout = seconds_from_pb(request.timeout, "timeout")
    if not 0 < timeout <= MAX_DRAIN_TIMEOUT:
        raise InvalidArgumentError(
            f"timeout must be within (0, {MAX_DRAIN_TIMEOUT:g}] seconds, got {timeout:g}"
        )
    return timeout


def partitions_from_pb(items: Sequence[pb.TopicPartition]) -> list[Partition] | None:
    """The listed partitions, or ``None`` (all assigned) when the list is empty."""
    if not items:
        return None
    out: list[Partition] = []
    for item in items:
        if not item.topic:
            raise InvalidArgumentError("partition without a topic")
        if item.partition < 0:
            raise InvalidArgumentError(f"negative partition {item.partition} of {item.topic}")
        out.append((item.topic, item.partition))
    return out


def filter_from_pb(f: pb.DeadLetterFilter) -> DeadLetterFilter:
    return DeadLetterFilter(
        topic=f.topic,
        aggregate_id=f.aggregate_id,
        error_type=f.error_type,
        reason=f.reason,
        since=seconds_from_pb(f.since, "filter.since") if f.HasField("since") else 0.0,
    )


def redrive_selection_from_pb(
    request: pb.RedriveDeadLettersRequest,
) -> tuple[tuple[str, ...], DeadLetterFilter | None]:
    """``(ids, None)`` or ``((), filter)``: ids, a filter, or ``all`` (an empty filter)."""
    ids = tuple(request.ids)
    has_filter = request.HasField("filter") and request.filter != pb.DeadLetterFilter()
    if ids and has_filter:
        raise InvalidArgumentError("give ids or a filter, not both")
    if not ids and not has_filter and not request.all:
        raise InvalidArgumentError(
            "nothing selected: give ids, a filter, or all=true to redrive every dead letter"
        )
    if any(not i for i in ids):
        raise InvalidArgumentError("ids must not be empty strings")
    return ids, None if ids else filter_from_pb(request.filter)


# ----------------------------------------------------------- responses


def mode_to_pb(mode: PoolMode) -> pb.PoolMode.ValueType:
    return _MODE_TO_PB[PoolMode(mode)]


def timestamp(epoch_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(epoch_seconds * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def partitions_to_pb(items: Sequence[Partition]) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in items]


def executor_depth_to_pb(index: int, depth: int, capacity: int) -> pb.ExecutorDepth:
    return pb.ExecutorDepth(
        index=index,
        depth=depth,
        capacity=capacity,
        utilization=depth / capacity if capacity else 0.0,
    )


def switch_result_to_pb(result: SwitchOutcome) -> pb.SwitchResult:
    return pb.SwitchResult(
        previous_mode=mode_to_pb(result.previous_mode),
        mode=mode_to_pb(result.mode),
        previous_rollout_percent=result.previous_rollout,
        rollout_percent=result.rollout,
        generation=result.generation,
        took=duration(result.took_s),
        waited_aggregates=result.waited_aggregates,
        pending_aggregates=result.pending_aggregates,
    )


def status_to_pb(status: ServiceStatus) -> pb.GetStatusResponse:
    response = pb.GetStatusResponse(
        mode=mode_to_pb(status.mode),
        rollout_percent=status.rollout_percent,
        generation=status.generation,
        since=timestamp(status.since),
        in_flight=status.in_flight,
        restarts=status.restarts,
        dead_letters=status.dead_letters,
        uptime=duration(status.uptime_s),
        version=status.version,
        ready=status.ready,
        draining=status.draining,
        group_id=status.group_id,
        instance=status.instance,
    )
    for p in status.partitions:
        entry = response.partitions.add(
            topic=p.topic,
            partition=p.partition,
            paused=p.paused,
            paused_reasons=list(p.paused_reasons),
            in_flight=p.in_flight,
        )
        for name in ("committed", "position", "high_watermark", "lag"):
            value = getattr(p, name)
            if value is not None:
                setattr(entry, name, value)
    for pool in status.pools:
        response.pools.add(
            mode=mode_to_pb(pool.mode),
            size=pool.size,
            capacity=pool.capacity,
            in_flight=pool.in_flight,
            restarts=pool.restarts,
        )
    return response


def drain_progress_to_pb(progress: DrainProgress) -> pb.DrainProgress:
    return pb.DrainProgress(
        finished=progress.finished,
        remaining=progress.remaining,
        elapsed=duration(progress.elapsed_s),
    )


def drain_result_to_pb(result: DrainResult, *, complete: bool) -> pb.DrainResult:
    return pb.DrainResult(
        complete=complete,
        finished=result.finished,
        remaining=result.remaining,
        took=duration(result.took_s),
        committed=[
            pb.CommittedOffset(topic=c.topic, partition=c.partition, offset=c.offset)
            for c in result.committed
        ],
        partitions=partitions_to_pb(result.partitions),
        resumed=result.resumed,
    )


def dead_letter_to_pb(dead: DeadLetter) -> pb.DeadLetter:
    msg = dead.message
    out = pb.DeadLetter(
        id=dead.id,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        value=msg.value,
        headers=[pb.Header(key=k, value=v) for k, v in msg.headers],
        aggregate_id=msg.aggregate_id,
        timestamp_ms=msg.timestamp_ms,
        reason=str(dead.reason),
        error_type=dead.error_type,
        error_message=dead.error_message,
        traceback=dead.traceback,
        attempts=dead.attempts,
        mode=dead.mode,
        executor=dead.executor,
        time=timestamp(dead.time),
    )
    if msg.key is not None:
        out.key = msg.key
    return out
