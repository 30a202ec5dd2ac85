"""Start the control plane: :func:`start_grpc_server` binds it and returns a
:class:`GrpcServerHandle`; :class:`TlsFiles` and :class:`GrpcConfigError` are its options
and its refusal."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from server._config import host_is_loopback
from server._control import ControlTarget
from server._control_metrics import control_metrics
from server._errors import ServiceError
from server._grpc._auth import TokenAuth
from server._grpc._health import HEALTH_SERVICE_NAME, HealthState
from server._grpc._interceptor import ControlInterceptor
from server._grpc._servicer import (
    DEFAULT_STREAM_BUFFER,
    MUTATING_METHODS,
    SERVICE_NAME,
    PoolControlServicer,
)

__all__ = [
    "GrpcConfigError",
    "GrpcServerHandle",
    "TlsFiles",
    "split_address",
    "start_grpc_server",
]

log = structlog.get_logger("server.grpc")


class GrpcConfigError(ServiceError, ValueError):
    """The control plane refuses to start with this configuration."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Server certificate and key (PEM); with ``client_ca_file``, clients must
    present a certificate signed by that CA (mutual TLS)."""

    cert_file: str | Path
    key_file: str | Path
    client_ca_file: str | Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key = Path(self.key_file).read_bytes()
        cert = Path(self.cert_file).read_bytes()
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[::1]:port"`` → ``(host, port)``; :class:`GrpcConfigError`
    (a ``ValueError``) if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise GrpcConfigError(f"gRPC address must be host:port, got {address!r}")
    port = int(port_text)
    if port > 65535:
        raise GrpcConfigError(f"gRPC port out of range in {address!r}")
    return host.removeprefix("[").removesuffix("]"), port


class GrpcServerHandle:
    """A running control-plane server. ``stop()`` is idempotent; ``async with`` stops it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        address: str,
        port: int,
        health: HealthState,
        servicer: PoolControlServicer,
        tls: bool,
    ) -> None:
        self._server = server
        self.address = address
        self.port = port
        self._health = health
        self._servicer = servicer
        self.tls = tls
        self._stopped: asyncio.Task[None] | None = None

    @property
    def health(self) -> health_aio.HealthServicer:
        return self._health.servicer

    @property
    def serving(self) -> bool:
        return self._health.serving

    async def set_ready(self, ready: bool = True) -> None:
        """Report SERVING (when not draining) or NOT_SERVING on the health service."""
        self._health.ready = ready
        await self._health.update()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Health NOT_SERVING, end following streams, then stop with ``grace`` seconds
        for calls in progress. Idempotent; concurrent calls wait for the same stop."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopped)

    async def _stop(self, grace: float | None) -> None:
        self._health.stopping = True
        await self._health.servicer.enter_graceful_shutdown()
        self._servicer.shutdown()
        await self._server.stop(grace)
        log.info("control.stopped", address=self.address, port=self.port)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcServerHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_grpc_server(
    target: ControlTarget,
    *,
    address: str = "127.0.0.1:50051",
    admin_token: str | None = None,
    read_token: str | None = None,
    allow_insecure_remote: bool = False,
    tls: TlsFiles | None = None,
    ready: bool = True,
    registry: CollectorRegistry | None = None,
    stream_buffer: int = DEFAULT_STREAM_BUFFER,
    replay_capacity: int = 1024,
) -> GrpcServerHandle:
    """Bind and start the control plane for ``target``; return its handle.

    ``address`` is ``host:port`` (port 0 = any free port; see ``handle.port``).
    A non-loopback address needs authentication (a token, or a TLS client
    CA) and TLS, unless ``allow_insecure_remote`` — otherwise
    :class:`GrpcConfigError`. Tokens: with only the admin token configured,
    every call needs it; with only the read token, reads need it and mutating
    calls are refused (a read-only control plane); with neither, nothing is
    checked (loopback only).
    ``ready=False`` starts with health NOT_SERVING until ``handle.set_ready()``.
    Raises :class:`GrpcConfigError` for a bad address, unreadable TLS files or
    a port that cannot be bound.
    """
    host, _ = split_address(address)
    auth = TokenAuth(admin_token, read_token)
    if not host_is_loopback(host) and not allow_insecure_remote:
        mtls = tls is not None and tls.client_ca_file is not None
        if not auth.enabled and not mtls:
            raise GrpcConfigError(
                f"refusing to serve the control API on {address} without authentication: "
                "set grpc.adminToken (and grpc.readToken) or a TLS client CA, bind to a "
                "loopback address such as 127.0.0.1, or set grpc.allowInsecureRemote: true"
            )
        if tls is None:
            raise GrpcConfigError(
                f"refusing to serve the control API on {address} without TLS (tokens would "
                "travel in clear text): set grpc.tls.certFile/keyFile, bind to a loopback "
                "address, or set grpc.allowInsecureRemote: true"
            )
    try:
        credentials = tls.credentials() if tls is not None else None
    except OSError as exc:
        raise GrpcConfigError(f"cannot read TLS files: {exc}") from exc
    if stream_buffer <= 0:
        raise GrpcConfigError("stream_buffer must be positive")

    metrics = control_metrics(registry)
    health = HealthState(health_aio.HealthServicer(), names=("", SERVICE_NAME))
    servicer = PoolControlServicer(
        target,
        health=health,
        metrics=metrics,
        replay_capacity=replay_capacity,
        stream_buffer=stream_buffer,
    )
    interceptor = ControlInterceptor(
        auth, metrics, service=SERVICE_NAME, mutating=MUTATING_METHODS, skip={HEALTH_SERVICE_NAME}
    )
    server = grpc.aio.server(
        interceptors=[interceptor],
        # Fail loudly on a port already in use instead of sharing it.
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_PoolControlServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcConfigError(f"cannot bind the control API to {address}: {exc}") from exc
    if port == 0:
        raise GrpcConfigError(f"cannot bind the control API to {address}")
    await server.start()
    handle = GrpcServerHandle(
        server,
        address=address,
        port=port,
        health=health,
        servicer=servicer,
        tls=credentials is not None,
    )
    await handle.set_ready(ready)
    log.info(
        "control.started",
        address=address,
        port=port,
        tls=credentials is not None,
        mtls=bool(tls and tls.client_ca_file),
        auth=auth.enabled,
    )
    return handle
