from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool import Router, executor_index, fnv1a_32


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", 0x811C9DC5), (b"a", 0xE40C292C), (b"foobar", 0xBF9CF968)],
)
def test_fnv1a_32_vectors(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


@pytest.mark.parametrize(("aggregate_id", "index"), [("order-1", 109), ("customer:42", 127)])
def test_executor_index_matches_the_go_original(aggregate_id: str, index: int) -> None:
    assert executor_index(aggregate_id, 256) == index
    assert Router(256)(aggregate_id) == index


@given(st.text(max_size=64), st.integers(min_value=1, max_value=1024))
def test_router_memo_agrees_with_executor_index(aggregate_id: str, size: int) -> None:
    router = Router(size, memo_size=4)
    assert router(aggregate_id) == executor_index(aggregate_id, size)
    assert router(aggregate_id) == executor_index(aggregate_id, size)  # memoised path
    assert 0 <= router(aggregate_id) < size


def test_router_memo_stays_bounded() -> None:
    router = Router(256, memo_size=100)
    for i in range(1000):
        router(f"agg-{i}")
    assert len(router.memo) <= 100


@pytest.mark.parametrize("size", [0, -1])
def test_invalid_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="pool size must be positive"):
        executor_index("x", size)
    with pytest.raises(ValueError, match="pool size must be positive"):
        Router(size)
