"""Python clients of the control API: async and blocking.

:class:`AsyncPoolControlClient` and :class:`PoolControlClient` take the same
options, return the protobuf response messages of
``actorpool.control.v1`` (typed by the committed ``.pyi`` stubs), and raise
:class:`ControlClientError` subclasses instead of ``grpc.RpcError``.

Retries: reads, and mutating calls — which always carry a request ID (one is
generated when none is given, and reused on every retry, so the server applies
the call once) — are retried on ``UNAVAILABLE`` (and server-sent ``CANCELLED``,
which a call racing a server stop can get) with exponential backoff.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from actorpool.control.v1.control_pb2_grpc import PoolControlAsyncStub

DEFAULT_TARGET: Final = "127.0.0.1:50051"
SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["PoolControl"].full_name
#: Extra time the client waits beyond a drain's own timeout for the final answer.
DRAIN_GRACE: Final = 10.0

Partition = tuple[str, int]
_Request = TypeVar("_Request", bound=ProtoMessage)
_Response = TypeVar("_Response", bound=ProtoMessage)

# ------------------------------------------------------------------ errors


class ControlClientError(Exception):
    """Root of the client's errors; ``code`` is the gRPC status."""

    code: grpc.StatusCode

    def __init__(self, code: grpc.StatusCode, details: str, target: str = "") -> None:
        super().__init__(f"{code.name}: {details}" + (f" ({target})" if target else ""))
        self.code = code
        self.details = details
        self.target = target


class UnavailableError(ControlClientError):
    """The server could not be reached (or is shutting down)."""


class AuthError(ControlClientError):
    """``UNAUTHENTICATED`` (missing or wrong token) or ``PERMISSION_DENIED`` (read token)."""


class InvalidArgumentError(ControlClientError):
    """The server rejected an argument."""


class NotFoundError(ControlClientError):
    """A listed partition (or similar) does not exist on that replica."""


class PreconditionError(ControlClientError):
    """``FAILED_PRECONDITION`` — valid call, wrong state (e.g. a drain already running)."""


class ConflictError(ControlClientError):
    """``ABORTED``: a concurrent fleet write took the expected generation first."""


class DeadlineError(ControlClientError):
    """``DEADLINE_EXCEEDED``: the call (or a drain) ran out of time.

    For a drain, ``partial`` is the server's :class:`pb.DrainResult` with what
    was finished and what remained (``None`` if the client's own deadline hit first).
    """

    partial: pb.DrainResult | None = None


_BY_CODE: Final[dict[grpc.StatusCode, type[ControlClientError]]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError,
    grpc.StatusCode.ABORTED: ConflictError,
}


def _error(exc: grpc.RpcError, target: str) -> ControlClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code.name)
    return _BY_CODE.get(code, ControlClientError)(code, details, target)


# ----------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS for the client. ``ca_file`` (PEM) to trust, else the system roots;
    ``cert_file``/``key_file`` for mutual TLS; ``server_name`` overrides the
    name checked against the server certificate."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


#: Codes a call is retried on (reads, and mutations carrying a request ID, so a
#: retry is applied once). CANCELLED comes from the server only when a call
#: arrives while it stops (grpc-core cancels calls not yet handed to a handler,
#: grpc/grpc#41785); a caller's own cancellation raises
#: ``asyncio.CancelledError`` and is never retried.
RETRIED_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True, slots=True)
class RetryOptions:
    """Retries on UNAVAILABLE (and server-sent CANCELLED) for reads and
    request-ID'd mutations."""

    attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))


def new_request_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------- requests

_MODES: Final = {"keyed": pb.POOL_MODE_KEYED, "actor": pb.POOL_MODE_ACTOR}


def mode_value(mode: str | int) -> pb.PoolMode.ValueType:
    """``"keyed"``/``"actor"`` (any case, or ``PoolMode``) or an enum number → enum value."""
    if isinstance(mode, int):
        return pb.PoolMode.ValueType(mode)
    try:
        return _MODES[str(mode).strip().lower()]
    except KeyError:
        raise ValueError(f"mode must be 'keyed' or 'actor', got {mode!r}") from None


_MODE_NAMES: Final[dict[int, str]] = {value: name for name, value in _MODES.items()}


def mode_name(value: int) -> str:
    """Enum value → ``"keyed"``/``"actor"`` (``"unspecified"`` for anything else)."""
    return _MODE_NAMES.get(value, "unspecified")


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(value * 1e9))
    return d


