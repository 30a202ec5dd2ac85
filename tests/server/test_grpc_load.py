"""Mode switches and rollout changes over gRPC while events flow through the real switch."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from actorpool.control.v1 import control_pb2 as pb

from pool import Message
from tests.server.grpc_harness import control_server

AGGREGATES = 40
EVENTS_PER_AGGREGATE = 40


class OrderRecorder:
    """Handler pair (one per pool) recording, per aggregate, the order of offsets
    handled and any overlap (two events of one aggregate running at once)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.active: set[str] = set()
        self.overlaps: list[str] = []
        self.by_pool = {"keyed": 0, "actor": 0}
        self.rand = random.Random(7)

    def handler(self, pool: str):  # type: ignore[no-untyped-def]
        async def handle(message: Message) -> None:
            key = message.aggregate_id
            if key in self.active:
                self.overlaps.append(key)
            self.active.add(key)
            try:
                await asyncio.sleep(self.rand.random() * 0.002)
                self.seen[key].append(message.offset)
                self.by_pool[pool] += 1
            finally:
                self.active.discard(key)

        return handle


async def test_mode_switches_and_rollout_changes_under_load_keep_per_aggregate_order() -> None:
    rec = OrderRecorder()
    async with control_server(
        rec.handler("keyed"), actor_handler=rec.handler("actor"), size=8, capacity=2000
    ) as h:
        fed: dict[str, list[int]] = defaultdict(list)
        completions: list[asyncio.Future[object]] = []

        async def feed_rounds(rounds: int) -> None:
            for _ in range(rounds):
                for a in range(AGGREGATES):
                    key = f"agg-{a}"
                    partition = a % 2
                    offset = h.target.parts[("events", partition)].position
                    completions.append(await h.target.feed(key, partition))
                    fed[key].append(offset)

        total = AGGREGATES * EVENTS_PER_AGGREGATE
        steps = [
            ("mode", pb.POOL_MODE_ACTOR),
            ("rollout", 30.0),
            ("rollout", 70.0),
            ("mode", pb.POOL_MODE_KEYED),
            ("mode", pb.POOL_MODE_ACTOR),
            ("rollout", 100.0),
        ]
        rounds = EVENTS_PER_AGGREGATE // (len(steps) + 1)
        waited = 0
        for i, (kind, value) in enumerate(steps):
            await feed_rounds(rounds)
            # Switch with those events still in flight in the pools.
            if kind == "mode":
                reply = await h.stub.SetPoolMode(
                    pb.SetPoolModeRequest(mode=value, request_id=f"s{i}")  # type: ignore[arg-type]
                )
            else:
                reply = await h.stub.SetRollout(
                    pb.SetRolloutRequest(percent=value, request_id=f"s{i}")
                )
            assert reply.result.generation == i + 1
            waited += reply.result.waited_aggregates
        await feed_rounds(EVENTS_PER_AGGREGATE - rounds * len(steps))
        await asyncio.wait_for(asyncio.gather(*completions), 30)

        assert rec.overlaps == []
        assert sum(len(v) for v in rec.seen.values()) == total
        for key, offsets in fed.items():
            assert rec.seen[key] == offsets, f"{key} handled out of order"
        assert rec.by_pool["keyed"] > 0
        assert rec.by_pool["actor"] > 0
        assert waited > 0, "no switch happened with events in flight"
        status = await h.stub.GetStatus(pb.GetStatusRequest())
        assert status.mode == pb.POOL_MODE_ACTOR
        assert status.rollout_percent == 100.0
        assert status.generation == len(steps)
        assert status.in_flight == 0
