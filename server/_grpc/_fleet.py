"""Fleet scope of the control API: what the servicer calls for ``SCOPE_FLEET``.

The servicer (:mod:`server._grpc._servicer`) keeps validating arguments,
idempotency on this replica and the interceptor's auth and audit; for a
fleet-scope call it asks :func:`fleet_for` whether the call goes to the fleet
and then calls :func:`write` here, which writes the desired state through
:class:`server._fleet.FleetControl`, waits until every live replica applied
it (up to the call's wait timeout), writes an audit line with the generation,
and returns one result per replica. A refused request raises
:class:`~server._grpc._status.InvalidArgumentError`; a lost compare-and-set
is :class:`~server._control.ConflictError` (``ABORTED``), the fleet at another
generation :class:`~server._control.PreconditionError`.

A target without a ``fleet`` attribute (or with ``fleet = None``: the control
topic disabled) serves replica scope only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

import structlog
from actorpool.control.v1 import control_pb2 as pb
from google.protobuf import duration_pb2

from pool import PoolMode, SwitchResult
from server._control import ModeSwitch, Partition, PreconditionError, UnknownPartitionError
from server._fleet import FleetControl, WriteResult, partitions_to_pb, state_to_pb
from server._fleet_state import (
    CHANGE_RESTATE,
    Change,
    Outcome,
    ReplicaOutcome,
    is_stale,
    report_differences,
)
from server._grpc._convert import duration
from server._grpc._status import InvalidArgumentError

__all__ = [
    "Change",
    "add_replica_fleet_status",
    "check_partitions",
    "fleet_for",
    "fleet_status",
    "local_outcome",
    "paused_before",
    "paused_to_pb",
    "resumed_to_pb",
    "write",
]

audit_log = structlog.get_logger("server.audit")

_OUTCOME_TO_PB: Final = {
    Outcome.APPLIED: pb.REPLICA_OUTCOME_APPLIED,
    Outcome.PENDING: pb.REPLICA_OUTCOME_PENDING,
    Outcome.FAILED: pb.REPLICA_OUTCOME_FAILED,
    Outcome.DOWN: pb.REPLICA_OUTCOME_DOWN,
}


class _ScopedRequest(Protocol):
    @property
    def scope(self) -> int: ...
    @property
    def request_id(self) -> str: ...
    def HasField(self, field_name: Any) -> bool: ...
    @property
    def expected_generation(self) -> int: ...
    @property
    def wait_timeout(self) -> duration_pb2.Duration: ...


def fleet_of(target: object) -> FleetControl | None:
    fleet = getattr(target, "fleet", None)
    return fleet if isinstance(fleet, FleetControl) else None


def fleet_for(target: object, request: _ScopedRequest) -> FleetControl | None:
    """The fleet a call acts on, or ``None`` for replica scope.

    Unspecified scope = fleet when the control topic is enabled. Raises
    :class:`InvalidArgumentError` for an unknown scope or a compare-and-set on
    replica scope, :class:`PreconditionError` for fleet scope without the
    control topic."""
    fleet = fleet_of(target)
    scope = request.scope
    if scope not in (pb.SCOPE_UNSPECIFIED, pb.SCOPE_REPLICA, pb.SCOPE_FLEET):
        raise InvalidArgumentError(f"unknown scope {scope}")
    if scope == pb.SCOPE_REPLICA:
        fleet = None
    elif scope == pb.SCOPE_FLEET and fleet is None:
        raise PreconditionError(
            "fleet scope needs the control topic, and control.enabled is off on this replica"
        )
    if fleet is None and request.HasField("expected_generation"):
        raise InvalidArgumentError("expected_generation applies to fleet scope only")
    return fleet


def check_partitions(fleet: FleetControl, partitions: Sequence[Partition] | None) -> None:
    """Listed partitions must belong to the consumed topics (``NOT_FOUND``)."""
    if partitions is None:
        return
    known = fleet.topic_partitions()
    unknown = [
        (t, p)
        for t, p in partitions
        if t not in known or (known[t] is not None and p not in known[t])  # type: ignore[operator]
    ]
    if unknown:
        raise UnknownPartitionError(unknown)


def every_partition(fleet: FleetControl) -> list[Partition]:
    return [(t, p) for t, ps in fleet.topic_partitions().items() for p in sorted(ps or ())]


async def write(
    fleet: FleetControl, method: str, change: Change, request: _ScopedRequest, wait: float
) -> tuple[WriteResult, pb.FleetResult]:
    """Write ``change`` to the fleet, wait for the replicas, audit; the result."""
    started = time.time()
    context = structlog.contextvars.get_contextvars()
    expected = request.expected_generation if request.HasField("expected_generation") else None
    outcome = "error"
    generation: int | None = None
    try:
        result, outcomes, complete = await fleet.write_and_wait(
            change,
            wait=wait,
            started=started,
            request_id=request.request_id,
            expected_generation=expected,
            caller_role=str(context.get("caller") or ""),
            caller_peer=str(context.get("peer") or ""),
            every=every_partition(fleet),
        )
        generation = result.generation
        outcome = "replayed" if result.replayed else ("applied" if complete else "pending")
    except Exception as exc:
        outcome = type(exc).__name__
        raise
    finally:
        audit_log.info(
            "fleet.audit",
            method=method,
            scope="fleet",
            change=change.kind,
            request_id=request.request_id,
            expected_generation=expected,
            generation=generation,
            outcome=outcome,
            took_ms=round((time.time() - started) * 1000, 3),
        )
    return result, pb.FleetResult(
        generation=result.generation,
        previous_generation=result.previous_generation,
        complete=complete,
        replicas=[replica_result_to_pb(o) for o in outcomes],
        took=duration(max(0.0, time.time() - started)),
    )


def local_outcome(fleet: FleetControl, generation: int, switch: ModeSwitch) -> SwitchResult:
    """This replica's switch as it applied ``generation`` (no change: the state now)."""
    seen = fleet.outcomes.get(generation)
    if isinstance(seen, SwitchResult):
        return seen
    mode: PoolMode = switch.mode
    return SwitchResult(
        previous_mode=mode,
        mode=mode,
        previous_rollout=switch.rollout_percent,
        rollout=switch.rollout_percent,
        generation=switch.generation,
        took_s=0.0,
        waited_aggregates=0,
        pending_aggregates=0,
        changed=False,
    )


