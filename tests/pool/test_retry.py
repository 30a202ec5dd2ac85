from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool import RestartBudget, RetryPolicy


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, jitter=0.0)
    assert [policy.backoff(n, 0.5) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0, max_value=0.999999))
def test_jitter_stays_within_its_band(attempts: int, rand: float) -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0, jitter=0.2)
    base = min(5.0, 0.1 * 2.0 ** (attempts - 1))
    assert base * 0.8 - 1e-12 <= policy.backoff(attempts, rand) <= base * 1.2 + 1e-12


def test_should_retry_counts_the_first_try() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.should_retry(n) for n in (1, 2, 3)] == [True, True, False]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_backoff": -1}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_restart_budget_counts_within_a_sliding_window() -> None:
    budget = RestartBudget(max_restarts=3, window=10.0)
    assert [budget.try_restart(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert budget.try_restart(3.0) is False  # spent
    assert budget.used(3.0) == 3
    assert budget.try_restart(10.5) is True  # the restart at t=0 aged out
    assert budget.used(10.5) == 3
    assert budget.try_restart(100.0) is True  # a long-lived actor is not condemned
    assert budget.used(100.0) == 1


def test_reset_makes_the_budget_whole() -> None:
    budget = RestartBudget(max_restarts=2, window=10.0)
    assert [budget.try_restart(t) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    budget.reset()
    assert budget.used(2.0) == 0
    assert [budget.try_restart(t) for t in (3.0, 4.0, 5.0)] == [True, True, False]


def test_zero_budget_always_escalates() -> None:
    assert RestartBudget(max_restarts=0).try_restart(0.0) is False
