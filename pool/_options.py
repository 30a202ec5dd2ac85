"""How a pool runs: frozen options, validated when built.

Options are values (sizes, policies, limits). What a pool talks to — its
metrics collector, a shared thread pool, the clocks and the random source — is
passed to the pool's constructor next to them, as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pool._retry import RestartBudget, RetryPolicy


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Options of either pool (the keyed pool takes exactly these)."""

    #: Number of executors (workers or actors).
    size: int = 256
    #: Bound on each executor's depth, queued + running (its queue or inbox size).
    capacity: int = 1000
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Per attempt of an ``async def`` handler; ``None``: no limit. Sync handlers
    #: run in a thread, which cannot be interrupted: they get no timeout.
    handler_timeout: float | None = None
    #: Threads of the pool's own thread pool for sync handlers (when none is given).
    handler_threads: int = 32
    #: Log each dead letter (WARNING ``pool.dead_letter``); the service turns it
    #: off because its dead-letter sink logs each one once published.
    log_dead_letters: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {self.capacity}")
        if self.handler_timeout is not None and self.handler_timeout <= 0:
            raise ValueError(f"handler_timeout must be > 0, got {self.handler_timeout}")
        if self.handler_threads < 1:
            raise ValueError(f"handler_threads must be >= 1, got {self.handler_threads}")


@dataclass(frozen=True, slots=True)
class ActorPoolOptions(PoolOptions):
    """Options of the actor pool: the pool's, and each actor's restart budget."""

    #: Restarts charged within ``restart_window`` seconds before the supervisor escalates.
    max_restarts: int = 3
    restart_window: float = 60.0

    def __post_init__(self) -> None:
        PoolOptions.__post_init__(self)  # zero-argument super() fails in a slots dataclass
        RestartBudget(self.max_restarts, self.restart_window)  # validates both