def replica_result_to_pb(o: ReplicaOutcome) -> pb.ReplicaResult:
    out = pb.ReplicaResult(
        instance=o.instance,
        grpc_address=o.grpc_address,
        outcome=_OUTCOME_TO_PB[o.outcome],
        applied_generation=o.applied_generation,
        error=o.error,
    )
    if o.took_s is not None:
        out.took.CopyFrom(duration(max(0.0, o.took_s)))
    return out


def paused_to_pb(result: WriteResult) -> tuple[list[pb.TopicPartition], bool]:
    paused = result.state.paused
    return partitions_to_pb(paused.sorted()), paused.all


def resumed_to_pb(result: WriteResult, before: Sequence[Partition]) -> list[pb.TopicPartition]:
    """Partitions the fleet no longer pauses (of those it paused before the call)."""
    now = result.state.paused
    return partitions_to_pb(sorted(p for p in before if not now.covers(p)))


def paused_before(fleet: FleetControl) -> list[Partition]:
    paused = fleet.desired.paused
    return every_partition(fleet) if paused.all else paused.sorted()


# ---------------------------------------------------------------- status


def fleet_status(target: object) -> pb.GetFleetStatusResponse:
    fleet = fleet_of(target)
    if fleet is None:
        return pb.GetFleetStatusResponse(enabled=False)
    response = pb.GetFleetStatusResponse(
        enabled=True,
        topic=fleet.options.topic,
        degraded=fleet.degraded is not None,
        degraded_reason=fleet.degraded or "",
        instance=fleet.options.instance,
    )
    current = fleet.log.current
    if current is not None:
        base = current.generation if current.change == CHANGE_RESTATE else current.generation - 1
        response.desired.CopyFrom(state_to_pb(current, base, ""))
    now = time.time()
    desired = fleet.desired
    for instance, record in sorted(fleet.report_records.items()):
        report = fleet.reports.get(instance)
        if report is None:
            continue
        diffs = report_differences(desired, report)
        down = fleet.down_reason(instance)
        response.replicas.add(
            report=record,
            stale=is_stale(report, now),
            diverged=bool(diffs),
            differences=diffs,
            age=duration(max(0.0, now - report.time)),
            down=down is not None,
            down_reason=down or "",
        )
    return response


def add_replica_fleet_status(response: pb.GetStatusResponse, target: object) -> None:
    """Fill ``GetStatusResponse.fleet`` for this replica."""
    fleet = fleet_of(target)
    if fleet is None:
        return
    try:
        diffs = fleet.own_differences()
    except Exception:  # noqa: BLE001 - starting or stopping: nothing to compare yet
        diffs = []
    response.fleet.CopyFrom(
        pb.ReplicaFleetStatus(
            enabled=True,
            desired_generation=fleet.desired.generation,
            applied_generation=fleet.applied_generation,
            diverged=bool(diffs),
            differences=diffs,
            degraded=fleet.degraded is not None,
            degraded_reason=fleet.degraded or "",
        )
    )
