"""The one root of the service's own errors.

Every error class of ``server/`` derives from :class:`ServiceError` (some also
from the built-in they always were, e.g. ``ConfigError`` is a ``ValueError``).
``retriable`` says whether doing the same thing again later may succeed
(as ``aiokafka.errors.KafkaError.retriable``): ``NotReadyError`` is retriable,
a bad configuration or an invalid argument is not.

The subclasses live with the code that raises them:

- :class:`server._config.ConfigError` and :class:`server._grpc.GrpcConfigError`
  (the service refuses to start);
- :class:`server._service.ServiceStartError` (an operational start-up failure:
  no broker answered, a port is taken; retriable);
- :class:`server._broker.BrokerError` (the embedded broker);
- :class:`server._handlers.HandlerLoadError` (the handler cannot be imported);
- :class:`server._intake.IntakeError` (a record that is not an event);
- :class:`server._dlq.DeadLetterSinkError` (the sink is not started or closed);
- :class:`server._control.ControlError` (what a control target refuses,
  :class:`~server._control.ConflictError` among them: a lost fleet
  compare-and-set) and :class:`server._grpc.RpcStatusError` (a call answered
  with a status code);
- :class:`server._fleet.FleetTopicError` (the control topic cannot be used).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """Root of the errors raised by the service (``server/``)."""

    #: Whether the same operation may succeed if tried again later.
    retriable: ClassVar[bool] = False
