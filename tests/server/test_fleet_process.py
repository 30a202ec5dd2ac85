"""Fleet control with real processes (``python -m server``) on the embedded
broker: three replicas under load, kill -9 and restart, a fleet-paused
partition moving owners, racing compare-and-set writes, a control topic that
cannot be used. The handler (``bench.campaigns._handler``, run by the
service processes of :mod:`tests.support.harness`) records every handled event
with its process, so loss and order are judged from outside.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from actorpool.control.v1 import control_pb2 as pb

from clients import ConflictError, PreconditionError
from server._broker import EmbeddedBroker
from tests.conftest import MakeTopic
from tests.support.harness import (
    ServiceProcess,
    SteadyProducer,
    account,
    read_records,
    read_topic,
    wait_for,
)

#: Every test here starts the service as a process.
pytestmark = pytest.mark.process

#: Fast reports: a killed replica is stale after 3 x 300 ms.
FLEET_SETTINGS = {"control.heartbeatMs": 300, "log.level": "info"}


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    yield procs
    for svc in procs:
        svc.cleanup()


def _replica(
    broker: EmbeddedBroker,
    topic: str,
    workdir: Path,
    services: list[ServiceProcess],
    name: str,
    record: Path,
    **settings: object,
) -> ServiceProcess:
    svc = ServiceProcess(
        broker.bootstrap,
        topic,
        workdir,
        mode="keyed",
        name=name,
        settings={**FLEET_SETTINGS, **settings},
    )
    svc.record = record  # one file for every replica: lines never interleave
    services.append(svc)
    return svc


async def _topic(broker: EmbeddedBroker, make_topic: MakeTopic, partitions: int) -> str:
    topic = await make_topic(partitions=partitions)
    await broker.create_topics({f"{topic}.dlq": 1})
    return topic


async def test_three_replicas_under_load_a_fleet_switch_through_one_reaches_all(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    partitions = 6
    topic = await _topic(broker, make_topic, partitions)
    record = tmp_path / "all.records"
    replicas = [_replica(broker, topic, tmp_path, services, f"r{i}", record) for i in range(3)]
    for svc in replicas:
        await svc.start(wait_assigned=False)
    await wait_for(
        lambda: _all_assigned(replicas), 30, "every replica owns a partition", interval=0.2
    )
    producer = SteadyProducer(broker.bootstrap, topic, partitions=partitions, aggregates=600)
    stop = asyncio.Event()
    producing = asyncio.ensure_future(producer.run(10_000, seconds=30, stop=stop))
    try:
        await wait_for(lambda: len(read_records(record)) > 3_000, 30, "the stream flows")
        async with replicas[0].client(timeout=30) as client:
            reply = await client.set_mode("actor", wait_timeout=10)
            assert reply.fleet.complete, reply
            results = {r.instance: r for r in reply.fleet.replicas}
            assert len(results) == 3
            assert all(r.outcome == pb.REPLICA_OUTCOME_APPLIED for r in results.values())
            assert {r.grpc_address for r in results.values()} == {s.grpc_address for s in replicas}
            took = max(r.took.ToNanoseconds() for r in results.values()) / 1e6
            assert took < 5_000, f"slowest replica applied after {took:.0f} ms"
            for svc in replicas:
                async with svc.client() as c:
                    status = await c.status()
                    assert status.mode == pb.POOL_MODE_ACTOR
                    assert status.fleet.applied_generation == reply.fleet.generation
                    assert not status.fleet.diverged
            # Racing compare-and-set writes through the three replicas: exactly one wins.
            gen = reply.fleet.generation
            clients = [svc.client(timeout=30) for svc in replicas]
            try:
                outcomes = await asyncio.gather(
                    *(
                        c.set_rollout(10 * (i + 1), expected_generation=gen, wait_timeout=0)
                        for i, c in enumerate(clients)
                    ),
                    return_exceptions=True,
                )
            finally:
                for c in clients:
                    await c.close()
            winners = [o for o in outcomes if isinstance(o, pb.SetRolloutResponse)]
            losers = [o for o in outcomes if isinstance(o, ConflictError | PreconditionError)]
            assert len(winners) == 1, outcomes
            assert len(losers) == 2, outcomes
            assert winners[0].fleet.generation == gen + 1
        await asyncio.sleep(1.0)  # keep the load on after the switch
    finally:
        stop.set()
        stats = await producing
    truth = await read_topic(broker.bootstrap, topic)
    assert len(truth) == stats.acked
    keys = {(r.partition, r.offset) for r in truth}
    await wait_for(
        lambda: keys <= {(r.partition, r.offset) for r in read_records(record)},
        60,
        "every event handled",
        interval=0.25,
    )
    acc = account(truth, read_records(record))
    assert acc.lost == 0, acc.lost_sample
    assert acc.reordered == 0, acc.reordered_sample
    assert acc.overlapped == 0
    assert acc.processes == 3
    assert stats.rate > 5_000


async def _all_assigned(replicas: list[ServiceProcess]) -> bool:
    return all([await svc.assigned() for svc in replicas])


async def test_kill_9_and_restart_applies_the_fleet_mode_before_its_first_event(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    topic = await _topic(broker, make_topic, 2)
    record = tmp_path / "all.records"
    svc = _replica(broker, topic, tmp_path, services, "solo", record)
    await svc.start()
    async with svc.client() as client:
        reply = await client.set_mode("actor")
        assert reply.fleet.complete
    svc.kill(signal.SIGKILL)
    producer = SteadyProducer(broker.bootstrap, topic, partitions=2, aggregates=50)
    stats = await producer.run(5_000, seconds=0.4)
    # Configured "keyed" again; the fleet says "actor".
    await svc.start()
    await wait_for(lambda: len(read_records(record)) >= stats.acked, 30, "the backlog handled")
    metrics = svc.metrics()
    assert metrics.get("kafka_eventbus_keyed_pool_messages_sent_total", 0) == 0
    assert metrics["kafka_eventbus_actor_pool_messages_sent_total"] >= stats.acked
    assert metrics["kafka_eventbus_fleet_applied_generation"] == 1
    assert metrics["kafka_eventbus_fleet_diverged"] == 0


#: Slow reports: a killed replica turns stale only after 3 x 3 s.
SLOW_HEARTBEAT = {"control.heartbeatMs": 3000}


async def test_a_replica_killed_right_before_a_fleet_call_is_answered_down_at_once(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    topic = await _topic(broker, make_topic, 2)
    record = tmp_path / "all.records"
    a = _replica(broker, topic, tmp_path, services, "a", record, **SLOW_HEARTBEAT)
    b = _replica(broker, topic, tmp_path, services, "b", record, **SLOW_HEARTBEAT)
    await a.start(wait_assigned=False)
    await b.start(wait_assigned=False)
    async with a.client(timeout=30) as client:

        async def both_reported() -> bool:
            return len((await client.fleet_status()).replicas) == 2

        await wait_for(both_reported, 30, "both replicas reported", interval=0.1)
        b_instance = next(
            r.report.instance
            for r in (await client.fleet_status()).replicas
            if r.report.grpc_address == b.grpc_address
        )
        b.kill(signal.SIGKILL)
        started = asyncio.get_running_loop().time()
        reply = await client.set_mode("actor", wait_timeout=20)
        took = asyncio.get_running_loop().time() - started
        # Far below the 9 s its report needs to turn stale (and the 20 s wait).
        assert took < 3.0, f"the call took {took:.1f} s"
        results = {r.instance: r for r in reply.fleet.replicas}
        assert results[b_instance].outcome == pb.REPLICA_OUTCOME_DOWN
        assert "connection refused" in results[b_instance].error
        assert results[b_instance].grpc_address == b.grpc_address
        others = [r for i, r in results.items() if i != b_instance]
        assert [r.outcome for r in others] == [pb.REPLICA_OUTCOME_APPLIED]
        assert reply.fleet.complete
        fleet = await client.fleet_status()
        gone = next(r for r in fleet.replicas if r.report.instance == b_instance)
        assert gone.down
        assert not gone.stale
        assert "connection refused" in gone.down_reason
    # Restarted (configured keyed): it follows the fleet's mode before its first event.
    await b.start()
    producer = SteadyProducer(broker.bootstrap, topic, partitions=2, aggregates=20)
    stats = await producer.run(1_000, seconds=0.3)
    await wait_for(lambda: len(read_records(record)) >= stats.acked, 30, "events handled")
    async with b.client() as client:
        status = await client.status()
        assert status.mode == pb.POOL_MODE_ACTOR
        assert not status.fleet.diverged
    assert b.metrics().get("kafka_eventbus_keyed_pool_messages_sent_total", 0) == 0


async def test_a_live_but_frozen_replica_is_waited_for_never_answered_down(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    topic = await _topic(broker, make_topic, 2)
    record = tmp_path / "all.records"
    a = _replica(broker, topic, tmp_path, services, "a", record, **SLOW_HEARTBEAT)
    b = _replica(broker, topic, tmp_path, services, "b", record, **SLOW_HEARTBEAT)
    await a.start(wait_assigned=False)
    await b.start(wait_assigned=False)
    assert b.proc is not None
    async with a.client(timeout=30) as client:

        async def both_reported() -> bool:
            return len((await client.fleet_status()).replicas) == 2

        await wait_for(both_reported, 30, "both replicas reported", interval=0.1)
        # SIGSTOP: its sockets accept connections, nothing answers (a blocked loop).
        b.proc.send_signal(signal.SIGSTOP)
        try:
            reply = await client.set_mode("actor", wait_timeout=2)
            results = {r.grpc_address: r for r in reply.fleet.replicas}
            assert results[b.grpc_address].outcome == pb.REPLICA_OUTCOME_PENDING
            assert results[a.grpc_address].outcome == pb.REPLICA_OUTCOME_APPLIED
            assert not reply.fleet.complete
        finally:
            b.proc.send_signal(signal.SIGCONT)
    async with b.client(timeout=30) as client:

        async def b_applied() -> bool:
            return (await client.status()).mode == pb.POOL_MODE_ACTOR

        await wait_for(b_applied, 30, "b applied the fleet's mode once it ran again")


async def test_a_fleet_paused_partition_stays_paused_after_its_owner_is_killed(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    partitions = 4
    topic = await _topic(broker, make_topic, partitions)
    record = tmp_path / "all.records"
    a = _replica(broker, topic, tmp_path, services, "a", record)
    b = _replica(broker, topic, tmp_path, services, "b", record)
    await a.start(wait_assigned=False)
    await b.start(wait_assigned=False)
    await wait_for(lambda: _all_assigned([a, b]), 30, "both own partitions", interval=0.2)
    async with a.client() as client:
        status = await client.status()
        owned_by_a = sorted(p.partition for p in status.partitions)
        paused = owned_by_a[0]
        reply = await client.pause_reply([(topic, paused)])
        assert [(p.topic, p.partition) for p in reply.partitions] == [(topic, paused)]
        assert reply.fleet.complete
    a.kill(signal.SIGKILL)
    producer = SteadyProducer(broker.bootstrap, topic, partitions=partitions, aggregates=40)
    stats = await producer.run(2_000, seconds=0.5)
    truth = await read_topic(broker.bootstrap, topic)
    assert len(truth) == stats.acked

    async def b_owns_everything() -> bool:
        async with b.client() as c:
            return len((await c.status()).partitions) == partitions

    await wait_for(b_owns_everything, 30, "b took over a's partitions", interval=0.2)
    others = {(r.partition, r.offset) for r in truth if r.partition != paused}
    await wait_for(
        lambda: others <= {(r.partition, r.offset) for r in read_records(record)},
        30,
        "every other partition handled",
    )
    async with b.client() as client:
        status = await client.status()
        by_partition = {p.partition: list(p.paused_reasons) for p in status.partitions}
        assert by_partition[paused] == ["operator"]
        assert not [
            r for r in read_records(record) if r.partition == paused and r.pid == b.pids[-1]
        ]
        # Resume through the fleet: the partition flows on its new owner.
        await client.resume([(topic, paused)])
    keys = {(r.partition, r.offset) for r in truth}
    await wait_for(
        lambda: keys <= {(r.partition, r.offset) for r in read_records(record)},
        30,
        "the paused partition handled after resume",
    )
    acc = account(truth, read_records(record))
    assert acc.lost == 0
    assert acc.reordered == 0


async def test_control_topic_unusable_the_process_starts_degraded_and_serves(
    broker: EmbeddedBroker, make_topic: MakeTopic, tmp_path: Path, services: list[ServiceProcess]
) -> None:
    topic = await _topic(broker, make_topic, 2)
    await broker.create_topics({f"{topic}-g.control": 3})
    record = tmp_path / "all.records"
    svc = _replica(
        broker, topic, tmp_path, services, "degraded", record, **{"control.startupTimeoutMs": 1000}
    )
    await svc.start()
    async with svc.client() as client:
        status = await client.status()
        assert status.fleet.degraded
        assert "3 partitions" in status.fleet.degraded_reason
        assert await client.health() == "SERVING"
    producer = SteadyProducer(broker.bootstrap, topic, partitions=2, aggregates=20)
    stats = await producer.run(1_000, seconds=0.3)
    await wait_for(lambda: len(read_records(record)) >= stats.acked, 30, "events handled")
    assert svc.metrics()["kafka_eventbus_fleet_degraded"] == 1
    assert svc.running
    assert "fleet.degraded" in svc.err.read_text()
