"""Pure policies: retry backoff and the supervisor's restart budget.

Both take time and randomness as arguments, never read a clock themselves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failing event is tried, and how long to wait between tries.

    ``max_attempts`` counts the first try: 3 means one try and two retries.
    The delay before retry *n* (n = 1 after the first failure) is
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``, spread by
    ``±jitter`` (a fraction) so that many failing executors do not retry in
    lock step.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff durations must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def should_retry(self, attempts: int) -> bool:
        """Whether an event that has failed ``attempts`` times gets another try."""
        return attempts < self.max_attempts

    def backoff(self, attempts: int, rand: float) -> float:
        """Delay in seconds after the ``attempts``-th failure; ``rand`` in [0, 1)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempts - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rand - 1.0)))


class RestartBudget:
    """At most ``max_restarts`` restarts within any sliding ``window`` seconds.

    A state machine with the clock passed in: ``try_restart(now)`` records a
    restart and returns True while the budget allows it, False once it is
    spent (the supervisor then escalates instead of retrying). Restarts older
    than the window stop counting, so a long-lived actor is not condemned by
    old failures; ``reset()`` forgets them all (the actor pool calls it when
    an actor has handled an event since its last crash: the budget detects a
    crash loop, not a failure rate).
    """

    __slots__ = ("_times", "max_restarts", "window")

    def __init__(self, max_restarts: int = 3, window: float = 60.0) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.max_restarts = max_restarts
        self.window = window
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()

    def try_restart(self, now: float) -> bool:
        self._expire(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def reset(self) -> None:
        """Forget every counted restart: the budget is whole again."""
        self._times.clear()

    def used(self, now: float) -> int:
        """Restarts counted in the window ending at ``now``."""
        self._expire(now)
        return len(self._times)