def _partitions(partitions: Sequence[Partition] | None) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in partitions or ()]


def dead_letter_filter(
    *,
    topic: str = "",
    aggregate_id: str = "",
    error_type: str = "",
    reason: str = "",
    since: float | None = None,
) -> pb.DeadLetterFilter:
    f = pb.DeadLetterFilter(
        topic=topic, aggregate_id=aggregate_id, error_type=error_type, reason=reason
    )
    if since is not None:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(round(since * 1e9))
        f.since.CopyFrom(ts)
    return f


def _inbox_depth_request(
    aggregate_id: str, top: int, pool: str | int | None, omit_executors: bool
) -> pb.GetInboxDepthRequest:
    return pb.GetInboxDepthRequest(
        aggregate_id=aggregate_id,
        top=top,
        pool=mode_value(pool) if pool is not None else pb.POOL_MODE_UNSPECIFIED,
        omit_executors=omit_executors,
    )


#: ``scope=`` of the mutating calls: "fleet", "replica" or None (the server's
#: default: fleet when its control topic is enabled).
Scope = str | None

_SCOPES: Final = {
    None: pb.SCOPE_UNSPECIFIED,
    "": pb.SCOPE_UNSPECIFIED,
    "fleet": pb.SCOPE_FLEET,
    "replica": pb.SCOPE_REPLICA,
}


def scope_value(scope: Scope) -> pb.Scope.ValueType:
    try:
        return _SCOPES[scope.lower() if scope else scope]
    except KeyError:
        raise ValueError(f"scope must be 'fleet' or 'replica', got {scope!r}") from None


_Scoped = TypeVar(
    "_Scoped", pb.SetPoolModeRequest, pb.SetRolloutRequest, pb.PauseRequest, pb.ResumeRequest
)


def _scoped(
    request: _Scoped,
    scope: Scope,
    expected_generation: int | None,
    wait_timeout: float | None,
) -> _Scoped:
    request.scope = scope_value(scope)
    if expected_generation is not None:
        request.expected_generation = expected_generation
    if wait_timeout is not None:
        request.wait_timeout.CopyFrom(seconds(wait_timeout))
    return request


def _set_mode_request(
    mode: str | int,
    request_id: str | None,
    wait_timeout: float | None,
    scope: Scope = None,
    expected_generation: int | None = None,
) -> pb.SetPoolModeRequest:
    request = pb.SetPoolModeRequest(
        mode=mode_value(mode), request_id=request_id or new_request_id()
    )
    return _scoped(request, scope, expected_generation, wait_timeout)


def _set_rollout_request(
    percent: float,
    request_id: str | None,
    wait_timeout: float | None,
    scope: Scope = None,
    expected_generation: int | None = None,
) -> pb.SetRolloutRequest:
    request = pb.SetRolloutRequest(percent=percent, request_id=request_id or new_request_id())
    return _scoped(request, scope, expected_generation, wait_timeout)


_IntakeRequest = TypeVar("_IntakeRequest", pb.PauseRequest, pb.ResumeRequest)


def _intake_request(
    kind: type[_IntakeRequest],
    partitions: Sequence[Partition] | None,
    request_id: str | None,
    scope: Scope = None,
    expected_generation: int | None = None,
    wait_timeout: float | None = None,
) -> _IntakeRequest:
    """A ``PauseRequest`` or ``ResumeRequest`` (the same fields)."""
    request = kind(partitions=_partitions(partitions), request_id=request_id or new_request_id())
    return _scoped(request, scope, expected_generation, wait_timeout)


def _partition_list(reply: pb.PauseResponse | pb.ResumeResponse) -> list[Partition]:
    return [(p.topic, p.partition) for p in reply.partitions]


def _drain_request(
    timeout: float,
    partitions: Sequence[Partition] | None,
    resume_after: bool,
    request_id: str | None,
) -> pb.DrainRequest:
    return pb.DrainRequest(
        timeout=seconds(timeout),
        partitions=_partitions(partitions),
        resume_after=resume_after,
        request_id=request_id or new_request_id(),
    )


