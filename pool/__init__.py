"""The pool library: routing, the keyed worker pool, the supervised actor pool,
the live mode switch, dead letters and metrics. Pure asyncio: no Kafka, no gRPC.
"""

from pool._deadletter import DeadLetter, DeadLetterReason
from pool._errors import (
    DrainTimeoutError,
    NonRetryableError,
    PoolClosedError,
    PoolError,
    QueueFullError,
)
from pool._message import Message
from pool._metrics import NoopMetrics, PoolMetrics, PrometheusPoolMetrics
from pool._protocol import Completion, Handler, Pool, PoolMode
from pool._routing import Router, executor_index, fnv1a_32

__all__ = [
    "Completion",
    "DeadLetter",
    "DeadLetterReason",
    "DrainTimeoutError",
    "Handler",
    "Message",
    "NonRetryableError",
    "NoopMetrics",
    "Pool",
    "PoolClosedError",
    "PoolError",
    "PoolMetrics",
    "PoolMode",
    "PrometheusPoolMetrics",
    "QueueFullError",
    "Router",
    "executor_index",
    "fnv1a_32",
]
