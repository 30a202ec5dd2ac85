"""The pool library: routing, the keyed worker pool, the supervised actor pool,
the live mode switch, dead letters and metrics. Pure asyncio: no Kafka, no gRPC.
"""

from pool._actor import ActorFactory, ActorPool
from pool._deadletter import DeadLetter, DeadLetterReason
from pool._errors import (
    DrainTimeoutError,
    NonRetryableError,
    PoolClosedError,
    PoolError,
    QueueFullError,
)
from pool._executor import BasePool
from pool._keyed import KeyedWorkerPool
from pool._message import Message
from pool._metrics import NoopMetrics, PoolMetrics, PrometheusPoolMetrics
from pool._options import ActorPoolOptions, PoolOptions
from pool._protocol import Completion, FinishListener, Handler, Pool, PoolMode
from pool._retry import RestartBudget, RetryPolicy
from pool._routing import Router, executor_index, fnv1a_32
from pool._switch import PoolSwitch, SwitchResult, rollout_bucket

__all__ = [
    "ActorFactory",
    "ActorPool",
    "ActorPoolOptions",
    "BasePool",
    "Completion",
    "DeadLetter",
    "DeadLetterReason",
    "DrainTimeoutError",
    "FinishListener",
    "Handler",
    "KeyedWorkerPool",
    "Message",
    "NonRetryableError",
    "NoopMetrics",
    "Pool",
    "PoolClosedError",
    "PoolError",
    "PoolMetrics",
    "PoolMode",
    "PoolOptions",
    "PoolSwitch",
    "PrometheusPoolMetrics",
    "QueueFullError",
    "RestartBudget",
    "RetryPolicy",
    "Router",
    "SwitchResult",
    "executor_index",
    "fnv1a_32",
    "rollout_bucket",
]
