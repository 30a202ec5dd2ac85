"""Both clients retry a call the server cancelled (a call racing a server stop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc

from clients import AsyncPoolControlClient, PoolControlClient, RetryOptions
from clients._client import ControlClientError

FAST = RetryOptions(attempts=3, initial_backoff=0.01)


class CancelsFirst(pb_grpc.PoolControlServicer):
    """GetStatus: cancelled server-side ``cancels`` times, then answered.

    The other methods answer UNIMPLEMENTED (the generated base class); its
    generated stubs call them abstract, hence the ``ignore[abstract]`` below.
    """

    def __init__(self, cancels: int) -> None:
        self.cancels = cancels
        self.calls = 0

    async def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        self.calls += 1
        if self.calls <= self.cancels:
            await context.abort(grpc.StatusCode.CANCELLED, "server stopping")
        return pb.GetStatusResponse(version="test")


async def serve(servicer: CancelsFirst) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_PoolControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def once() -> AsyncIterator[tuple[CancelsFirst, str]]:
    servicer = CancelsFirst(cancels=1)  # type: ignore[abstract]
    server, target = await serve(servicer)
    try:
        yield servicer, target
    finally:
        await server.stop(None)


async def test_async_client_retries_a_server_cancelled_call(
    once: tuple[CancelsFirst, str],
) -> None:
    servicer, target = once
    async with AsyncPoolControlClient(target, retry=FAST) as client:
        status = await client.status(timeout=5)
    assert status.version == "test"
    assert servicer.calls == 2


async def test_retries_are_bounded() -> None:
    servicer = CancelsFirst(cancels=10)  # type: ignore[abstract]
    server, target = await serve(servicer)
    try:
        async with AsyncPoolControlClient(target, retry=FAST) as client:
            with pytest.raises(ControlClientError):
                await client.status(timeout=5)
    finally:
        await server.stop(None)
    assert servicer.calls == 3


async def test_sync_client_retries_a_server_cancelled_call(
    once: tuple[CancelsFirst, str],
) -> None:
    servicer, target = once

    def call() -> str:
        with PoolControlClient(target, retry=FAST) as client:
            return client.status(timeout=5).version

    # The blocking client runs in a thread; the server stays on this loop.
    assert await asyncio.to_thread(call) == "test"
    assert servicer.calls == 2
