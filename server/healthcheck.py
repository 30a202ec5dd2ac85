"""Health probe for containers: ``python -m server.healthcheck [--address HOST:PORT]``.

Calls ``grpc.health.v1.Health/Check`` on the service's gRPC port and exits 0
when the answer is ``SERVING``, 1 otherwise (``NOT_SERVING`` while starting,
draining or stopping; unreachable; timed out; TLS failure). One line goes to
stdout (healthy) or stderr (not), which Docker keeps in ``docker inspect``.
The Dockerfile's ``HEALTHCHECK`` runs it; no probe binary is downloaded.

Options (each also from the environment, for images):

- ``--address`` (``POOL_HEALTH_ADDRESS``, default ``127.0.0.1:50051``);
- ``--service`` (default ``""``: the whole server);
- ``--timeout`` seconds (``POOL_HEALTH_TIMEOUT``, default 3);
- ``--tls`` with ``--ca-file``, optional ``--cert-file``/``--key-file`` (mTLS) and
  ``--server-name`` (the name in the server's certificate when it is not the
  address's host), or the ``POOL_HEALTH_CA_FILE``/``..._CERT_FILE``/
  ``..._KEY_FILE``/``..._SERVER_NAME`` variables (any of them implies TLS).

The health service needs no token: the control plane's auth exempts it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthResult", "TlsOptions", "check", "main"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """Client-side TLS for the probe; all paths are PEM files."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class HealthResult:
    """``status`` is the health status name (``SERVING``...) or an error description."""

    healthy: bool
    status: str


def _channel(address: str, tls: TlsOptions | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes() if tls.ca_file else None,
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )
    options = []
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, creds, options=options)


def check(
    address: str = DEFAULT_ADDRESS,
    *,
    service: str = "",
    timeout: float = 3.0,
    tls: TlsOptions | None = None,
) -> HealthResult:
    """One ``Health/Check`` call; never raises for RPC or file errors."""
    try:
        channel = _channel(address, tls)
    except OSError as exc:
        return HealthResult(False, f"cannot read TLS file: {exc}")
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return HealthResult(False, f"{name}: {details}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthResult(response.status == health_pb2.HealthCheckResponse.SERVING, status)


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 when the pool-server gRPC health service says SERVING, else 1.",
    )
    p.add_argument("--address", default=env.get("POOL_HEALTH_ADDRESS", DEFAULT_ADDRESS))
    p.add_argument("--service", default="", help='health service name ("" = the server)')
    p.add_argument(
        "--timeout", type=float, default=float(env.get("POOL_HEALTH_TIMEOUT", "3")), help="seconds"
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-file", type=Path, default=env.get("POOL_HEALTH_CA_FILE"))
    p.add_argument("--cert-file", type=Path, default=env.get("POOL_HEALTH_CERT_FILE"))
    p.add_argument("--key-file", type=Path, default=env.get("POOL_HEALTH_KEY_FILE"))
    p.add_argument("--server-name", default=env.get("POOL_HEALTH_SERVER_NAME"))
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    ns = _parser(env).parse_args(argv)
    tls: TlsOptions | None = None
    if ns.tls or ns.ca_file or ns.cert_file or ns.key_file or ns.server_name:
        tls = TlsOptions(
            ca_file=ns.ca_file and Path(ns.ca_file),
            cert_file=ns.cert_file and Path(ns.cert_file),
            key_file=ns.key_file and Path(ns.key_file),
            server_name=ns.server_name,
        )
    result = check(ns.address, service=ns.service, timeout=ns.timeout, tls=tls)
    line = f"{ns.address} {ns.service or '(server)'}: {result.status}\n"
    (sys.stdout if result.healthy else sys.stderr).write(line)
    return 0 if result.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
