"""A real control-plane server on loopback port 0 over a real PoolSwitch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from pool import Handler, Message, NonRetryableError, PoolMode, PoolSwitch
from server._grpc import GrpcServerHandle, start_grpc_server
from tests.server.control_standin import StandInControlTarget, make_switch

ADMIN = "admin-secret"
READER = "read-secret"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Gate:
    """A handler that holds every event until ``open()``; poison aggregates fail."""

    def __init__(self, *, closed: bool = False) -> None:
        self.event = asyncio.Event()
        if not closed:
            self.event.set()
        self.handled: list[Message] = []

    def open(self) -> None:
        self.event.set()

    async def __call__(self, message: Message) -> None:
        if message.aggregate_id.startswith("poison"):
            raise NonRetryableError(f"cannot handle {message.aggregate_id}")
        await self.event.wait()
        self.handled.append(message)


@dataclass
class Harness:
    target: StandInControlTarget
    switch: PoolSwitch
    handle: GrpcServerHandle
    channel: grpc.aio.Channel
    stub: Any  # PoolControlAsyncStub
    registry: CollectorRegistry

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.handle.port}"

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def control_server(
    handler: Handler | None = None,
    *,
    actor_handler: Handler | None = None,
    mode: PoolMode = PoolMode.KEYED,
    size: int = 8,
    capacity: int = 100,
    **server_kwargs: Any,
) -> AsyncIterator[Harness]:
    switch = make_switch(
        handler or Gate(), actor_handler=actor_handler, size=size, capacity=capacity, mode=mode
    )
    target = StandInControlTarget(switch)
    registry = CollectorRegistry()
    switch.start()
    handle = await start_grpc_server(
        target, address="127.0.0.1:0", registry=registry, **server_kwargs
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        yield Harness(target, switch, handle, channel, pb_grpc.PoolControlStub(channel), registry)
    finally:
        await channel.close(grace=None)
        await handle.stop(0.5)
        await switch.close(timeout=1.0)
