"""The control-abuse campaign's fast parts against the real service in-process
(real gRPC server on loopback, real broker): a short hypothesis fuzz of every
RPC, the token checks, and a dead-letter stream that is never read."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc

from bench.campaigns.control_abuse import (
    ADMIN,
    CHURN_SLOPE_MIB_PER_ROUND,
    READ,
    SKIPPED,
    _slope,
    draw_requests,
    fuzz,
    token_checks,
)
from pool import Message, NonRetryableError
from server._broker import EmbeddedBroker
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import envelope, produce
from tests.server.test_service import service_settings


class Handler:
    def __init__(self) -> None:
        self.handled = 0

    async def __call__(self, message: Message) -> None:
        if (message.envelope or {}).get("payload", {}).get("poison"):
            raise NonRetryableError("poison")
        self.handled += 1


def _settings(bootstrap: str, topic: str) -> object:
    return service_settings(
        bootstrap, topic, f"{topic}-g", f"grpc.adminToken={ADMIN}", f"grpc.readToken={READ}"
    )


def _skipped(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(SKIPPED))


async def test_fuzzed_rpcs_and_bad_tokens_get_defined_answers_and_events_still_flow(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    requests = draw_requests(topic, 6)  # before the service runs (it uses random)
    handler = Handler()
    settings = _settings(broker.bootstrap, topic)
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=handler) as svc:  # type: ignore[arg-type]
        await svc.consumer.wait_assigned(10)
        assert svc.endpoints is not None
        assert svc.endpoints.grpc_address
        address = svc.endpoints.grpc_address
        fz = await asyncio.to_thread(fuzz, address, requests, 0.5)
        assert fz["bad"] == []
        assert all(sum(codes.values()) >= 1 for codes in fz["calls"].values())
        tk = await asyncio.to_thread(token_checks, address)
        assert tk["wrong"] == []
        assert tk["checked"] == 55
        await produce(
            broker.bootstrap, topic, [(0, b"a", envelope("a", 0)), (1, b"b", envelope("b", 0))]
        )
        await assert_eventually(
            lambda: handler.handled == 2, message="intake resumed after fuzzing"
        )


async def test_a_stream_never_read_skips_and_says_so_without_slowing_processing(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    handler = Handler()
    settings = _settings(broker.bootstrap, topic)
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=handler) as svc:  # type: ignore[arg-type]
        await svc.consumer.wait_assigned(10)
        assert svc.endpoints is not None
        metrics = svc.endpoints.metrics_address
        grpc_address = svc.endpoints.grpc_address
        assert metrics is not None
        assert grpc_address is not None
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            stream = pb_grpc.PoolControlStub(channel).StreamDeadLetters(
                pb.StreamDeadLettersRequest(follow=True, buffer_size=10),
                metadata=[("authorization", f"Bearer {READ}")],
            )
            await stream.wait_for_connection()
            events = [
                (
                    0,
                    f"p-{i}".encode(),
                    envelope(f"p-{i}", 0, payload={"seq": 0, "poison": i % 2 == 0}),
                )
                for i in range(400)
            ]
            ends = await produce(broker.bootstrap, topic, events)
            # Not held up by the reader: everything handled or dead-lettered, and committed.
            await assert_eventually(
                lambda: svc.status().partitions[0].committed == ends[0], timeout=20
            )
            assert handler.handled == 200
            await assert_eventually(lambda: _skipped(metrics) > 0, message="skips counted")
            notice = None
            async for event in stream:
                if event.HasField("skipped"):
                    notice = event.skipped
                    break
            stream.cancel()
        assert notice is not None
        assert 0 < notice.count <= notice.total


def test_the_churn_slope_sees_a_trend_through_the_allocator_swings() -> None:
    # Measured after a warm-up round: 1 000 streams opened and closed, no leak.
    swings = [111.1, 101.9, 112.8, 101.9, 103.0, 102.1, 110.2, 102.9, 112.3, 102.6, 107.4]
    assert abs(_slope(swings)) < CHURN_SLOPE_MIB_PER_ROUND
    leak = [v + 1.0 * i for i, v in enumerate(swings)]  # 1 KiB x 1000 streams a round
    assert _slope(leak) > CHURN_SLOPE_MIB_PER_ROUND
    assert _slope([5.0]) == 0.0
