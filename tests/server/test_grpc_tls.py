"""TLS and mutual TLS from certificate files, on a real loopback server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from structlog.testing import capture_logs

from server._grpc import GrpcConfigError, TlsFiles, start_grpc_server
from tests.server.control_standin import StandInControlTarget, make_switch
from tests.server.grpc_harness import ADMIN, Gate, bearer
from tests.server.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_tls_serves_clients_that_trust_the_server_certificate(certs: Certs) -> None:
    target = StandInControlTarget(make_switch(Gate()))
    tls = TlsFiles(certs.server_cert, certs.server_key)
    handle = await start_grpc_server(target, address="127.0.0.1:0", tls=tls)
    try:
        assert handle.tls
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{handle.port}", creds) as channel:
            status = await pb_grpc.PoolControlStub(channel).GetStatus(pb.GetStatusRequest())
            assert status.version == "test"
        # A plaintext client cannot talk to it.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.PoolControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await handle.stop(0)


async def test_mutual_tls_requires_a_client_certificate_and_audits_its_name(
    certs: Certs,
) -> None:
    target = StandInControlTarget(make_switch(Gate()))
    tls = TlsFiles(certs.server_cert, certs.server_key, client_ca_file=certs.ca)
    # mTLS authenticates clients, so a remote address needs no token.
    handle = await start_grpc_server(target, address="0.0.0.0:0", tls=tls, admin_token=ADMIN)
    try:
        ca = certs.ca.read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=certs.client_key.read_bytes(),
            certificate_chain=certs.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{handle.port}", with_cert) as channel:
            stub = pb_grpc.PoolControlStub(channel)
            with capture_logs() as logs:
                await stub.Pause(pb.PauseRequest(request_id="m1"), metadata=bearer(ADMIN))
            audit = next(e for e in logs if e["event"] == "control.audit")
            assert audit["identity"] == certs.client_cn
        without = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"localhost:{handle.port}", without) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.PoolControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await handle.stop(0)


async def test_unreadable_tls_files_are_a_clear_configuration_error(tmp_path: Path) -> None:
    target = StandInControlTarget(make_switch(Gate()))
    tls = TlsFiles(tmp_path / "missing.pem", tmp_path / "missing.key")
    with pytest.raises(GrpcConfigError, match="cannot read TLS files"):
        await start_grpc_server(target, address="127.0.0.1:0", tls=tls)
