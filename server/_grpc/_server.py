"""Start the control plane: :func:`start_grpc_server` binds it and returns a
:class:`GrpcServerHandle`; :class:`TlsFiles` and :class:`GrpcConfigError` are its options
and its refusal."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from server._config import host_is_loopback
from server._control import ControlTarget
from server._control_metrics import ControlMetrics, control_metrics
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
from server._loops import IoLoop, run_on

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
    """A running control-plane server. ``stop()`` is idempotent; ``async with`` stops it.

    The server runs on its own event loop (:attr:`loop`, in a thread, see
    :func:`start_grpc_server`); the handle's methods may be awaited from any
    loop and hop to it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        address: str,
        port: int,
        health: HealthState,
        servicer: PoolControlServicer,
        tls: bool,
        io: IoLoop | None = None,
    ) -> None:
        self._server = server
        self.address = address
        self.port = port
        self._health = health
        self._servicer = servicer
        self.tls = tls
        self._io = io
        self.loop = (io.loop if io is not None else None) or asyncio.get_running_loop()
        self._stopped: asyncio.Future[None] | None = None

    @property
    def health(self) -> health_aio.HealthServicer:
        """The health servicer (an object of :attr:`loop`: set statuses with
        :meth:`set_health`)."""
        return self._health.servicer

    @property
    def serving(self) -> bool:
        return self._health.serving

    async def set_ready(self, ready: bool = True) -> None:
        """Report SERVING (when not draining) or NOT_SERVING on the health service."""

        async def update() -> None:
            self._health.ready = ready
            await self._health.update()

        await run_on(self.loop, update())

    async def set_health(
        self, name: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        """Set the health status of ``name`` (a service name of the health service)."""
        await run_on(self.loop, self._health.servicer.set(name, status))

    async def stop(self, grace: float | None = 5.0) -> None:
        """Health NOT_SERVING, end following streams, then stop with ``grace`` seconds
        for calls in progress, and end the server's loop. Idempotent; concurrent
        calls wait for the same stop."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopped)

    async def _stop(self, grace: float | None) -> None:
        await run_on(self.loop, self._stop_server(grace))
        if self._io is not None:
            await self._io.stop()
        log.info("control.stopped", address=self.address, port=self.port)

    async def _stop_server(self, grace: float | None) -> None:
        self._health.stopping = True
        await self._health.servicer.enter_graceful_shutdown()
        self._servicer.shutdown()
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await run_on(self.loop, self._server.wait_for_termination())

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
    own_loop: bool = True,
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

    The server runs on an event loop of its own, in a thread (``own_loop``;
    ``False``: on the caller's loop), so that the control plane answers while
    the caller's loop (the service's, which runs ``target``) is busy. RPCs that
    touch ``target`` run their body on the caller's loop (see
    :class:`~server._grpc._servicer.PoolControlServicer`).
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
    service_loop = asyncio.get_running_loop()
    build = functools.partial(
        _start,
        target,
        address=address,
        auth=auth,
        credentials=credentials,
        metrics=metrics,
        service_loop=service_loop,
        stream_buffer=stream_buffer,
        replay_capacity=replay_capacity,
    )
    io: IoLoop | None = None
    if own_loop:
        io = IoLoop("grpc-control", what="the control plane")
        io.start()
        try:
            handle = await io.call(build(io))
        except BaseException:
            await io.stop()
            raise
    else:
        handle = await build(None)
    await handle.set_ready(ready)
    log.info(
        "control.started",
        address=address,
        port=handle.port,
        tls=credentials is not None,
        mtls=bool(tls and tls.client_ca_file),
        auth=auth.enabled,
    )
    return handle


async def _start(
    target: ControlTarget,
    io: IoLoop | None,
    *,
    address: str,
    auth: TokenAuth,
    credentials: grpc.ServerCredentials | None,
    metrics: ControlMetrics,
    service_loop: asyncio.AbstractEventLoop,
    stream_buffer: int,
    replay_capacity: int,
) -> GrpcServerHandle:
    """Build, bind and start the server on the running loop (the server's)."""
    health = HealthState(health_aio.HealthServicer(), names=("", SERVICE_NAME))
    servicer = PoolControlServicer(
        target,
        health=health,
        metrics=metrics,
        replay_capacity=replay_capacity,
        stream_buffer=stream_buffer,
        service_loop=service_loop,
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
    return GrpcServerHandle(
        server,
        address=address,
        port=port,
        health=health,
        servicer=servicer,
        tls=credentials is not None,
        io=io,
    )
