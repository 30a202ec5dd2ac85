"""server._errors: one root for the service's own errors, each saying whether it is retriable."""

from __future__ import annotations

import pytest

import server
from server import ServiceError
from server._broker import BrokerError
from server._config import ConfigError
from server._control import (
    ConflictError,
    ControlError,
    DrainIncompleteError,
    NotReadyError,
    PreconditionError,
    UnknownPartitionError,
)
from server._dlq import DeadLetterSinkError
from server._fleet import FleetTopicError
from server._grpc import (
    GrpcConfigError,
    InvalidArgumentError,
    PermissionDeniedError,
    RpcStatusError,
    UnauthenticatedError,
)
from server._handlers import HandlerLoadError
from server._intake import IntakeError, OversizedValueError
from server._service import ServiceStartError

#: Every error class of server/, with the built-in it has always been as well.
ERRORS: list[tuple[type[Exception], type[Exception]]] = [
    (ConfigError, ValueError),
    (GrpcConfigError, ValueError),
    (BrokerError, RuntimeError),
    (ServiceStartError, RuntimeError),
    (HandlerLoadError, ImportError),
    (IntakeError, Exception),
    (OversizedValueError, IntakeError),
    (DeadLetterSinkError, Exception),
    (ControlError, Exception),
    (NotReadyError, ControlError),
    (UnknownPartitionError, ControlError),
    (PreconditionError, ControlError),
    (DrainIncompleteError, ControlError),
    (ConflictError, ControlError),
    (FleetTopicError, RuntimeError),
    (RpcStatusError, Exception),
    (InvalidArgumentError, RpcStatusError),
    (UnauthenticatedError, RpcStatusError),
    (PermissionDeniedError, RpcStatusError),
]


@pytest.mark.parametrize(("error", "also"), ERRORS, ids=[e.__name__ for e, _ in ERRORS])
def test_every_service_error_derives_from_the_root_and_keeps_its_old_base(
    error: type[Exception], also: type[Exception]
) -> None:
    assert issubclass(error, ServiceError)
    assert issubclass(error, also)
    assert isinstance(error.retriable, bool)


def test_only_what_may_succeed_later_is_retriable() -> None:
    retriable = {e for e, _ in ERRORS if e.retriable}  # type: ignore[attr-defined]
    assert retriable == {NotReadyError, DrainIncompleteError, ServiceStartError}


def test_the_root_is_exported_by_the_package() -> None:
    assert server.ServiceError is ServiceError
    assert "ServiceError" in server.__all__
