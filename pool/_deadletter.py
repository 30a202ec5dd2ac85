"""Dead-letter records: what could not be handled, and why."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from enum import StrEnum

from pool._message import Message


class DeadLetterReason(StrEnum):
    """Why an event became a dead letter. Values are stable (logs, headers, metrics)."""

    RETRIES_EXHAUSTED = "retries-exhausted"
    NON_RETRYABLE = "non-retryable"
    RESTART_BUDGET_EXHAUSTED = "restart-budget-exhausted"
    HANDLER_TIMEOUT = "handler-timeout"
    MISSING_AGGREGATE_ID = "missing-aggregate-id"
    INVALID_AGGREGATE_ID = "invalid-aggregate-id"
    MALFORMED_ENVELOPE = "malformed-envelope"
    OVERSIZED_VALUE = "oversized-value"
    INTERNAL_ERROR = "internal-error"


def format_exception(error: BaseException) -> str:
    """``traceback.format_exception`` without the ``^^^^`` position markers.

    The markers cost most of the formatting (Python 3.11 parses each frame's
    source line for them): 39 µs against 17 µs for a three-frame traceback,
    paid for every dead letter. Chained exceptions and groups are kept.
    """
    root = traceback.TracebackException.from_exception(error)
    todo, seen = [root], set()
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        for frame in te.stack:
            frame.colno = frame.end_colno = None
        todo.extend(t for t in (te.__cause__, te.__context__) if t is not None)
        todo.extend(te.exceptions or ())
    return "".join(root.format())


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that will not be handled again without an operator's redrive.

    ``mode`` is the pool that gave up (``"keyed"``/``"actor"``), or
    ``"intake"`` when the consumer rejected the event before any pool saw it;
    ``executor`` is then ``-1``.
    """

    message: Message
    reason: DeadLetterReason
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    mode: str
    executor: int
    time: float  # wall clock, seconds since the epoch
    id: str = field(default="")

    @property
    def aggregate_id(self) -> str:
        return self.message.aggregate_id

    @classmethod
    def from_exception(
        cls,
        message: Message,
        reason: DeadLetterReason,
        error: BaseException | None,
        *,
        attempts: int,
        mode: str,
        executor: int,
        time: float,
    ) -> DeadLetter:
        if error is None:
            error_type, error_message, tb = "", "", ""
        else:
            error_type = type(error).__qualname__
            error_message = str(error)
            tb = format_exception(error)
        return cls(
            message=message,
            reason=reason,
            error_type=error_type,
            error_message=error_message,
            traceback=tb,
            attempts=attempts,
            mode=mode,
            executor=executor,
            time=time,
        )
