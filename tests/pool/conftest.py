"""Pool test fixtures: one contract suite runs against both pools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pool import (
    ActorPool,
    ActorPoolOptions,
    BasePool,
    KeyedWorkerPool,
    PoolOptions,
    RetryPolicy,
)

# ``msg`` lives in tests/support (the server tests use it too); the pool tests import it here.
from tests.support.messages import msg as msg

PoolFactory = Callable[..., BasePool]

#: Fast retries so failure tests take milliseconds.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005, jitter=0.0)


def make_pool(kind: str, handler: Any, **options: Any) -> BasePool:
    """A pool of ``kind`` built with these options (fields of its options class)."""
    options.setdefault("retry", FAST_RETRY)
    if kind == "keyed":
        return KeyedWorkerPool(handler, PoolOptions(**options))
    return ActorPool(handler, ActorPoolOptions(**options))


@pytest.fixture(params=["keyed", "actor"])
def pool_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pool_factory(pool_kind: str) -> PoolFactory:
    def factory(handler: Any, **kw: Any) -> BasePool:
        return make_pool(pool_kind, handler, **kw)

    return factory
