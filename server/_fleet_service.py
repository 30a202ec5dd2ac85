"""The service's side of fleet control: how a replica applies a desired state
and what it reports about itself. :class:`server._service.Service` builds its
:class:`~server._fleet.FleetControl` here (:func:`build_fleet`).

Applying a desired state uses the pool switch's atomic, order-keeping change
(rollout first when going to ACTOR, mode first when going to KEYED, so no
routing rule between the old and the new one is ever in force) and replaces
the consumer's operator pauses with the fleet's. A partition the fleet paused
stays paused wherever it goes: the consumer holds listed partitions from
their assignment on, before their first fetch. A ``resume`` state also lifts
drain pauses of what it resumed (``poolctl drain`` then ``poolctl resume``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aiokafka import TopicPartition
from grpc_health.v1 import health_pb2

from pool import SwitchResult
from server._fleet import APPLY_LATER, FleetControl, FleetOptions, LocalSnapshot
from server._fleet_probe import identity_service
from server._fleet_state import CHANGE_RESUME, DesiredState, Paused
from server._pauses import DRAIN, OPERATOR
from server._version import version

if TYPE_CHECKING:
    from server._service import Service


def fleet_defaults(service: Service) -> DesiredState:
    """Generation 0: what the configuration says (a fleet with no desired state)."""
    s = service.settings
    return DesiredState(
        generation=0, mode=s.mode, rollout=s.kafka.actor_pool.rollout_percent, paused=Paused()
    )


def build_fleet(service: Service, grpc_address: str | None) -> FleetControl:
    s = service.settings
    options = FleetOptions(
        bootstrap_servers=service.bootstrap_servers,
        topic=s.control_topic,
        instance=service.instance,
        group_id=s.kafka.consumer.group_id,
        heartbeat_s=s.control.heartbeat_ms / 1000,
        startup_timeout_s=s.control.startup_timeout_ms / 1000,
        fetch_max_wait_ms=s.kafka.consumer.fetch_max_wait_ms,
        grpc_tls=s.grpc.tls.cert_file is not None,
    )

    async def apply(state: DesiredState, initial: bool) -> SwitchResult | None:
        return await apply_desired(service, state, initial=initial)

    def apply_now(state: DesiredState) -> object:
        return apply_desired_now(service, state)

    def snapshot() -> LocalSnapshot:
        return local_snapshot(service, grpc_address or "")

    def partitions() -> dict[str, set[int] | None]:
        consumer = service.consumer
        return {topic: consumer.partitions_for(topic) for topic in s.kafka.topics}

    async def announce() -> None:
        # Before the first report: which replica serves this gRPC address (a
        # replica probing it then tells this process from a newer one).
        handle = service.grpc_server
        if handle is not None:
            await handle.set_health(
                identity_service(service.instance), health_pb2.HealthCheckResponse.SERVING
            )

    return FleetControl(
        options,
        defaults=fleet_defaults(service),
        apply=apply,
        apply_now=apply_now,
        snapshot=snapshot,
        partitions=partitions,
        announce=announce,
    )


def _tps(paused: Paused) -> list[TopicPartition] | None:
    if paused.all:
        return None
    return [TopicPartition(t, p) for t, p in paused.sorted()]


async def apply_desired(
    service: Service, state: DesiredState, *, initial: bool
) -> SwitchResult | None:
    """Make this replica follow ``state``; the switch's combined result (or
    ``None`` when mode and rollout were already in force)."""
    results = await service.switch.change(
        mode=state.mode, rollout_percent=state.rollout, wait_timeout=0
    )
    _hold(service, state, initial=initial)
    return _combined(results)


def apply_desired_now(service: Service, state: DesiredState) -> SwitchResult | object | None:
    """:func:`apply_desired` without awaiting anything (from a plain callback
    of the service's loop, one loop turn after the follower read the state):
    the same switch changes, in the same order, and the same pauses.
    :data:`~server._fleet.APPLY_LATER` (nothing done) while an awaited switch
    change (a replica-scope call waiting for its handover) holds the switch."""
    results = service.switch.change_nowait(mode=state.mode, rollout_percent=state.rollout)
    if results is None:
        return APPLY_LATER
    _hold(service, state, initial=False)
    return _combined(results)


def _hold(service: Service, state: DesiredState, *, initial: bool) -> None:
    """The fleet's operator pauses (and a resume's drain pauses lifted)."""
    consumer = service.consumer
    consumer.set_holds(OPERATOR, _tps(state.paused))
    if not initial and state.change == CHANGE_RESUME:
        consumer.release((DRAIN,), _tps(state.resumed))


def _combined(results: list[SwitchResult]) -> SwitchResult | None:
    """The switch's steps as one result (``None``: none changed anything)."""
    changed = [r for r in results if r.changed]
    if not changed:
        return None
    first, last = changed[0], changed[-1]
    return dataclasses.replace(
        last,
        previous_mode=first.previous_mode,
        previous_rollout=first.previous_rollout,
        took_s=sum(r.took_s for r in changed),
        waited_aggregates=sum(r.waited_aggregates for r in changed),
        pending_aggregates=sum(r.pending_aggregates for r in changed),
    )


def local_paused(service: Service) -> Paused:
    every, some = service.consumer.holds_of(OPERATOR)
    if every:
        return Paused(all=True)
    return Paused(partitions=frozenset((tp.topic, tp.partition) for tp in some))


def local_snapshot(service: Service, grpc_address: str) -> LocalSnapshot:
    switch = service.switch
    consumer = service.consumer
    statuses = consumer.partition_status()
    return LocalSnapshot(
        mode=switch.mode,
        rollout=switch.rollout_percent,
        paused=local_paused(service),
        grpc_address=grpc_address,
        version=version(),
        assigned=tuple((p.topic, p.partition) for p in statuses),
        lag=sum(p.lag or 0 for p in statuses),
        in_flight=consumer.in_flight,
        draining=service.status().draining,
    )
