"""Clients of the control API (``actorpool.control.v1.PoolControl``) and the ``poolctl`` CLI."""

from clients._client import (
    DEFAULT_TARGET,
    AsyncPoolControlClient,
    AuthError,
    ClientTls,
    ControlClientError,
    DeadlineError,
    InvalidArgumentError,
    NotFoundError,
    PoolControlClient,
    PreconditionError,
    RetryOptions,
    UnavailableError,
    dead_letter_filter,
    mode_name,
    mode_value,
    new_request_id,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncPoolControlClient",
    "AuthError",
    "ClientTls",
    "ControlClientError",
    "DeadlineError",
    "InvalidArgumentError",
    "NotFoundError",
    "PoolControlClient",
    "PreconditionError",
    "RetryOptions",
    "UnavailableError",
    "dead_letter_filter",
    "mode_name",
    "mode_value",
    "new_request_id",
]
