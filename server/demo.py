"""The demo handler and event builder shipped with the service.

``server.demo:handle`` is the default handler: it simulates I/O latency
(``await asyncio.sleep``) and fails at a configured rate, so the embedded run,
the benchmarks and the tests exercise retries and dead letters. Configure it
with :func:`configure` (the entry point does, from ``eventbus.demo``); until
then it reads ``EVENTBUS__DEMO__LATENCY_MS``, ``EVENTBUS__DEMO__FAILURE_RATE``
and ``EVENTBUS__DEMO__SEED`` from the environment (defaults 1 ms, 0).

Events built by :func:`make_demo_event` may ask for a failure in their
payload: ``"fail": "always"`` raises on every attempt (a poison event:
retried, then dead-lettered ``retries-exhausted``), ``"fail":
"non-retryable"`` raises :class:`pool.NonRetryableError` (dead-lettered at
once).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pool import Message, NonRetryableError

__all__ = [
    "DemoHandler",
    "DemoHandlerError",
    "configure",
    "handle",
    "make_demo_event",
    "make_demo_handler",
]


class DemoHandlerError(RuntimeError):
    """The demo handler's simulated (retriable) failure."""


class DemoHandler:
    """An async handler with simulated latency and failure rate; counts what it saw."""

    def __init__(
        self, latency_ms: float = 1.0, failure_rate: float = 0.0, seed: int | None = None
    ) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
        self.latency_s = latency_ms / 1000.0
        self.failure_rate = failure_rate
        self._random = random.Random(seed)
        self.calls = 0
        self.handled = 0
        self.failed = 0

    async def __call__(self, message: Message) -> None:
        self.calls += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        envelope = message.envelope
        if envelope is not None:
            payload = envelope.get("payload")
            fail = payload.get("fail") if isinstance(payload, dict) else None
            if fail == "always":
                self.failed += 1
                raise DemoHandlerError(f"poison event {envelope.get('event_id')!r}")
            if fail == "non-retryable":
                self.failed += 1
                raise NonRetryableError(f"rejected event {envelope.get('event_id')!r}")
        if self.failure_rate and self._random.random() < self.failure_rate:
            self.failed += 1
            raise DemoHandlerError(
                f"simulated failure (rate {self.failure_rate}) at "
                f"{message.topic}/{message.partition}/{message.offset}"
            )
        self.handled += 1


def make_demo_handler(
    latency_ms: float = 1.0, failure_rate: float = 0.0, seed: int | None = None
) -> DemoHandler:
    """A fresh demo handler (``async``): sleeps ``latency_ms``, fails at ``failure_rate``."""
    return DemoHandler(latency_ms=latency_ms, failure_rate=failure_rate, seed=seed)


_default: DemoHandler | None = None
_lock = threading.Lock()


def _from_env(env: Mapping[str, str]) -> DemoHandler:
    seed = env.get("EVENTBUS__DEMO__SEED")
    return DemoHandler(
        latency_ms=float(env.get("EVENTBUS__DEMO__LATENCY_MS", "1.0")),
        failure_rate=float(env.get("EVENTBUS__DEMO__FAILURE_RATE", "0.0")),
        seed=int(seed) if seed else None,
    )


def configure(
    source: Any = None,
    *,
    latency_ms: float | None = None,
    failure_rate: float | None = None,
    seed: int | None = None,
) -> DemoHandler:
    """Set what :func:`handle` does. ``source`` is the service ``Settings`` or its
    ``demo`` section (``latency_ms``, ``failure_rate``); keywords override it."""
    global _default
    demo = getattr(source, "demo", source)
    handler = DemoHandler(
        latency_ms=latency_ms if latency_ms is not None else getattr(demo, "latency_ms", 1.0),
        failure_rate=(
            failure_rate if failure_rate is not None else getattr(demo, "failure_rate", 0.0)
        ),
        seed=seed,
    )
    with _lock:
        _default = handler
    return handler


def default_handler() -> DemoHandler:
    """The handler behind :func:`handle` (created from the environment on first use)."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = _from_env(os.environ)
    return _default


async def handle(message: Message) -> None:
    """The service's default handler (``server.demo:handle``)."""
    handler = _default if _default is not None else default_handler()
    await handler(message)


def make_demo_event(
    aggregate_id: str,
    seq: int,
    *,
    event_type: str = "DemoEvent",
    payload: Mapping[str, Any] | None = None,
    fail: str | None = None,
    timestamp: str | None = None,
) -> bytes:
    """A valid JSON envelope for ``aggregate_id``; ``payload`` holds ``{"seq": seq, ...}``.

    ``event_id`` is ``"{aggregate_id}:{seq}"``. ``fail`` (``"always"`` or
    ``"non-retryable"``) makes the demo handler fail on it.
    """
    body: dict[str, Any] = {"seq": seq}
    if payload:
        body.update(payload)
    if fail is not None:
        body["fail"] = fail
    return json.dumps(
        {
            "event_id": f"{aggregate_id}:{seq}",
            "aggregate_id": aggregate_id,
            "event_type": event_type,
            "event_version": 1,
            "timestamp": timestamp
            or datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "payload": body,
        },
        separators=(",", ":"),
    ).encode()
