"""A handler for the process tests: appends one line per handled event to a file.

Configured by the environment of the ``python -m server`` process:
``RECORD_FILE`` (required) and ``RECORD_LATENCY_MS`` (default 0). Each line is
``pid topic partition offset aggregate_id seq start_ns end_ns`` written with
one ``os.write`` on an ``O_APPEND`` descriptor, so a kill -9 loses nothing
already reported handled and lines from several processes never interleave.
Events whose payload has ``"poison": true`` raise :class:`pool.NonRetryableError`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pool import Message, NonRetryableError

_fd: int | None = None
_latency = float(os.environ.get("RECORD_LATENCY_MS", "0")) / 1000.0


def _file() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


async def handle(message: Message) -> None:
    start = time.monotonic_ns()
    envelope = message.envelope or {}
    payload = envelope.get("payload") or {}
    if payload.get("poison"):
        raise NonRetryableError(f"poison event {message.aggregate_id}:{payload.get('seq')}")
    if _latency:
        await asyncio.sleep(_latency)
    line = (
        f"{os.getpid()} {message.topic} {message.partition} {message.offset} "
        f"{message.aggregate_id} {payload.get('seq', -1)} {start} {time.monotonic_ns()}\n"
    )
    os.write(_file(), line.encode())


@dataclass(frozen=True, slots=True)
class Record:
    pid: int
    topic: str
    partition: int
    offset: int
    aggregate_id: str
    seq: int
    start_ns: int
    end_ns: int


def read_records(path: Path) -> list[Record]:
    """Every complete line of ``path`` (a torn last line after kill -9 is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 8:
            continue
        pid, topic, partition, offset, agg, seq, start, end = parts
        out.append(
            Record(
                int(pid), topic, int(partition), int(offset), agg, int(seq), int(start), int(end)
            )
        )
    return out


class MemoryRecorder:
    """In-process no-op handler remembering ``(aggregate, seq, partition, offset)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []

    async def __call__(self, message: Message) -> None:
        payload = (message.envelope or {}).get("payload") or {}
        if payload.get("poison"):
            raise NonRetryableError("poison")
        self.events.append(
            (message.aggregate_id, payload.get("seq", -1), message.partition, message.offset)
        )
