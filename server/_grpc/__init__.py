"""The gRPC control plane: ``actorpool.control.v1.PoolControl`` over a :class:`ControlTarget`.

Layers, outside in:

1. :class:`ControlInterceptor` (``_interceptor.py``, one per server) — for
   every call: binds the request context into ``structlog.contextvars``,
   checks the bearer token (``_auth.py``), maps any exception to a status
   code (:func:`status_for` in ``_status.py``, the one place where that
   happens), counts the call by method and code, times it, and writes an
   audit record for every mutating call.
2. :class:`PoolControlServicer` (``_servicer.py``) — one method per RPC:
   validates arguments (raising :class:`InvalidArgumentError`), answers
   repeated ``request_id`` s from a bounded memory (``_replay.py``),
   serialises mode/rollout changes, converts to and from the protobuf
   messages (``_convert.py``), and calls the :class:`ControlTarget`, or for
   fleet scope the fleet's control topic (``_fleet.py``). The
   dead-letter stream follows the target through a
   :class:`~server._dlq_subscription.DeadLetterSubscription`.
3. ``grpc.health.v1.Health`` (``_health.py``: NOT_SERVING until ready, while
   a drain runs, and from the start of shutdown) and server reflection.

:func:`start_grpc_server` (``_server.py``) binds and starts it all and
returns a :class:`GrpcServerHandle`.
"""

from __future__ import annotations

from server._grpc._auth import TokenAuth
from server._grpc._convert import (
    DEFAULT_SWITCH_WAIT,
    MAX_DRAIN_TIMEOUT,
    dead_letter_to_pb,
    drain_progress_to_pb,
    drain_result_to_pb,
    duration,
    filter_from_pb,
    mode_to_pb,
    status_to_pb,
    switch_result_to_pb,
    timestamp,
)
from server._grpc._health import HEALTH_SERVICE_NAME, HealthState
from server._grpc._interceptor import ControlInterceptor
from server._grpc._replay import ReplayCache
from server._grpc._server import (
    GrpcConfigError,
    GrpcServerHandle,
    TlsFiles,
    split_address,
    start_grpc_server,
)
from server._grpc._servicer import (
    DEFAULT_STREAM_BUFFER,
    MAX_STREAM_BUFFER,
    MUTATING_METHODS,
    SERVICE_NAME,
    PoolControlServicer,
)
from server._grpc._status import (
    InvalidArgumentError,
    PermissionDeniedError,
    RpcStatusError,
    UnauthenticatedError,
    status_for,
)

__all__ = [
    "DEFAULT_STREAM_BUFFER",
    "DEFAULT_SWITCH_WAIT",
    "HEALTH_SERVICE_NAME",
    "MAX_DRAIN_TIMEOUT",
    "MAX_STREAM_BUFFER",
    "MUTATING_METHODS",
    "SERVICE_NAME",
    "ControlInterceptor",
    "GrpcConfigError",
    "GrpcServerHandle",
    "HealthState",
    "InvalidArgumentError",
    "PermissionDeniedError",
    "PoolControlServicer",
    "ReplayCache",
    "RpcStatusError",
    "TlsFiles",
    "TokenAuth",
    "UnauthenticatedError",
    "dead_letter_to_pb",
    "drain_progress_to_pb",
    "drain_result_to_pb",
    "duration",
    "filter_from_pb",
    "mode_to_pb",
    "split_address",
    "start_grpc_server",
    "status_for",
    "status_to_pb",
    "switch_result_to_pb",
    "timestamp",
]
