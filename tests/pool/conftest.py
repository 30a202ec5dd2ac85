"""Pool test fixtures: one contract suite runs against both pools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pool import ActorPool, BasePool, KeyedWorkerPool, Message, RetryPolicy

PoolFactory = Callable[..., BasePool]

#: Fast retries so failure tests take milliseconds.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005, jitter=0.0)


def make_pool(kind: str, handler: Any, **kw: Any) -> BasePool:
    kw.setdefault("retry", FAST_RETRY)
    if kind == "keyed":
        queue = kw.pop("capacity", 1000)
        return KeyedWorkerPool(handler, queue_size=queue, **kw)
    inbox = kw.pop("capacity", 1000)
    return ActorPool(handler, inbox_size=inbox, **kw)


@pytest.fixture(params=["keyed", "actor"])
def pool_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pool_factory(pool_kind: str) -> PoolFactory:
    def factory(handler: Any, **kw: Any) -> BasePool:
        return make_pool(pool_kind, handler, **kw)

    return factory


def msg(aggregate_id: str, offset: int, partition: int = 0, value: bytes = b"") -> Message:
    return Message(
        topic="t",
        partition=partition,
        offset=offset,
        key=aggregate_id.encode(),
        value=value,
        headers=(),
        aggregate_id=aggregate_id,
        timestamp_ms=0,
    )
