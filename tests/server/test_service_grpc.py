"""The real service driven over its real gRPC control plane (loopback, port 0)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable

from clients import AsyncPoolControlClient
from pool import Message
from server._broker import EmbeddedBroker
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, envelope, produce
from tests.server.recording_handler import MemoryRecorder
from tests.server.test_service import service_settings


class SlowRecorder(MemoryRecorder):
    """Awaits ``delay`` per event, and holds aggregates listed in ``gates``."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, message: Message) -> None:
        gate = self.gates.get(message.aggregate_id)
        if gate is not None:
            await gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        await super().__call__(message)


async def test_status_pause_and_mode_switch_over_grpc_keep_order(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    recorder = SlowRecorder(delay=0.001)
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        assert svc.endpoints is not None
        assert svc.endpoints.grpc_address is not None
        async with AsyncPoolControlClient(svc.endpoints.grpc_address) as client:
            await svc.consumer.wait_assigned(10)
            assert await client.health() == "SERVING"
            status = await client.status()
            assert sorted(p.partition for p in status.partitions) == [0, 1, 2, 3]
            assert status.group_id == f"{topic}-g"

            assert await client.pause([(topic, 3)]) == [(topic, 3)]
            first = aggregate_events(40, 25, 4)
            producing = asyncio.ensure_future(produce(broker.bootstrap, topic, first))
            # Switch to the actor pool while the first half is in flight.
            await assert_eventually(lambda: len(recorder.events) > 100)
            result = await client.set_mode("actor", wait_timeout=5)
            assert result.result.mode == 2  # POOL_MODE_ACTOR
            assert len(recorder.events) < 2000, "the switch came after the traffic"
            await producing
            second = [
                (i % 4, f"agg-{i}".encode(), envelope(f"agg-{i}", 25 + seq))
                for seq in range(25)
                for i in range(40)
            ]
            await produce(broker.bootstrap, topic, second)
            # Partition 3 is paused: its 10 aggregates x 50 events wait.
            await assert_eventually(lambda: len(recorder.events) == 1500, timeout=20)
            status = await client.status()
            paused = {p.partition: p.paused for p in status.partitions}
            assert paused == {0: False, 1: False, 2: False, 3: True}
            await client.resume()
            await assert_eventually(lambda: len(recorder.events) == 2000, timeout=20)
            assert _total(svc, "kafka_eventbus_actor_pool_messages_sent_total") >= 1000
            assert _total(svc, "kafka_eventbus_keyed_pool_messages_sent_total") >= 100
            assert (await client.status()).mode == 2
    by_agg: dict[str, list[int]] = defaultdict(list)
    for agg, seq, _p, _o in recorder.events:
        by_agg[agg].append(seq)
    assert all(seqs == list(range(50)) for seqs in by_agg.values())


async def test_stop_reports_not_serving_before_it_drains(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    recorder = SlowRecorder()
    recorder.gates["held"] = asyncio.Event()
    settings = service_settings(broker.bootstrap, topic, f"{topic}-g")
    svc = Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder)
    await svc.start()
    assert svc.endpoints is not None
    assert svc.endpoints.grpc_address is not None
    stopping: asyncio.Future[None] | None = None
    try:
        async with AsyncPoolControlClient(svc.endpoints.grpc_address) as client:
            await svc.consumer.wait_assigned(10)
            await produce(broker.bootstrap, topic, [(0, b"held", envelope("held", 0))])
            await assert_eventually(lambda: svc.consumer.in_flight == 1)
            stopping = asyncio.ensure_future(svc.stop())
            await assert_eventually(
                lambda: _is(client.health(), "NOT_SERVING"), message="NOT_SERVING while draining"
            )
            assert not stopping.done()
            recorder.gates["held"].set()
            await stopping
        assert [e[0] for e in recorder.events] == ["held"]
    finally:
        recorder.gates["held"].set()
        await svc.stop()


async def _is(status: Awaitable[str], wanted: str) -> bool:
    return await status == wanted


def _total(svc: Service, name: str) -> float:
    return sum(
        sample.value
        for family in svc.registry.collect()
        for sample in family.samples
        if sample.name == name
    )
