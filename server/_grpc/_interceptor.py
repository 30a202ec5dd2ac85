"""The one interceptor of the control plane: what happens around every call.

For every call of the control service (health probes pass through), in order:
bind the request context (``rpc_method``, ``request_id``, ``peer``,
``caller``) into ``structlog.contextvars``; check the bearer token
(:class:`~server._grpc._auth.TokenAuth`); run the handler; map any exception
to a status code (:func:`~server._grpc._status.status_for`, logging
``control.call_failed`` with the traceback for ``INTERNAL``); count the call
by method and code and time it; write a ``control.audit`` record for every
mutating call, else ``control.call_refused`` for a call answered with an
error. A call the client cancelled (or whose deadline passed) is counted as
``CANCELLED`` and logged as a normal end: ``control.stream_cancelled`` for
a stream, ``control.call_cancelled`` for a unary call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import structlog

from server._control_metrics import ControlMetrics
from server._grpc._auth import Metadata, TokenAuth
from server._grpc._status import status_for

__all__ = ["ControlInterceptor"]

log = structlog.get_logger("server.grpc")
audit_log = structlog.get_logger("server.audit")

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
if TYPE_CHECKING:
    _InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    _InterceptorBase = grpc.aio.ServerInterceptor


@dataclass(slots=True)
class _Call:
    method: str
    mutating: bool
    streaming: bool
    metadata: Metadata | None
    started: float
    role: str = "unauthenticated"
    request_id: str = ""


class ControlInterceptor(_InterceptorBase):
    """Auth, request context, status mapping, metrics and audit for every call of
    ``service`` (full name); ``mutating`` names its methods that need the admin
    token and are audited. Other services' calls are counted under their full
    method path; ``skip`` services (health) pass through untouched."""

    def __init__(
        self,
        auth: TokenAuth,
        metrics: ControlMetrics,
        *,
        service: str,
        mutating: Collection[str],
        skip: Collection[str] = (),
    ) -> None:
        self._auth = auth
        self._metrics = metrics
        self._service = service
        self._mutating = frozenset(mutating)
        self._skip = frozenset(skip)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        service, _, method = full.lstrip("/").rpartition("/")
        if handler is None or service in self._skip:
            return handler  # probes need no token
        ours = service == self._service
        mutating = ours and method in self._mutating
        metadata = handler_call_details.invocation_metadata
        streaming = bool(handler.response_streaming)

        def new_call() -> _Call:
            return _Call(
                method=method if ours else full,
                mutating=mutating,
                streaming=streaming,
                metadata=metadata,
                started=time.monotonic(),
            )

        return _wrap_handler(handler, new_call, self)

    # The four shapes of handler share these three steps.
    def begin(self, call: _Call, request: object, context: _Context) -> None:
        call.request_id = str(getattr(request, "request_id", "") or "")
        structlog.contextvars.bind_contextvars(
            rpc_method=call.method, request_id=call.request_id or None, peer=context.peer()
        )
        call.role = self._auth.role(call.metadata)
        structlog.contextvars.bind_contextvars(caller=call.role)
        self._auth.authorize(call.role, call.method, call.mutating)

    async def fail(self, call: _Call, exc: BaseException, context: _Context) -> None:
        """Record a failed call and answer with its status (raises)."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.finish(
                call, grpc.StatusCode.CANCELLED, "cancelled by the client", context, cancelled=True
            )
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
        context: _Context,
        *,
        cancelled: bool = False,
    ) -> None:
        took = time.monotonic() - call.started
        name = code.name
        self._metrics.calls.labels(call.method, name).inc()
        self._metrics.duration.labels(call.method).observe(took)
        if call.mutating:
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
        elif cancelled:
            log.info(
                "control.stream_cancelled" if call.streaming else "control.call_cancelled",
                method=call.method,
                took_ms=round(took * 1000, 3),
            )
        elif code is not grpc.StatusCode.OK:
            log.info("control.call_refused", method=call.method, code=name, detail=details)
        structlog.contextvars.unbind_contextvars("rpc_method", "request_id", "peer", "caller")


def _peer_identity(context: _Context) -> str | None:
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
    ic: ControlInterceptor,
) -> _Handler:
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
