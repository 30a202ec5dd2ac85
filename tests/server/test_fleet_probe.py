"""Probing a replica that has not applied: proof that it is gone, or nothing.

Real sockets and a real gRPC server on loopback; ``dial_target`` is pure."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from server._fleet_probe import dial_target, identity_service, probe_gone


def test_an_address_is_probed_only_where_it_names_one_process() -> None:
    assert dial_target("10.1.2.3:50051", same_host=False) == ("10.1.2.3", 50051)
    assert dial_target("replica-2.svc:50051", same_host=False) == ("replica-2.svc", 50051)
    assert dial_target("[fd00::7]:50051", same_host=False) == ("fd00::7", 50051)
    # Loopback and unspecified addresses mean "this host": only from the same host.
    assert dial_target("127.0.0.1:50051", same_host=False) is None
    assert dial_target("127.0.0.1:50051", same_host=True) == ("127.0.0.1", 50051)
    assert dial_target("localhost:50051", same_host=False) is None
    assert dial_target("0.0.0.0:50051", same_host=False) is None
    assert dial_target("0.0.0.0:50051", same_host=True) == ("127.0.0.1", 50051)
    assert dial_target("[::]:50051", same_host=True) == ("::1", 50051)
    assert dial_target("[::1]:50051", same_host=False) is None
    for bad in ("", "nohost", "host:", "host:0", "host:70000", "host:x"):
        assert dial_target(bad, same_host=True) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_connection_refused_is_a_proof() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    why = await probe_gone(address, "r1", same_host=True)
    assert why == f"nothing listens at {address} (connection refused)"
    # The same address from another host proves nothing.
    assert await probe_gone(address, "r1", same_host=False) is None


@pytest.fixture
async def replica_server() -> AsyncIterator[str]:
    """A gRPC server with the health service, announcing instance ``r1``."""
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set(identity_service("r1"), health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_the_replica_itself_answering_is_no_proof(replica_server: str) -> None:
    assert await probe_gone(replica_server, "r1", same_host=True) is None


async def test_another_process_at_the_address_is_a_proof(replica_server: str) -> None:
    # A replica restarted on the same port is a new instance: the old one is gone.
    why = await probe_gone(replica_server, "r0", same_host=True)
    assert why == f"{replica_server} is served by another process (r0 is not there)"
    # With TLS the identity is not checked: a listener is no proof either way.
    assert await probe_gone(replica_server, "r0", same_host=True, tls=True) is None


async def test_a_listener_that_never_answers_is_no_proof() -> None:
    # What a live replica with a blocked event loop (or a SIGSTOPped process)
    # looks like: the kernel accepts the connection, nobody speaks gRPC.
    handlers: list[asyncio.Task[None]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        assert await probe_gone(f"127.0.0.1:{port}", "r1", same_host=True, timeout=0.3) is None
        assert time.monotonic() - started < 2.0
    finally:
        server.close()
        await server.wait_closed()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
