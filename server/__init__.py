"""The service process: configuration, embedded broker, intake, the Kafka
consumer and offset tracking, the dead-letter sink, the gRPC control plane,
``/metrics``, logging and the ``pool-server`` entry point.

Names are imported lazily (PEP 562), so ``python -m server.healthcheck`` — run
by the container's HEALTHCHECK every few seconds — does not pay for importing
aiokafka and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server._broker import EmbeddedBroker
    from server._config import ConfigError, Settings, load_settings
    from server._consumer import ConsumerOptions, EventConsumer
    from server._dlq import DeadLetterSink
    from server._errors import ServiceError
    from server._grpc import start_grpc_server
    from server._handlers import HandlerLoadError, load_handler
    from server._intake import Decoder
    from server._logging import configure_logging
    from server._offsets import CommitPolicy, OffsetTracker
    from server._pauses import PauseBook
    from server._service import Endpoints, Service, ServiceStartError
    from server._version import version

_EXPORTS = {
    "CommitPolicy": "server._offsets",
    "ConfigError": "server._config",
    "ConsumerOptions": "server._consumer",
    "Decoder": "server._intake",
    "DeadLetterSink": "server._dlq",
    "EmbeddedBroker": "server._broker",
    "Endpoints": "server._service",
    "EventConsumer": "server._consumer",
    "HandlerLoadError": "server._handlers",
    "OffsetTracker": "server._offsets",
    "PauseBook": "server._pauses",
    "Service": "server._service",
    "ServiceError": "server._errors",
    "ServiceStartError": "server._service",
    "Settings": "server._config",
    "configure_logging": "server._logging",
    "load_handler": "server._handlers",
    "load_settings": "server._config",
    "start_grpc_server": "server._grpc",
    "version": "server._version",
}

__all__ = [
    "CommitPolicy",
    "ConfigError",
    "ConsumerOptions",
    "DeadLetterSink",
    "Decoder",
    "EmbeddedBroker",
    "Endpoints",
    "EventConsumer",
    "HandlerLoadError",
    "OffsetTracker",
    "PauseBook",
    "Service",
    "ServiceError",
    "ServiceStartError",
    "Settings",
    "configure_logging",
    "load_handler",
    "load_settings",
    "start_grpc_server",
    "version",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
