"""The gRPC control plane: ``actorpool.control.v1.PoolControl`` over a :class:`ControlTarget`.

Layers, outside in:

1. :class:`_ControlInterceptor` (one per server) — for every call: binds the
   request context into ``structlog.contextvars``, checks the bearer token,
   maps any exception to a status code (:func:`status_for`, the one place
   where that happens), counts the call by method and code, times it, and
   writes an audit record for every mutating call.
2. :class:`PoolControlServicer` — validates arguments (raising
   :class:`InvalidArgumentError`), answers repeated ``request_id`` s from a
   bounded memory, serialises mode/rollout changes, converts to and from the
   protobuf messages, and calls the :class:`ControlTarget`.
3. ``grpc.health.v1.Health`` (NOT_SERVING until ready, while a drain runs, and
   from the start of shutdown) and server reflection.

:func:`start_grpc_server` binds and starts it all and returns a
:class:`GrpcServerHandle`.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import grpc
import structlog
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from pool import DeadLetter, DrainTimeoutError, PoolClosedError, PoolMode
from server._config import host_is_loopback
from server._control import (
    ControlError,
    ControlTarget,
    DeadLetterFilter,
    DrainIncompleteError,
    DrainProgress,
    DrainResult,
    NotReadyError,
    Partition,
    PreconditionError,
    ServiceStatus,
    SwitchOutcome,
    UnknownPartitionError,
)
from server._control_metrics import ControlMetrics, control_metrics
from server._errors import ServiceError

log = structlog.get_logger("server.grpc")
audit_log = structlog.get_logger("server.audit")

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["PoolControl"].full_name
HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

#: Calls that change state: admin token required, audited, idempotent by request_id.
MUTATING_METHODS: Final = frozenset(
    {"SetPoolMode", "SetRollout", "Drain", "Pause", "Resume", "RedriveDeadLetters"}
)

DEFAULT_SWITCH_WAIT: Final = 5.0
MAX_DRAIN_TIMEOUT: Final = 3600.0
DEFAULT_TOP: Final = 10
MAX_TOP: Final = 1000
DEFAULT_STREAM_BUFFER: Final = 1000
MAX_STREAM_BUFFER: Final = 100_000
MAX_AGGREGATE_ID: Final = 256

_MODE_TO_PB: Final = {PoolMode.KEYED: pb.POOL_MODE_KEYED, PoolMode.ACTOR: pb.POOL_MODE_ACTOR}
_MODE_FROM_PB: Final = {v: k for k, v in _MODE_TO_PB.items()}

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
if TYPE_CHECKING:
    _InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    _InterceptorBase = grpc.aio.ServerInterceptor
_M = TypeVar("_M", bound=ProtoMessage)


# ------------------------------------------------------------------ errors


class GrpcConfigError(ServiceError, ValueError):
    """The control plane refuses to start with this configuration."""


class RpcStatusError(ServiceError):
    """Raised inside the control plane to answer with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class InvalidArgumentError(RpcStatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class UnauthenticatedError(RpcStatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RpcStatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception: the one mapping of the control plane."""
    match exc:
        case RpcStatusError():
            return exc.code, exc.details
        case DrainIncompleteError() | DrainTimeoutError():
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        case UnknownPartitionError():
            return grpc.StatusCode.NOT_FOUND, str(exc)
        case NotReadyError() | PoolClosedError():
            return grpc.StatusCode.UNAVAILABLE, str(exc) or "service not ready"
        case PreconditionError() | ControlError():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case ValueError():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case TimeoutError():
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
        case _:
            return (
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}); see server log",
            )


# ------------------------------------------------------------------ options


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
    """``"host:port"`` / ``"[::1]:port"`` → ``(host, port)``; ``ValueError`` if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise GrpcConfigError(f"gRPC address must be host:port, got {address!r}")
    port = int(port_text)
    if port > 65535:
        raise GrpcConfigError(f"gRPC port out of range in {address!r}")
    return host.removeprefix("[").removesuffix("]"), port


# -------------------------------------------------------------------- auth


class _Auth:
    """Bearer tokens: the admin token may call anything, the read token only reads."""

    def __init__(self, admin_token: str | None, read_token: str | None) -> None:
        self._admin = admin_token.encode() if admin_token else None
        self._read = read_token.encode() if read_token else None

    @property
    def enabled(self) -> bool:
        return self._admin is not None or self._read is not None

    def role(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """``"admin"``, ``"read"`` or ``"anonymous"`` (no token configured)."""
        if not self.enabled:
            return "anonymous"
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise UnauthenticatedError(
                "missing credentials: send metadata 'authorization: Bearer <token>'"
            )
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError(
                "malformed authorization metadata: expected 'Bearer <token>'"
            )
        given = token.strip().encode()
        if self._admin is not None and hmac.compare_digest(given, self._admin):
            return "admin"
        if self._read is not None and hmac.compare_digest(given, self._read):
            return "read"
        raise UnauthenticatedError("invalid token")

    @staticmethod
    def authorize(role: str, method: str, mutating: bool) -> None:
        if mutating and role == "read":
            raise PermissionDeniedError(
                f"{method} changes the service: it needs the admin token, not the read token"
            )


# ------------------------------------------------------------- interceptor


@dataclass(slots=True)
class _Call:
    method: str
    mutating: bool
    audited: bool
    metadata: Sequence[tuple[str, str | bytes]] | None
    started: float
    role: str = "unauthenticated"
    request_id: str = ""


class _ControlInterceptor(_InterceptorBase):
    """Auth, request context, status mapping, metrics and audit for every call."""

    def __init__(self, auth: _Auth, metrics: ControlMetrics) -> None:
        self._auth = auth
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        service, _, method = full.lstrip("/").rpartition("/")
        if handler is None or service == HEALTH_SERVICE_NAME:
            return handler  # probes need no token
        ours = service == SERVICE_NAME
        mutating = ours and method in MUTATING_METHODS
        metadata = handler_call_details.invocation_metadata

        def new_call() -> _Call:
            return _Call(
                method=method if ours else full,
                mutating=mutating,
                audited=mutating,
                metadata=metadata,
                started=time.monotonic(),
            )

        return _wrap_handler(handler, new_call, self)

    # The four shapes of behaviour share these three steps.
    def begin(
        self, call: _Call, request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        call.request_id = str(getattr(request, "request_id", "") or "")
        token = structlog.contextvars.bind_contextvars(
            rpc_method=call.method, request_id=call.request_id or None, peer=context.peer()
        )
        call.role = self._auth.role(call.metadata)
        structlog.contextvars.bind_contextvars(caller=call.role)
        self._auth.authorize(call.role, call.method, call.mutating)
        return token

    async def fail(
        self, call: _Call, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Record a failed call and answer with its status (raises)."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.finish(call, grpc.StatusCode.CANCELLED, "cancelled by the client", context)
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code() or grpc.StatusCode.UNKNOWN
            self.finish(call, code, str(context.details() or ""), context)
            raise exc
        code, details = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("control.call_failed", error=repr(exc), exc_info=exc)
        self.finish(call, code, details, context)
        await context.abort(code, details)

    def finish(
        self,
        call: _Call,
        code: grpc.StatusCode,
        details: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        took = time.monotonic() - call.started
        name = code.name
        self._metrics.calls.labels(call.method, name).inc()
        self._metrics.duration.labels(call.method).observe(took)
        if call.audited:
            audit_log.info(
                "control.audit",
                method=call.method,
                request_id=call.request_id,
                caller=call.role,
                peer=context.peer(),
                identity=_peer_identity(context),
                outcome=name,
                detail=details or None,
                took_ms=round(took * 1000, 3),
            )
        elif code is not grpc.StatusCode.OK:
            log.info("control.call_refused", method=call.method, code=name, detail=details)
        structlog.contextvars.unbind_contextvars("rpc_method", "request_id", "peer", "caller")


def _peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The client certificate's common name under mutual TLS."""
    try:
        names = context.auth_context().get("x509_common_name")
    except Exception:  # noqa: BLE001 - purely informational
        return None
    if not names:
        return None
    return ",".join(n.decode("utf-8", "replace") for n in names)


def _wrap_handler(
    handler: _Handler,
    new_call: Callable[[], _Call],
    ic: _ControlInterceptor,
) -> grpc.RpcMethodHandler[Any, Any]:
    ser = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            call = new_call()
            try:
                ic.begin(call, request, context)
                response = await inner_uu(request, context)
            except BaseException as exc:
                await ic.fail(call, exc, context)
                raise
            ic.finish(call, grpc.StatusCode.OK, "", context)
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary, **ser)
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            call = new_call()
            try:
                ic.begin(call, request, context)
                async for item in inner_us(request, context):
                    yield item
            except BaseException as exc:
                await ic.fail(call, exc, context)
                raise
            ic.finish(call, grpc.StatusCode.OK, "", context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **ser)
    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            call = new_call()
            try:
                ic.begin(call, None, context)
                response = await inner_su(requests, context)
            except BaseException as exc:
                await ic.fail(call, exc, context)
                raise
            ic.finish(call, grpc.StatusCode.OK, "", context)
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary, **ser)
    inner_ss: Any = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        call = new_call()
        try:
            ic.begin(call, None, context)
            async for item in inner_ss(requests, context):
                yield item
        except BaseException as exc:
            await ic.fail(call, exc, context)
            raise
        ic.finish(call, grpc.StatusCode.OK, "", context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **ser)


# ------------------------------------------------------------- idempotency


class _Replay:
    """Recent answers by ``(method, request_id)``: a repeat gets the first answer.

    Bounded: the oldest ``capacity`` answers are kept. Only successful answers
    are remembered, so a retry after a failure (UNAVAILABLE, a timed-out drain)
    runs again. A repeat that arrives while the first is still running waits
    for it and gets its outcome.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._done: collections.OrderedDict[tuple[str, str], ProtoMessage] = (
            collections.OrderedDict()
        )
        self._running: dict[tuple[str, str], asyncio.Future[ProtoMessage]] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def run(self, method: str, request_id: str, call: Callable[[], Awaitable[_M]]) -> _M:
        """The answer of ``call()``; a repeat gets a copy of the first answer
        with ``replayed`` set."""
        if not request_id:
            return await call()
        key = (method, request_id)
        seen = self.lookup(key)
        if seen is not None:
            return _replayed(seen)  # type: ignore[return-value]
        running = self._running.get(key)
        if running is not None:
            return _replayed(await asyncio.shield(running))  # type: ignore[return-value]
        future: asyncio.Future[ProtoMessage] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._running[key] = future
        try:
            answer = await call()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
            raise
        finally:
            del self._running[key]
        future.set_result(answer)
        self.remember(key, answer)
        return answer

    def lookup(self, key: tuple[str, str]) -> ProtoMessage | None:
        answer = self._done.get(key)
        if answer is not None:
            self._done.move_to_end(key)
        return answer

    def remember(self, key: tuple[str, str], answer: ProtoMessage) -> None:
        self._done[key] = answer
        self._done.move_to_end(key)
        while len(self._done) > self._capacity:
            self._done.popitem(last=False)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _replayed(message: _M) -> _M:
    copy = type(message)()
    copy.CopyFrom(message)
    copy.replayed = True  # type: ignore[attr-defined]
    return copy


# ------------------------------------------------------------------ health


class _Health:
    """SERVING only when ready, not draining, not stopping."""

    def __init__(self, servicer: health_aio.HealthServicer) -> None:
        self.servicer = servicer
        self.ready = False
        self.draining = 0
        self.stopping = False

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining and not self.stopping

    async def update(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


# ---------------------------------------------------------------- servicer


class PoolControlServicer(pb_grpc.PoolControlServicer):
    """``PoolControl`` over a :class:`ControlTarget`. Raises, never aborts:
    the interceptor turns exceptions into status codes."""

    def __init__(
        self,
        target: ControlTarget,
        *,
        health: _Health,
        metrics: ControlMetrics,
        replay_capacity: int = 1024,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
    ) -> None:
        self._target = target
        self._health = health
        self._metrics = metrics
        self._replay = _Replay(replay_capacity)
        self._switch_lock = asyncio.Lock()
        self._stream_buffer = stream_buffer
        self._closing = asyncio.Event()
        self._drains: dict[tuple[str, str], asyncio.Future[pb.DrainResult]] = {}

    def shutdown(self) -> None:
        """End following streams (dead letters) so the server can stop promptly."""
        self._closing.set()

    # ---------------------------------------------------------- reads
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        return status_to_pb(self._target.status())

    async def GetInboxDepth(
        self, request: pb.GetInboxDepthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInboxDepthResponse:
        if not 0 <= request.top <= MAX_TOP:
            raise InvalidArgumentError(f"top must be within 0..{MAX_TOP}, got {request.top}")
        top = request.top or DEFAULT_TOP
        switch = self._target.switch
        active = _active_modes(switch.mode, switch.rollout_percent)
        if request.pool != pb.POOL_MODE_UNSPECIFIED:
            modes = [_mode_from_pb(request.pool, "pool")]
        else:
            modes = [
                m for m in (PoolMode.KEYED, PoolMode.ACTOR)
                if m in active or switch.pools[m].in_flight > 0
            ]  # fmt: skip
        response = pb.GetInboxDepthResponse()
        for mode in modes:
            pool = switch.pools[mode]
            depths = pool.depths()
            capacity = pool.capacity
            entry = response.pools.add(
                mode=_MODE_TO_PB[mode],
                active=mode in active,
                total=sum(depths),
                size=pool.size,
                capacity=capacity,
            )
            if not request.omit_executors:
                entry.executors.extend(
                    _executor_depth(i, d, capacity) for i, d in enumerate(depths)
                )
            deepest = heapq.nsmallest(top, range(len(depths)), key=lambda i: (-depths[i], i))
            entry.top.extend(_executor_depth(i, depths[i], capacity) for i in deepest)
            response.total += entry.total
        if request.aggregate_id:
            aggregate = request.aggregate_id
            if len(aggregate) > MAX_AGGREGATE_ID:
                raise InvalidArgumentError(
                    f"aggregate_id longer than {MAX_AGGREGATE_ID} characters"
                )
            mode, index = switch.where(aggregate)
            pool = switch.pools[mode]
            response.aggregate.CopyFrom(
                pb.AggregateDepth(
                    aggregate_id=aggregate,
                    mode=_MODE_TO_PB[mode],
                    executor=index,
                    depth=pool.depth(index),
                    capacity=pool.capacity,
                )
            )
        return response

    # ------------------------------------------------------ mode switch
    async def SetPoolMode(
        self, request: pb.SetPoolModeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetPoolModeResponse:
        mode = _mode_from_pb(request.mode, "mode")
        wait = _wait_timeout(request)

        async def change() -> pb.SetPoolModeResponse:
            async with self._switch_lock:
                outcome = await self._target.switch.set_mode(mode, wait_timeout=wait)
            return pb.SetPoolModeResponse(result=switch_result_to_pb(outcome))

        return await self._replay.run("SetPoolMode", request.request_id, change)

    async def SetRollout(
        self, request: pb.SetRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetRolloutResponse:
        percent = request.percent
        if not math.isfinite(percent) or not 0.0 <= percent <= 100.0:
            raise InvalidArgumentError(f"rollout percent must be within 0..100, got {percent!r}")
        wait = _wait_timeout(request)

        async def change() -> pb.SetRolloutResponse:
            async with self._switch_lock:
                outcome = await self._target.switch.set_rollout(percent, wait_timeout=wait)
            return pb.SetRolloutResponse(result=switch_result_to_pb(outcome))

        return await self._replay.run("SetRollout", request.request_id, change)

    # ---------------------------------------------------- pause/resume
    async def Pause(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PauseResponse:
        partitions = _partitions_from_pb(request.partitions)

        async def pause() -> pb.PauseResponse:
            paused = await self._target.pause(partitions)
            return pb.PauseResponse(partitions=_partitions_to_pb(paused))

        return await self._replay.run("Pause", request.request_id, pause)

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResumeResponse:
        partitions = _partitions_from_pb(request.partitions)

        async def resume() -> pb.ResumeResponse:
            resumed = await self._target.resume(partitions)
            return pb.ResumeResponse(partitions=_partitions_to_pb(resumed))

        return await self._replay.run("Resume", request.request_id, resume)

    # ----------------------------------------------------------- drain
    async def Drain(
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.DrainResponse]:
        if not request.HasField("timeout"):
            raise InvalidArgumentError("timeout is required")
        timeout = request.timeout.ToNanoseconds() / 1e9
        if not 0 < timeout <= MAX_DRAIN_TIMEOUT:
            raise InvalidArgumentError(
                f"timeout must be within (0, {MAX_DRAIN_TIMEOUT:g}] seconds, got {timeout:g}"
            )
        partitions = _partitions_from_pb(request.partitions)
        key = ("Drain", request.request_id)
        outcome: asyncio.Future[pb.DrainResult] | None = None
        if request.request_id:
            seen = self._replay.lookup(key)
            if seen is None and key in self._drains:
                # The same drain is running (a client retry): wait for its answer.
                seen = await asyncio.shield(self._drains[key])
            if seen is not None:
                yield pb.DrainResponse(result=_replayed(seen))  # type: ignore[arg-type]
                return
            outcome = self._drains[key] = asyncio.get_running_loop().create_future()
            outcome.add_done_callback(_retrieve)

        latest: collections.deque[DrainProgress] = collections.deque(maxlen=1)
        wake = asyncio.Event()

        def on_progress(progress: DrainProgress) -> None:
            latest.append(progress)
            wake.set()

        self._health.draining += 1
        await self._health.update()
        drain = asyncio.create_task(
            self._target.drain(
                timeout=timeout,
                partitions=partitions,
                resume_after=request.resume_after,
                progress=on_progress,
            ),
            name="control-drain",
        )
        try:
            while not drain.done():
                woken = asyncio.create_task(wake.wait(), name="control-drain-progress")
                try:
                    await asyncio.wait({drain, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                wake.clear()
                if latest and not drain.done():
                    yield pb.DrainResponse(progress=drain_progress_to_pb(latest.pop()))
            try:
                result = drain.result()
            except DrainIncompleteError as exc:
                yield pb.DrainResponse(result=drain_result_to_pb(exc.result, complete=False))
                context.set_trailing_metadata((("drain-remaining", str(exc.result.remaining)),))
                raise
            answer = drain_result_to_pb(result, complete=True)
            if outcome is not None:
                self._replay.remember(key, answer)
                outcome.set_result(answer)
            yield pb.DrainResponse(result=answer)
        except BaseException as exc:
            if outcome is not None and not outcome.done():
                if isinstance(exc, Exception):
                    outcome.set_exception(exc)
                else:
                    outcome.cancel()
            raise
        finally:
            if outcome is not None:
                if not outcome.done():
                    outcome.cancel()
                self._drains.pop(key, None)
            if not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            self._health.draining -= 1
            await self._health.update()

    # ---------------------------------------------------- dead letters
    async def StreamDeadLetters(
        self, request: pb.StreamDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamDeadLettersResponse]:
        if request.backlog_limit < 0:
            raise InvalidArgumentError("backlog_limit must be >= 0")
        if request.buffer_size < 0:
            raise InvalidArgumentError("buffer_size must be >= 0")
        size = min(request.buffer_size or self._stream_buffer, MAX_STREAM_BUFFER)
        dl_filter = filter_from_pb(request.filter)
        buffer: collections.deque[DeadLetter] = collections.deque()
        skipped = 0
        wake = asyncio.Event()
        stream_skipped = self._metrics.stream_skipped

        def on_dead_letter(dead: DeadLetter) -> None:
            # Runs inside the sink on the event loop: O(1), never blocks, never raises.
            nonlocal skipped
            if not dl_filter.matches(dead):
                return
            if len(buffer) >= size:
                buffer.popleft()
                skipped += 1
                stream_skipped.inc()
            buffer.append(dead)
            wake.set()

        # Subscribe before reading the backlog, so nothing recorded in between is lost.
        unsubscribe = (
            self._target.subscribe_dead_letters(on_dead_letter) if request.follow else None
        )
        try:
            backlog = self._target.select_dead_letters(dl_filter, request.backlog_limit or None)
            sent_ids = {d.id for d in backlog if d.id}
            for dead in backlog:
                yield pb.StreamDeadLettersResponse(dead_letter=dead_letter_to_pb(dead))
            yield pb.StreamDeadLettersResponse(backlog_end=pb.BacklogEnd(count=len(backlog)))
            if unsubscribe is None:
                return
            reported = total = 0
            while not self._closing.is_set():
                if skipped > reported:
                    total, count = skipped, skipped - reported
                    reported = skipped
                    yield pb.StreamDeadLettersResponse(skipped=pb.Skipped(count=count, total=total))
                    continue
                if buffer:
                    dead = buffer.popleft()
                    if dead.id and dead.id in sent_ids:
                        sent_ids.discard(dead.id)  # recorded between subscribe and backlog
                        continue
                    yield pb.StreamDeadLettersResponse(dead_letter=dead_letter_to_pb(dead))
                    continue
                wake.clear()
                closing = asyncio.create_task(self._closing.wait(), name="control-dl-closing")
                woken = asyncio.create_task(wake.wait(), name="control-dl-wake")
                try:
                    await asyncio.wait({closing, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                    woken.cancel()
        finally:
            if unsubscribe is not None:
                unsubscribe()

    async def RedriveDeadLetters(
        self, request: pb.RedriveDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RedriveDeadLettersResponse:
        ids = tuple(request.ids)
        has_filter = request.HasField("filter") and request.filter != pb.DeadLetterFilter()
        if ids and has_filter:
            raise InvalidArgumentError("give ids or a filter, not both")
        if not ids and not has_filter and not request.all:
            raise InvalidArgumentError(
                "nothing selected: give ids, a filter, or all=true to redrive every dead letter"
            )
        if any(not i for i in ids):
            raise InvalidArgumentError("ids must not be empty strings")
        dl_filter = None if ids else filter_from_pb(request.filter)

        async def redrive() -> pb.RedriveDeadLettersResponse:
            result = await self._target.redrive(ids=ids, filter=dl_filter)
            return pb.RedriveDeadLettersResponse(
                matched=result.matched,
                republished=result.republished,
                failed=result.failed,
                errors=dict(result.errors),
            )

        return await self._replay.run("RedriveDeadLetters", request.request_id, redrive)


# ------------------------------------------------------------- conversions


def _mode_from_pb(value: int, field: str) -> PoolMode:
    mode: PoolMode | None = _MODE_FROM_PB.get(value)  # type: ignore[call-overload]
    if mode is None:
        name = "POOL_MODE_UNSPECIFIED" if value == pb.POOL_MODE_UNSPECIFIED else str(value)
        raise InvalidArgumentError(
            f"{field} must be POOL_MODE_KEYED or POOL_MODE_ACTOR, got {name}"
        )
    return mode


def mode_to_pb(mode: PoolMode) -> pb.PoolMode.ValueType:
    return _MODE_TO_PB[PoolMode(mode)]


def _active_modes(mode: PoolMode, rollout: float) -> set[PoolMode]:
    if mode is PoolMode.KEYED or rollout <= 0:
        return {PoolMode.KEYED}
    if rollout >= 100:
        return {PoolMode.ACTOR}
    return {PoolMode.KEYED, PoolMode.ACTOR}


def _wait_timeout(request: pb.SetPoolModeRequest | pb.SetRolloutRequest) -> float:
    if not request.HasField("wait_timeout"):
        return DEFAULT_SWITCH_WAIT
    wait = request.wait_timeout.ToNanoseconds() / 1e9
    if not 0 <= wait <= MAX_DRAIN_TIMEOUT:
        raise InvalidArgumentError(f"wait_timeout must be within 0..{MAX_DRAIN_TIMEOUT:g} s")
    return wait


def _executor_depth(index: int, depth: int, capacity: int) -> pb.ExecutorDepth:
    return pb.ExecutorDepth(
        index=index,
        depth=depth,
        capacity=capacity,
        utilization=depth / capacity if capacity else 0.0,
    )


def _partitions_from_pb(items: Sequence[pb.TopicPartition]) -> list[Partition] | None:
    if not items:
        return None
    out: list[Partition] = []
    for item in items:
        if not item.topic:
            raise InvalidArgumentError("partition without a topic")
        if item.partition < 0:
            raise InvalidArgumentError(f"negative partition {item.partition} of {item.topic}")
        out.append((item.topic, item.partition))
    return out


def _partitions_to_pb(items: Sequence[Partition]) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in items]


def timestamp(epoch_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(epoch_seconds * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def switch_result_to_pb(result: SwitchOutcome) -> pb.SwitchResult:
    return pb.SwitchResult(
        previous_mode=mode_to_pb(result.previous_mode),
        mode=mode_to_pb(result.mode),
        previous_rollout_percent=result.previous_rollout,
        rollout_percent=result.rollout,
        generation=result.generation,
        took=duration(result.took_s),
        waited_aggregates=result.waited_aggregates,
        pending_aggregates=result.pending_aggregates,
    )


def status_to_pb(status: ServiceStatus) -> pb.GetStatusResponse:
    response = pb.GetStatusResponse(
        mode=mode_to_pb(status.mode),
        rollout_percent=status.rollout_percent,
        generation=status.generation,
        since=timestamp(status.since),
        in_flight=status.in_flight,
        restarts=status.restarts,
        dead_letters=status.dead_letters,
        uptime=duration(status.uptime_s),
        version=status.version,
        ready=status.ready,
        draining=status.draining,
        group_id=status.group_id,
        instance=status.instance,
    )
    for p in status.partitions:
        entry = response.partitions.add(
            topic=p.topic,
            partition=p.partition,
            paused=p.paused,
            paused_reasons=list(p.paused_reasons),
            in_flight=p.in_flight,
        )
        for name in ("committed", "position", "high_watermark", "lag"):
            value = getattr(p, name)
            if value is not None:
                setattr(entry, name, value)
    for pool in status.pools:
        response.pools.add(
            mode=mode_to_pb(pool.mode),
            size=pool.size,
            capacity=pool.capacity,
            in_flight=pool.in_flight,
            restarts=pool.restarts,
        )
    return response


def drain_progress_to_pb(progress: DrainProgress) -> pb.DrainProgress:
    return pb.DrainProgress(
        finished=progress.finished,
        remaining=progress.remaining,
        elapsed=duration(progress.elapsed_s),
    )


def drain_result_to_pb(result: DrainResult, *, complete: bool) -> pb.DrainResult:
    return pb.DrainResult(
        complete=complete,
        finished=result.finished,
        remaining=result.remaining,
        took=duration(result.took_s),
        committed=[
            pb.CommittedOffset(topic=c.topic, partition=c.partition, offset=c.offset)
            for c in result.committed
        ],
        partitions=_partitions_to_pb(result.partitions),
        resumed=result.resumed,
    )


def filter_from_pb(f: pb.DeadLetterFilter) -> DeadLetterFilter:
    return DeadLetterFilter(
        topic=f.topic,
        aggregate_id=f.aggregate_id,
        error_type=f.error_type,
        reason=f.reason,
        since=f.since.ToNanoseconds() / 1e9 if f.HasField("since") else 0.0,
    )


def dead_letter_to_pb(dead: DeadLetter) -> pb.DeadLetter:
    msg = dead.message
    out = pb.DeadLetter(
        id=dead.id,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        value=msg.value,
        headers=[pb.Header(key=k, value=v) for k, v in msg.headers],
        aggregate_id=msg.aggregate_id,
        timestamp_ms=msg.timestamp_ms,
        reason=str(dead.reason),
        error_type=dead.error_type,
        error_message=dead.error_message,
        traceback=dead.traceback,
        attempts=dead.attempts,
        mode=dead.mode,
        executor=dead.executor,
        time=timestamp(dead.time),
    )
    if msg.key is not None:
        out.key = msg.key
    return out


# ------------------------------------------------------------------ server


class GrpcServerHandle:
    """A running control-plane server. ``stop()`` is idempotent; ``async with`` stops it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        address: str,
        port: int,
        health: _Health,
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
    auth = _Auth(admin_token, read_token)
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
    health = _Health(health_aio.HealthServicer())
    servicer = PoolControlServicer(
        target,
        health=health,
        metrics=metrics,
        replay_capacity=replay_capacity,
        stream_buffer=stream_buffer,
    )
    server = grpc.aio.server(
        interceptors=[_ControlInterceptor(auth, metrics)],
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
