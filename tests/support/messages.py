"""Building :class:`pool.Message` values for tests."""

from __future__ import annotations

from pool import Message


def msg(aggregate_id: str, offset: int, partition: int = 0, value: bytes = b"") -> Message:
    """A message of topic ``t`` keyed by its aggregate ID, without headers."""
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
