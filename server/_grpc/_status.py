"""The control plane's status errors and the one mapping from exceptions to status codes.

Handlers raise; they never call ``context.abort``. The interceptor turns
every exception into a status with :func:`status_for`:

- :class:`RpcStatusError` carries its own code: :class:`InvalidArgumentError`
  is how a request is refused as invalid (the only source of
  ``INVALID_ARGUMENT``), :class:`UnauthenticatedError` and
  :class:`PermissionDeniedError` come from the token check;
- the :class:`~server._control.ControlError` types a control target raises,
  and the pool's drain timeout and closed pool, have one code each (a lost
  fleet compare-and-set, :class:`~server._control.ConflictError`, is
  ``ABORTED``);
- anything else, a ``ValueError`` or ``TypeError`` included, is a bug of ours:
  ``INTERNAL`` with a generic message, the details in the server log.
"""

from __future__ import annotations

import grpc

from pool import DrainTimeoutError, PoolClosedError
from server._control import (
    ConflictError,
    ControlError,
    DrainIncompleteError,
    NotReadyError,
    PreconditionError,
    UnknownPartitionError,
)
from server._errors import ServiceError

__all__ = [
    "InvalidArgumentError",
    "PermissionDeniedError",
    "RpcStatusError",
    "UnauthenticatedError",
    "status_for",
]


class RpcStatusError(ServiceError):
    """Raised inside the control plane to answer with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class InvalidArgumentError(RpcStatusError):
    """The request is invalid (a field out of range, missing, or contradicting
    another); the same request will fail again."""

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
        case ConflictError():
            return grpc.StatusCode.ABORTED, str(exc)
        case NotReadyError() | PoolClosedError():
            return grpc.StatusCode.UNAVAILABLE, str(exc) or "service not ready"
        case PreconditionError() | ControlError():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case TimeoutError():
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
        case _:
            return (
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}); see server log",
            )
