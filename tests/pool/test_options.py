"""Pool options: frozen values, validated when built."""

from __future__ import annotations

import dataclasses

import pytest

from pool import ActorPool, ActorPoolOptions, KeyedWorkerPool, Message, PoolOptions, RetryPolicy


async def handler(m: Message) -> None:
    pass


def test_options_are_frozen_and_the_pools_keep_what_they_were_given() -> None:
    retry = RetryPolicy(max_attempts=5)
    options = PoolOptions(size=3, capacity=7, retry=retry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.size = 4  # type: ignore[misc]
    keyed = KeyedWorkerPool(handler, options)
    assert (keyed.options, keyed.size, keyed.capacity) == (options, 3, 7)
    actor = ActorPool(handler, ActorPoolOptions(size=2, capacity=5, max_restarts=9))
    assert (actor.size, actor.capacity, actor.options.max_restarts) == (2, 5, 9)


def test_defaults_are_the_documented_ones() -> None:
    assert PoolOptions() == PoolOptions(
        size=256, capacity=1000, retry=RetryPolicy(), handler_timeout=None, handler_threads=32
    )
    a = ActorPoolOptions()
    assert (a.size, a.capacity, a.max_restarts, a.restart_window) == (256, 1000, 3, 60.0)
    assert KeyedWorkerPool(handler).options == PoolOptions()
    assert ActorPool(handler).options == ActorPoolOptions()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size must be >= 1"),
        ({"capacity": 0}, "capacity must be >= 1"),
        ({"handler_timeout": 0}, "handler_timeout must be > 0"),
        ({"handler_threads": 0}, "handler_threads must be >= 1"),
    ],
)
def test_invalid_pool_options_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoolOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        ActorPoolOptions(**kwargs)  # type: ignore[arg-type]


def test_invalid_restart_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        ActorPoolOptions(max_restarts=-1)
    with pytest.raises(ValueError, match="window"):
        ActorPoolOptions(restart_window=0)
