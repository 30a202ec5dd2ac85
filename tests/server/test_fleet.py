"""Fleet control with real services in one process: two replicas of one group
on the embedded broker, driven over their real gRPC control planes.

(The real-process tests - kill -9, three replicas under load - are in
``tests/server/test_fleet_process.py``.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2
from structlog.testing import capture_logs

from clients import (
    AsyncPoolControlClient,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from pool import PoolMode
from server._broker import EmbeddedBroker
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, produce
from tests.server.recording_handler import MemoryRecorder
from tests.server.test_service import service_settings

FAST = ("control.heartbeatMs=200",)
_names = itertools.count()


@contextlib.asynccontextmanager
async def replica(
    broker: EmbeddedBroker, topic: str, group: str, *extra: str
) -> AsyncIterator[tuple[Service, AsyncPoolControlClient, MemoryRecorder]]:
    recorder = MemoryRecorder()
    settings = service_settings(broker.bootstrap, topic, group, *FAST, *extra)
    name = f"replica-{next(_names)}"
    async with Service(
        settings, bootstrap_servers=broker.bootstrap, handler=recorder, instance=name
    ) as svc:
        assert svc.endpoints is not None
        assert svc.endpoints.grpc_address is not None
        async with AsyncPoolControlClient(svc.endpoints.grpc_address, timeout=20) as client:
            yield svc, client, recorder


def mode_of(svc: Service) -> PoolMode:
    """The mode now (a call: mypy does not carry an earlier assert's narrowing over)."""
    return svc.switch.mode


def _metric(svc: Service, name: str) -> float:
    value = svc.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def test_a_fleet_switch_through_one_replica_reaches_both_and_reports_each(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    group = f"{topic}-g"
    async with (
        replica(broker, topic, group) as (a, ca, _),
        replica(broker, topic, group) as (b, cb, _),
    ):
        # Both know each other from their reports.
        await assert_eventually(lambda: len(a.fleet.reports) == 2 if a.fleet else False)
        reply = await ca.set_mode("actor", request_id="fleet-1")
        assert reply.fleet.generation == 1
        assert reply.fleet.previous_generation == 0
        assert reply.fleet.complete
        assert {r.instance for r in reply.fleet.replicas} == {a.instance, b.instance}
        assert all(r.outcome == pb.REPLICA_OUTCOME_APPLIED for r in reply.fleet.replicas)
        assert reply.result.mode == pb.POOL_MODE_ACTOR
        assert a.switch.mode is PoolMode.ACTOR
        assert b.switch.mode is PoolMode.ACTOR

        # A retry with the same request ID through the *other* replica: no new generation.
        again = await cb.set_mode("actor", request_id="fleet-1")
        assert again.fleet.generation == 1
        rollout = await cb.set_rollout(25, wait_timeout=10)
        assert rollout.fleet.generation == 2
        assert a.switch.rollout_percent == 25.0

        # GetFleetStatus (any replica) shows the desired state and both reports.
        fleet = await ca.fleet_status()
        assert fleet.enabled
        assert fleet.desired.generation == 2
        assert fleet.desired.mode == pb.POOL_MODE_ACTOR
        assert fleet.desired.rollout_percent == 25.0
        assert next(r.request_id for r in fleet.desired.recent_requests) == "fleet-1"
        await assert_eventually(
            lambda: _all_applied(ca.fleet_status(), 2), message="both reports at generation 2"
        )

        # Replica scope keeps today's behaviour and makes that replica diverge ...
        local = await cb.set_mode("keyed", scope="replica")
        assert not local.HasField("fleet")
        assert mode_of(b) is PoolMode.KEYED
        status = await cb.status()
        assert status.fleet.diverged
        assert status.fleet.differences == ["mode keyed, fleet actor"]
        assert _metric(b, "kafka_eventbus_fleet_diverged") == 1.0
        assert (await ca.status()).fleet.diverged is False
        # ... until the next fleet state overrides it.
        await ca.set_rollout(30)
        assert b.switch.mode is PoolMode.ACTOR
        assert (await cb.status()).fleet.diverged is False
        assert _metric(b, "kafka_eventbus_fleet_applied_generation") == 3.0
        assert _metric(a, "kafka_eventbus_fleet_desired_generation") == 3.0


async def _all_applied(status: object, generation: int) -> bool:
    reply: pb.GetFleetStatusResponse = await status  # type: ignore[misc]
    return len(reply.replicas) == 2 and all(
        r.report.applied_generation == generation and not r.stale for r in reply.replicas
    )


async def test_fleet_state_survives_a_restart_and_applies_before_the_first_fetch(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    group = f"{topic}-g"
    async with replica(broker, topic, group) as (svc, client, _):
        await svc.consumer.wait_assigned(10)
        await client.set_mode("actor")
        await client.pause([(topic, 1)])
    # Configured KEYED; the fleet says ACTOR (rollout 100 %) with partition 1 paused.
    await produce(broker.bootstrap, topic, aggregate_events(8, 5, 2))
    async with replica(broker, topic, group) as (svc, client, recorder):
        assert svc.switch.mode is PoolMode.ACTOR
        assert svc.fleet is not None
        assert svc.fleet.applied_generation == 2
        await assert_eventually(lambda: len(recorder.events) == 20, timeout=20)
        # Every event went to the actor pool: the fleet's mode was in force first.
        assert _total(svc, "kafka_eventbus_keyed_pool_messages_sent_total") == 0
        assert _total(svc, "kafka_eventbus_actor_pool_messages_sent_total") == 20
        # Nothing of partition 1 was handled: it was paused before its first fetch.
        assert {p for _a, _s, p, _o in recorder.events} == {0}
        status = await client.status()
        assert {p.partition: list(p.paused_reasons) for p in status.partitions} == {
            0: [],
            1: ["operator"],
        }
        assert await client.resume() == [(topic, 1)]
        await assert_eventually(lambda: len(recorder.events) == 40, timeout=20)


def _total(svc: Service, name: str) -> float:
    return sum(
        sample.value
        for family in svc.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def test_concurrent_compare_and_set_writes_through_two_replicas_exactly_one_wins(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    group = f"{topic}-g"
    async with (
        replica(broker, topic, group) as (a, ca, _),
        replica(broker, topic, group) as (_b, cb, _),
    ):
        assert a.fleet is not None
        log = a.fleet.log
        outcomes: dict[str, int] = {"won": 0, "aborted": 0, "precondition": 0}
        for round_ in range(8):
            gen = a.fleet.log.generation
            calls = [
                ca.set_rollout(10 + round_, expected_generation=gen, wait_timeout=0),
                cb.set_rollout(60 + round_, expected_generation=gen, wait_timeout=0),
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            winners = [r for r in results if isinstance(r, pb.SetRolloutResponse)]
            assert len(winners) == 1, results
            assert winners[0].fleet.generation == gen + 1
            for r in results:
                if isinstance(r, ConflictError):
                    outcomes["aborted"] += 1
                elif isinstance(r, PreconditionError):
                    assert f"generation {gen + 1}" in r.details
                    outcomes["precondition"] += 1
                elif isinstance(r, BaseException):
                    raise r
            outcomes["won"] += 1

            def at_the_next(expected: int = gen + 1) -> bool:
                return log.generation == expected

            await assert_eventually(at_the_next)
        assert outcomes["won"] == 8
        assert outcomes["aborted"] + outcomes["precondition"] == 8
        # The state is the winner's, on every replica, and the topic's tail is not void.
        assert a.fleet.log.generation == 8
        await assert_eventually(lambda: not a.fleet.log.tail_void)  # type: ignore[union-attr]
        # A stale expected generation is refused up front, naming the current one.
        with pytest.raises(PreconditionError, match="generation 8"):
            await ca.set_mode("actor", expected_generation=3)


async def test_a_follower_failing_on_a_bug_is_restarted_degraded_meanwhile(
    broker: EmbeddedBroker, make_topic: MakeTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await make_topic(partitions=2)
    group = f"{topic}-g"
    with capture_logs() as logs:
        async with (
            replica(broker, topic, group) as (a, ca, _),
            replica(broker, topic, group) as (_b, cb, _),
        ):
            fleet = a.fleet
            assert fleet is not None
            fold_record = fleet._on_record
            left = [2]  # the follower, then the re-read after its restart

            def failing(*args: object) -> bool:
                if args[2] == b"desired" and left[0]:
                    left[0] -= 1
                    raise RuntimeError("injected fold failure")
                return fold_record(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(fleet, "_on_record", failing)
            await cb.set_mode("actor", wait_timeout=0)

            async def degraded() -> bool:
                return (await ca.status()).fleet.degraded

            await assert_eventually(degraded, timeout=10, message="a reports itself degraded")
            assert _metric(a, "kafka_eventbus_fleet_degraded") == 1.0
            with pytest.raises(UnavailableError, match="control topic"):
                await ca.set_rollout(10, timeout=5)
            # Restarted: it reads the topic again and applies what it missed.
            await assert_eventually(
                lambda: mode_of(a) is PoolMode.ACTOR and fleet.degraded is None, timeout=20
            )
            assert fleet.applied_generation == 1
            assert fleet.follow_restarts == 1
            status = await ca.status()
            assert not status.fleet.degraded
            assert not status.fleet.diverged
            assert (await ca.set_rollout(10)).fleet.complete
    failed = [e for e in logs if e["event"] == "fleet.follow_failed"]
    assert len(failed) == 1
    assert "injected fold failure" in failed[0]["error"]
    assert any(e["event"] == "fleet.recovered" for e in logs)


async def test_bad_fleet_arguments(broker: EmbeddedBroker, make_topic: MakeTopic) -> None:
    topic = await make_topic(partitions=2)
    async with replica(broker, topic, f"{topic}-g") as (_, client, _):
        with pytest.raises(NotFoundError):
            await client.pause([("nope", 0)])
        with pytest.raises(NotFoundError):
            await client.pause([(topic, 7)])
        with pytest.raises(InvalidArgumentError, match="fleet scope only"):
            await client.set_mode("actor", scope="replica", expected_generation=0)


async def test_control_topic_unusable_at_start_degraded_serving_not_crashed(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    group = f"{topic}-g"
    # A control topic the fleet cannot use: two partitions (no single order).
    await broker.create_topics({f"{group}.control": 2})
    with capture_logs() as logs:
        async with replica(broker, topic, group, "control.startupTimeoutMs=2000") as (
            svc,
            client,
            recorder,
        ):
            assert svc.fleet is not None
            assert svc.fleet.degraded is not None
            status = await client.status()
            assert status.fleet.degraded
            assert "2 partitions" in status.fleet.degraded_reason
            assert _metric(svc, "kafka_eventbus_fleet_degraded") == 1.0
            assert await client.health() == "SERVING"
            # It serves events on its configuration ...
            await produce(broker.bootstrap, topic, aggregate_events(4, 5, 2))
            await assert_eventually(lambda: len(recorder.events) == 20, timeout=20)
            # ... fleet writes are refused (not silently local), replica scope works.
            with pytest.raises(UnavailableError, match="control topic"):
                await client.set_mode("actor", timeout=5)
            assert (await client.set_mode("actor", scope="replica")).result.mode == 2
            fleet = await client.fleet_status()
            assert fleet.degraded
            assert not fleet.HasField("desired")
    assert any(e["event"] == "fleet.degraded" for e in logs)


async def test_fleet_control_disabled_keeps_replica_behaviour(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    async with replica(broker, topic, f"{topic}-g", "control.enabled=false") as (svc, client, _):
        assert svc.fleet is None
        assert not (await client.set_mode("actor")).HasField("fleet")
        assert not (await client.fleet_status()).enabled
        with pytest.raises(PreconditionError, match=r"control\.enabled"):
            await client.set_mode("keyed", scope="fleet")


async def test_a_fleet_state_waits_for_a_replica_change_that_holds_the_switch(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    """A desired state is applied in one callback of the service's loop,
    unless an awaited switch change (a replica-scope call waiting for its
    handover) holds the switch: then it is applied after that change, in
    order, and only then reported applied."""
    topic = await make_topic(partitions=1)
    group = f"{topic}-g"
    gate = asyncio.Event()
    started: list[str] = []

    async def handler(message: object) -> None:
        started.append(getattr(message, "aggregate_id", ""))
        await gate.wait()

    settings = service_settings(broker.bootstrap, topic, group, *FAST)
    async with (
        Service(settings, bootstrap_servers=broker.bootstrap, handler=handler) as svc,
        AsyncPoolControlClient(svc.endpoints.grpc_address or "", timeout=20) as client,  # type: ignore[union-attr]
    ):
        fleet = svc.fleet
        assert fleet is not None
        await produce(broker.bootstrap, topic, aggregate_events(1, 1, 1))
        await assert_eventually(lambda: started == ["agg-0"], message="the event is in flight")
        # The replica-scope change waits for agg-0's handover, holding the switch.
        local = asyncio.ensure_future(client.set_mode("actor", scope="replica", wait_timeout=30))
        await assert_eventually(lambda: mode_of(svc) is PoolMode.ACTOR)
        call = asyncio.ensure_future(client.set_rollout(40, wait_timeout=30))
        await assert_eventually(
            lambda: fleet.log.generation == 1, message="the fleet state is read"
        )
        await assert_eventually(
            lambda: any(t.get_name() == "fleet.apply" for t in asyncio.all_tasks()),
            message="the apply waits for the switch in a task",
        )
        assert fleet.applied_generation == 0
        assert svc.switch.rollout_percent == 100.0
        assert not call.done()
        gate.set()
        reply = await asyncio.wait_for(local, 20)
        assert reply.result.mode == pb.POOL_MODE_ACTOR
        fleet_reply = await asyncio.wait_for(call, 20)
        assert fleet_reply.fleet.complete
        assert [r.outcome for r in fleet_reply.fleet.replicas] == [pb.REPLICA_OUTCOME_APPLIED]
        # The fleet's state (generation 0's mode, the new rollout) overrode the replica's.
        assert (mode_of(svc), svc.switch.rollout_percent) == (PoolMode.KEYED, 40.0)
        assert fleet.applied_generation == 1


async def test_a_burst_of_fleet_writes_ends_with_the_last_one_applied(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    """States read while an apply runs are applied after it: however the
    follower's reads and the applies on the service's loop interleave, the
    replica ends on the latest generation (none is left unapplied)."""
    topic = await make_topic(partitions=2)
    async with replica(broker, topic, f"{topic}-g") as (svc, client, _):
        fleet = svc.fleet
        assert fleet is not None
        percents = [float(p % 101) for p in range(1, 41)]
        replies = await asyncio.gather(*(client.set_rollout(p, wait_timeout=0) for p in percents))
        last = max(r.fleet.generation for r in replies)
        assert last == 40
        await assert_eventually(
            lambda: fleet.applied_generation == last, message="the last generation applied"
        )
        assert svc.switch.rollout_percent == fleet.desired.rollout


async def test_fleet_calls_answer_while_the_service_loop_is_blocked(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    async with replica(broker, topic, f"{topic}-g") as (svc, client, _):
        fleet = svc.fleet
        assert fleet is not None
        assert svc.endpoints is not None
        address = svc.endpoints.grpc_address
        assert address is not None
        await assert_eventually(lambda: svc.instance in fleet.reports, message="own report")
        with (
            grpc.insecure_channel(address) as channel,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            stub = pb_grpc.PoolControlStub(channel)
            # A call that needs the service's loop, from another thread: it waits.
            status = pool.submit(stub.GetStatus, pb.GetStatusRequest(), timeout=30)
            # Blocking calls made on the service's own loop, which they hold
            # until they answer: they answer only because neither needs it.
            held = time.monotonic()
            reply = stub.GetFleetStatus(pb.GetFleetStatusRequest(), timeout=10)
            assert reply.enabled
            assert reply.instance == svc.instance
            switched = stub.SetPoolMode(
                pb.SetPoolModeRequest(
                    mode=pb.POOL_MODE_ACTOR,
                    scope=pb.SCOPE_FLEET,
                    wait_timeout=duration_pb2.Duration(seconds=0),
                ),
                timeout=10,
            )
            assert switched.fleet.generation == 1
            assert [r.outcome for r in switched.fleet.replicas] == [pb.REPLICA_OUTCOME_PENDING]
            # Not applied yet: the service's loop has not run a step since.
            assert mode_of(svc) is PoolMode.KEYED
            assert not status.done()
            assert time.monotonic() - held < 10
            # The block ends: the service's loop applies, and the waiting call answers.
            answered = await asyncio.wait_for(asyncio.wrap_future(status), 30)
            assert answered.mode in (pb.POOL_MODE_KEYED, pb.POOL_MODE_ACTOR)
        await assert_eventually(lambda: mode_of(svc) is PoolMode.ACTOR, message="applied")
        assert (await client.status()).fleet.applied_generation == 1