class _DrainReader:
    """One attempt at reading a drain stream: progress goes to the callback,
    the result is kept; on an error, whether to try the drain again."""

    __slots__ = ("on_progress", "received", "result")

    def __init__(self, on_progress: Callable[[pb.DrainProgress], None] | None) -> None:
        self.on_progress = on_progress
        self.received = False
        self.result: pb.DrainResult | None = None

    def feed(self, message: pb.DrainResponse) -> None:
        self.received = True
        if message.HasField("progress"):
            if self.on_progress is not None:
                self.on_progress(message.progress)
        else:
            self.result = message.result

    def retriable(self, error: ControlClientError, attempt: int, attempts: int) -> bool:
        """False: raise ``error`` (a timed-out drain's with its partial result).
        Only a drain that never reported progress is tried again, on UNAVAILABLE."""
        if isinstance(error, DeadlineError):
            error.partial = self.result
            return False
        return not self.received and isinstance(error, UnavailableError) and attempt < attempts

    def final(self, target: str) -> pb.DrainResult:
        if self.result is None:
            raise ControlClientError(
                grpc.StatusCode.UNKNOWN, "drain stream ended without a result", target
            )
        return self.result


def _dead_letters_request(
    follow: bool, filter: pb.DeadLetterFilter | None, backlog_limit: int, buffer_size: int
) -> pb.StreamDeadLettersRequest:
    return pb.StreamDeadLettersRequest(
        filter=filter or pb.DeadLetterFilter(),
        follow=follow,
        backlog_limit=backlog_limit,
        buffer_size=buffer_size,
    )


def _redrive_request(
    ids: Sequence[str], filter: pb.DeadLetterFilter | None, all: bool, request_id: str | None
) -> pb.RedriveDeadLettersRequest:
    request = pb.RedriveDeadLettersRequest(
        ids=list(ids), all=all, request_id=request_id or new_request_id()
    )
    if filter is not None:
        request.filter.CopyFrom(filter)
    return request


class _Base:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout: float = 10.0,
        retry: RetryOptions = RetryOptions(),
    ) -> None:
        self.target = target
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._tls = tls
        self.timeout = timeout
        self.retry = retry

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


# ------------------------------------------------------------ async client


