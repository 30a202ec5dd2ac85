"""The event as the pool sees it: no Kafka types, only what a handler needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """One event, routed by ``aggregate_id``.

    ``topic``/``partition``/``offset`` identify where it came from (the pool
    never interprets them; the consumer uses them for offset tracking).
    ``envelope`` is the parsed JSON envelope when the value was one.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    aggregate_id: str
    timestamp_ms: int
    envelope: dict[str, Any] | None = None
