"""The campaigns' handler: records every handled event (and every failed attempt).

Runs inside ``python -m server`` (``--handler bench.campaigns._handler:handle``),
configured by the environment of that process:

- ``RECORD_FILE`` (required): one line per event handled, ``H,pid,partition,
  offset,aggregate_id,seq,sent_ns,start_ns,end_ns``, and one per failed
  attempt, ``F,pid,partition,offset,aggregate_id,seq,attempt,reason,at_ns``
  (``at_ns``: ``time.monotonic_ns()``, the pool's clock). Each
  line is one ``os.write`` on an ``O_APPEND`` descriptor: a kill -9 loses
  nothing already reported handled and lines of several processes never
  interleave.
- ``HANDLER_LATENCY_MS`` (default 0): simulated I/O per event.

:func:`count` is the throughput benches' handler (``bench/service_bench.py``):
next to nothing per event (a counter, and the simulated I/O), no record line.
It appends ``first <ns>`` when the process handles its first event and
``last <ns> <count>`` when it has handled ``BENCH_TARGET`` of them to
``BENCH_MARKS`` (``time.monotonic_ns()``): two writes per run. With
``BENCH_TARGET_FILE`` the target is read from that file at the first event
instead (``bench/scaling_bench.py``: a replica's share of the backlog is known
only once the group has assigned its partitions).

The payload (``{"seq": n, "t": monotonic_ns, ...}``) may carry failure markers:

- ``"fail": "always"`` - raises on every attempt (retried, then dead-lettered
  ``retries-exhausted``);
- ``"fail": "non-retryable"`` - raises :class:`pool.NonRetryableError`;
- ``"fail_times": N`` - raises on the first N attempts of this process, then
  succeeds (the demo handler has no such marker).
"""

from __future__ import annotations

import asyncio
import os
import time

from pool import Message, NonRetryableError

__all__ = ["CampaignHandlerError", "count", "handle"]

_fd: int | None = None
_latency = float(os.environ.get("HANDLER_LATENCY_MS", "0")) / 1000.0
#: Failed attempts per (topic, partition, offset) in this process.
_attempts: dict[tuple[str, int, int], int] = {}


class CampaignHandlerError(RuntimeError):
    """A simulated, retriable failure."""


def _write(line: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line.encode())


def _fail(message: Message, seq: object, reason: str) -> int:
    key = (message.topic, message.partition, message.offset)
    attempt = _attempts.get(key, 0) + 1
    _attempts[key] = attempt
    _write(
        f"F,{os.getpid()},{message.partition},{message.offset},{message.aggregate_id},"
        f"{seq},{attempt},{reason},{time.monotonic_ns()}\n"
    )
    return attempt


async def handle(message: Message) -> None:
    start = time.monotonic_ns()
    envelope = message.envelope or {}
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        payload = {}
    seq = payload.get("seq", -1)
    if _latency:
        await asyncio.sleep(_latency)
    fail = payload.get("fail")
    if fail == "always":
        attempt = _fail(message, seq, "always")
        raise CampaignHandlerError(f"permanent failure {message.aggregate_id}:{seq} #{attempt}")
    if fail == "non-retryable":
        _fail(message, seq, "non-retryable")
        raise NonRetryableError(f"rejected {message.aggregate_id}:{seq}")
    fail_times = payload.get("fail_times")
    if isinstance(fail_times, int) and fail_times > 0:
        done = _attempts.get((message.topic, message.partition, message.offset), 0)
        if done < fail_times:
            attempt = _fail(message, seq, "transient")
            raise CampaignHandlerError(
                f"transient failure {message.aggregate_id}:{seq} #{attempt}/{fail_times}"
            )
        _attempts.pop((message.topic, message.partition, message.offset), None)
    _write(
        f"H,{os.getpid()},{message.partition},{message.offset},{message.aggregate_id},{seq},"
        f"{payload.get('t', 0)},{start},{time.monotonic_ns()}\n"
    )


_counted = 0
_target = int(os.environ.get("BENCH_TARGET", "0"))
_target_file = os.environ.get("BENCH_TARGET_FILE")


def _mark(text: str) -> None:
    fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def _read_target(path: str) -> int:
    with open(path) as fh:
        return int(fh.read())


async def count(message: object) -> None:
    """Count the event (after ``HANDLER_LATENCY_MS`` of simulated I/O); see the
    module docstring. ``message`` is not looked at: the plain loop of the bench
    passes the decoded value."""
    global _counted, _target
    if _latency:
        await asyncio.sleep(_latency)
    _counted += 1
    if _counted == 1:
        if _target_file:
            _target = _read_target(_target_file)
        _mark(f"first {time.monotonic_ns()}")
    if _counted == _target:
        _mark(f"last {time.monotonic_ns()} {_counted}")