class AsyncPoolControlClient(_Base):
    """Async client for one replica. ``async with`` closes the channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout: float = 10.0,
        retry: RetryOptions = RetryOptions(),
    ) -> None:
        super().__init__(target, token=token, tls=tls, timeout=timeout, retry=retry)
        if tls is not None:
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), tls.options())
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub: PoolControlAsyncStub = pb_grpc.PoolControlStub(self._channel)
        # grpc_health ships no stubs for health_pb2_grpc: the health stub is untyped.
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncPoolControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(
        self,
        call: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
        *,
        retry: bool = True,
    ) -> _Response:
        attempts = self.retry.attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return await call(request, timeout=self._timeout(timeout), metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRIED_CODES or attempt == attempts:
                    raise _error(exc, self.target) from None
            await asyncio.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------- reads
    async def fleet_status(self, *, timeout: float | None = None) -> pb.GetFleetStatusResponse:
        """The fleet's desired state and every replica's report."""
        return await self._unary(self._stub.GetFleetStatus, pb.GetFleetStatusRequest(), timeout)

    async def status(self, *, timeout: float | None = None) -> pb.GetStatusResponse:
        return await self._unary(self._stub.GetStatus, pb.GetStatusRequest(), timeout)

    async def inbox_depth(
        self,
        *,
        aggregate_id: str = "",
        top: int = 0,
        pool: str | int | None = None,
        omit_executors: bool = False,
        timeout: float | None = None,
    ) -> pb.GetInboxDepthResponse:
        request = _inbox_depth_request(aggregate_id, top, pool, omit_executors)
        return await self._unary(self._stub.GetInboxDepth, request, timeout)

    async def health(self, *, timeout: float | None = None) -> str:
        """``"SERVING"`` / ``"NOT_SERVING"`` of the control service (no token needed)."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=self._timeout(timeout),
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.target) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # ------------------------------------------------------- mutations
    async def set_mode(
        self,
        mode: str | int,
        *,
        request_id: str | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
    ) -> pb.SetPoolModeResponse:
        request = _set_mode_request(mode, request_id, wait_timeout, scope, expected_generation)
        return await self._unary(self._stub.SetPoolMode, request, timeout)

    async def set_rollout(
        self,
        percent: float,
        *,
        request_id: str | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
    ) -> pb.SetRolloutResponse:
        request = _set_rollout_request(
            percent, request_id, wait_timeout, scope, expected_generation
        )
        return await self._unary(self._stub.SetRollout, request, timeout)

    async def pause(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> list[Partition]:
        return _partition_list(
            await self.pause_reply(
                partitions,
                request_id=request_id,
                timeout=timeout,
                scope=scope,
                expected_generation=expected_generation,
                wait_timeout=wait_timeout,
            )
        )

    async def pause_reply(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> pb.PauseResponse:
        """Like :meth:`pause`, with the whole reply (fleet results included)."""
        request = _intake_request(
            pb.PauseRequest, partitions, request_id, scope, expected_generation, wait_timeout
        )
        return await self._unary(self._stub.Pause, request, timeout)

    async def resume(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> list[Partition]:
        return _partition_list(
            await self.resume_reply(
                partitions,
                request_id=request_id,
                timeout=timeout,
                scope=scope,
                expected_generation=expected_generation,
                wait_timeout=wait_timeout,
            )
        )

    async def resume_reply(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> pb.ResumeResponse:
        """Like :meth:`resume`, with the whole reply (fleet results included)."""
        request = _intake_request(
            pb.ResumeRequest, partitions, request_id, scope, expected_generation, wait_timeout
        )
        return await self._unary(self._stub.Resume, request, timeout)

    async def drain(
        self,
        timeout: float,
        *,
        partitions: Sequence[Partition] | None = None,
        resume_after: bool = False,
        request_id: str | None = None,
        on_progress: Callable[[pb.DrainProgress], None] | None = None,
    ) -> pb.DrainResult:
        """Drain; returns the final result. Raises :class:`DeadlineError` (with
        ``partial``) when the server's drain timed out."""
        request = _drain_request(timeout, partitions, resume_after, request_id)
        for attempt in range(1, self.retry.attempts + 1):
            reader = _DrainReader(on_progress)
            try:
                stream = self._stub.Drain(
                    request, timeout=timeout + DRAIN_GRACE, metadata=self._metadata
                )
                async for message in stream:
                    reader.feed(message)
            except grpc.aio.AioRpcError as exc:
                error = _error(exc, self.target)
                if not reader.retriable(error, attempt, self.retry.attempts):
                    raise error from None
                await asyncio.sleep(self.retry.backoff(attempt))
                continue
            return reader.final(self.target)
        raise AssertionError("unreachable")  # pragma: no cover

    async def dead_letters(
        self,
        *,
        follow: bool = False,
        filter: pb.DeadLetterFilter | None = None,
        backlog_limit: int = 0,
        buffer_size: int = 0,
    ) -> AsyncIterator[pb.StreamDeadLettersResponse]:
        """Stream events: dead letters of the backlog, a ``backlog_end``, then
        (``follow``) live dead letters and ``skipped`` notices. Not retried."""
        request = _dead_letters_request(follow, filter, backlog_limit, buffer_size)
        stream = self._stub.StreamDeadLetters(
            request, timeout=None if follow else self.timeout, metadata=self._metadata
        )
        try:
            async for message in stream:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.target) from None
        finally:
            stream.cancel()

    async def redrive(
        self,
        *,
        ids: Sequence[str] = (),
        filter: pb.DeadLetterFilter | None = None,
        all: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.RedriveDeadLettersResponse:
        request = _redrive_request(ids, filter, all, request_id)
        return await self._unary(self._stub.RedriveDeadLetters, request, timeout)


# ------------------------------------------------------------- sync client


class PoolControlClient(_Base):
    """Blocking client for one replica (scripts, notebooks). ``with`` closes it."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout: float = 10.0,
        retry: RetryOptions = RetryOptions(),
    ) -> None:
        super().__init__(target, token=token, tls=tls, timeout=timeout, retry=retry)
        if tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), tls.options())
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.PoolControlStub(self._channel)
        # grpc_health ships no stubs for health_pb2_grpc: the health stub is untyped.
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        """Close the channel. Idempotent."""
        self._channel.close()

    def __enter__(self) -> PoolControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(
        self,
        call: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> _Response:
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return call(request, timeout=self._timeout(timeout), metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRIED_CODES or attempt == self.retry.attempts:
                    raise _error(exc, self.target) from None
            time.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def fleet_status(self, *, timeout: float | None = None) -> pb.GetFleetStatusResponse:
        """The fleet's desired state and every replica's report."""
        return self._unary(self._stub.GetFleetStatus, pb.GetFleetStatusRequest(), timeout)

    def status(self, *, timeout: float | None = None) -> pb.GetStatusResponse:
        return self._unary(self._stub.GetStatus, pb.GetStatusRequest(), timeout)

    def inbox_depth(
        self,
        *,
        aggregate_id: str = "",
        top: int = 0,
        pool: str | int | None = None,
        omit_executors: bool = False,
        timeout: float | None = None,
    ) -> pb.GetInboxDepthResponse:
        request = _inbox_depth_request(aggregate_id, top, pool, omit_executors)
        return self._unary(self._stub.GetInboxDepth, request, timeout)

    def health(self, *, timeout: float | None = None) -> str:
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=self._timeout(timeout),
            )
        except grpc.RpcError as exc:
            raise _error(exc, self.target) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def set_mode(
        self,
        mode: str | int,
        *,
        request_id: str | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
    ) -> pb.SetPoolModeResponse:
        request = _set_mode_request(mode, request_id, wait_timeout, scope, expected_generation)
        return self._unary(self._stub.SetPoolMode, request, timeout)

    def set_rollout(
        self,
        percent: float,
        *,
        request_id: str | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
    ) -> pb.SetRolloutResponse:
        request = _set_rollout_request(
            percent, request_id, wait_timeout, scope, expected_generation
        )
        return self._unary(self._stub.SetRollout, request, timeout)

    def pause(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> list[Partition]:
        return _partition_list(
            self.pause_reply(
                partitions,
                request_id=request_id,
                timeout=timeout,
                scope=scope,
                expected_generation=expected_generation,
                wait_timeout=wait_timeout,
            )
        )

    def pause_reply(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> pb.PauseResponse:
        """Like :meth:`pause`, with the whole reply (fleet results included)."""
        request = _intake_request(
            pb.PauseRequest, partitions, request_id, scope, expected_generation, wait_timeout
        )
        return self._unary(self._stub.Pause, request, timeout)

    def resume(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> list[Partition]:
        return _partition_list(
            self.resume_reply(
                partitions,
                request_id=request_id,
                timeout=timeout,
                scope=scope,
                expected_generation=expected_generation,
                wait_timeout=wait_timeout,
            )
        )

    def resume_reply(
        self,
        partitions: Sequence[Partition] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        scope: Scope = None,
        expected_generation: int | None = None,
        wait_timeout: float | None = None,
    ) -> pb.ResumeResponse:
        """Like :meth:`resume`, with the whole reply (fleet results included)."""
        request = _intake_request(
            pb.ResumeRequest, partitions, request_id, scope, expected_generation, wait_timeout
        )
        return self._unary(self._stub.Resume, request, timeout)

    def drain(
        self,
        timeout: float,
        *,
        partitions: Sequence[Partition] | None = None,
        resume_after: bool = False,
        request_id: str | None = None,
        on_progress: Callable[[pb.DrainProgress], None] | None = None,
    ) -> pb.DrainResult:
        """As :meth:`AsyncPoolControlClient.drain` (not retried once progress arrived)."""
        request = _drain_request(timeout, partitions, resume_after, request_id)
        for attempt in range(1, self.retry.attempts + 1):
            reader = _DrainReader(on_progress)
            try:
                for message in self._stub.Drain(
                    request, timeout=timeout + DRAIN_GRACE, metadata=self._metadata
                ):
                    reader.feed(message)
            except grpc.RpcError as exc:
                error = _error(exc, self.target)
                if not reader.retriable(error, attempt, self.retry.attempts):
                    raise error from None
                time.sleep(self.retry.backoff(attempt))
                continue
            return reader.final(self.target)
        raise AssertionError("unreachable")  # pragma: no cover

    def dead_letters(
        self,
        *,
        follow: bool = False,
        filter: pb.DeadLetterFilter | None = None,
        backlog_limit: int = 0,
        buffer_size: int = 0,
    ) -> Iterator[pb.StreamDeadLettersResponse]:
        request = _dead_letters_request(follow, filter, backlog_limit, buffer_size)
        stream = self._stub.StreamDeadLetters(
            request, timeout=None if follow else self.timeout, metadata=self._metadata
        )
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise _error(exc, self.target) from None
        finally:
            # grpc-stubs leaves RpcContext.cancel unannotated.
            stream.cancel()  # type: ignore[no-untyped-call]

    def redrive(
        self,
        *,
        ids: Sequence[str] = (),
        filter: pb.DeadLetterFilter | None = None,
        all: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.RedriveDeadLettersResponse:
        request = _redrive_request(ids, filter, all, request_id)
        return self._unary(self._stub.RedriveDeadLetters, request, timeout)
