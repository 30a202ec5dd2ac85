"""server.healthcheck: the container's HEALTHCHECK, run as a real process against
the real control-plane gRPC server (health service) on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server._grpc import GrpcServerHandle, TlsFiles, start_grpc_server
from server.healthcheck import main
from tests.helpers import find_free_port
from tests.server.control_standin import StandInControlTarget, make_switch
from tests.server.grpc_harness import ADMIN, Gate
from tests.server.tls_certs import Certs, make_certs

REPO = Path(__file__).resolve().parents[2]


async def probe(*args: str) -> tuple[int, str, str]:
    """Run ``python -m server.healthcheck ARGS`` as a process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.healthcheck",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _server(**kwargs: object) -> GrpcServerHandle:
    target = StandInControlTarget(make_switch(Gate()))
    return await start_grpc_server(target, address="127.0.0.1:0", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def handle() -> AsyncIterator[GrpcServerHandle]:
    h = await _server(ready=False, admin_token=ADMIN)
    try:
        yield h
    finally:
        await h.stop(0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_exit_1_while_not_serving_then_0_once_ready(handle: GrpcServerHandle) -> None:
    address = f"127.0.0.1:{handle.port}"
    code, out, err = await probe("--address", address)
    assert code == 1
    assert "NOT_SERVING" in err
    assert out == ""

    await handle.set_ready()
    # The service requires an admin token for its RPCs; health is exempt.
    code, out, err = await probe("--address", address)
    assert code == 0, err
    assert out.strip() == f"{address} (server): SERVING"


async def test_named_service_and_unknown_service(handle: GrpcServerHandle) -> None:
    await handle.set_ready()
    address = f"127.0.0.1:{handle.port}"
    code, out, _ = await probe(
        "--address", address, "--service", "actorpool.control.v1.PoolControl"
    )
    assert code == 0
    assert "SERVING" in out
    code, _, err = await probe("--address", address, "--service", "no.such.Service")
    assert code == 1
    assert "NOT_FOUND" in err


async def test_exit_1_when_stopping(handle: GrpcServerHandle) -> None:
    await handle.set_ready()
    address = f"127.0.0.1:{handle.port}"
    assert (await probe("--address", address))[0] == 0
    await handle.stop(0)
    code, _, err = await probe("--address", address, "--timeout", "2")
    assert code == 1
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


async def test_exit_1_when_nothing_listens() -> None:
    code, out, err = await probe("--address", f"127.0.0.1:{find_free_port()}", "--timeout", "2")
    assert code == 1
    assert out == ""
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


async def test_tls_probe_trusts_the_ca_and_fails_without_it(certs: Certs) -> None:
    h = await _server(tls=TlsFiles(certs.server_cert, certs.server_key))
    try:
        address = f"127.0.0.1:{h.port}"
        code, out, err = await probe(
            "--address", address, "--ca-file", str(certs.ca), "--server-name", "localhost"
        )
        assert code == 0, err
        assert "SERVING" in out
        # Plaintext against a TLS port: not healthy.
        code, _, _ = await probe("--address", address, "--timeout", "2")
        assert code == 1
    finally:
        await h.stop(0)


async def test_mtls_probe_with_client_certificate_and_env_configuration(certs: Certs) -> None:
    h = await _server(tls=TlsFiles(certs.server_cert, certs.server_key, certs.ca))
    try:
        env = {
            "POOL_HEALTH_ADDRESS": f"localhost:{h.port}",
            "POOL_HEALTH_CA_FILE": str(certs.ca),
            "POOL_HEALTH_CERT_FILE": str(certs.client_cert),
            "POOL_HEALTH_KEY_FILE": str(certs.client_key),
        }
        # In-process (the env mapping is a parameter); the RPC is still real.
        assert await asyncio.to_thread(main, [], env) == 0
        without_cert = {k: v for k, v in env.items() if "CERT" not in k and "KEY" not in k}
        assert await asyncio.to_thread(main, ["--timeout", "2"], without_cert) == 1
    finally:
        await h.stop(0)


async def test_missing_tls_file_is_unhealthy_not_a_crash(tmp_path: Path) -> None:
    code, _, err = await probe(
        "--address", "127.0.0.1:1", "--ca-file", str(tmp_path / "missing.pem")
    )
    assert code == 1
    assert "cannot read TLS file" in err
    assert "Traceback" not in err
