"""Errors of the pool library: one root, attributes instead of string matching."""

from __future__ import annotations


class PoolError(Exception):
    """Root of every error raised by :mod:`pool`."""

    retriable: bool = False


class PoolClosedError(PoolError):
    """``submit`` was called after ``close()`` began."""


class QueueFullError(PoolError):
    """``submit_nowait`` found the target executor's queue full.

    Nothing was enqueued. The caller holds the message and either awaits
    ``submit`` or waits for space (backpressure: pause the source, never drop).
    """

    retriable = True

    def __init__(self, index: int, capacity: int) -> None:
        super().__init__(f"executor {index} queue is full ({capacity} events)")
        self.index = index
        self.capacity = capacity


class DrainTimeoutError(PoolError):
    """``drain(timeout)`` ran out of time with events still in flight."""

    retriable = True

    def __init__(self, remaining: int, timeout: float) -> None:
        super().__init__(f"{remaining} events still in flight after {timeout:.3f}s")
        self.remaining = remaining
        self.timeout = timeout


class NonRetryableError(Exception):
    """Raise (or subclass) from a handler to dead-letter the event at once.

    Deliberately *not* a :class:`PoolError`: handlers raise it, the pool
    catches it.
    """
