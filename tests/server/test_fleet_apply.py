"""How a replica schedules its applies: the follower (the fleet's thread)
reads states, the service's loop applies them, one pending at a time.

A unit test of the scheduling with a recording ``apply_now``: no broker (the
real thing is in ``tests/server/test_fleet.py``)."""

from __future__ import annotations

import asyncio

from pool import PoolMode
from server._fleet import (
    DESIRED_KEY,
    FleetControl,
    FleetOptions,
    LocalSnapshot,
    proposal_to_pb,
)
from server._fleet_state import DesiredState, Paused, Proposal
from tests.helpers import assert_eventually

DEFAULTS = DesiredState(generation=0, mode=PoolMode.KEYED, rollout=100.0, paused=Paused())


def _record(generation: int, rollout: float) -> bytes:
    state = DesiredState(
        generation=generation, mode=PoolMode.ACTOR, rollout=rollout, paused=Paused()
    )
    proposal = Proposal(state, base_generation=generation - 1, write_id=f"w{generation}")
    return proposal_to_pb(proposal).SerializeToString()


async def test_a_state_read_while_an_apply_runs_is_applied_after_it() -> None:
    """The follower reads generation 2 while generation 1 is being applied on
    the service's loop: generation 2 is applied next, not left pending."""
    applied: list[int] = []
    fleet: FleetControl | None = None

    async def apply(state: DesiredState, initial: bool) -> None:
        raise AssertionError("only apply_now is expected here")

    def apply_now(state: DesiredState) -> None:
        assert fleet is not None
        applied.append(state.generation)
        # What the follower does on its thread when it reads a record, here
        # in the middle of the first apply.
        if state.generation == 1 and fleet._on_record(
            fleet._fold, 1, DESIRED_KEY, _record(2, 50.0)
        ):
            fleet._schedule_apply()

    fleet = FleetControl(
        FleetOptions(bootstrap_servers="127.0.0.1:1", topic="t.control", instance="r1"),
        defaults=DEFAULTS,
        apply=apply,
        apply_now=apply_now,
        snapshot=lambda: LocalSnapshot(mode=PoolMode.ACTOR, rollout=0.0, paused=Paused()),
    )
    fleet._main = asyncio.get_running_loop()
    assert fleet._on_record(fleet._fold, 0, DESIRED_KEY, _record(1, 10.0))
    fleet._schedule_apply()
    await assert_eventually(lambda: applied == [1, 2], message="generations 1 then 2 applied")
    assert fleet.applied_generation == 2
