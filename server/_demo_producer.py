"""A steady producer of demo envelopes for ``pool-server --demo``.

Sends ``rate`` events per second, round-robin over ``aggregates`` aggregate
IDs (``demo-0`` ... ``demo-N``), keyed by aggregate ID so each aggregate stays
on one partition, with a per-aggregate sequence number in the payload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from server.demo import make_demo_event

log = structlog.get_logger("server.demo_producer")


class DemoProducer:
    """``start()`` / ``stop()`` (idempotent) or ``async with``."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        *,
        rate: float = 1000.0,
        aggregates: int = 1000,
        tick_s: float = 0.01,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if aggregates < 1:
            raise ValueError(f"aggregates must be >= 1, got {aggregates}")
        self.bootstrap_servers = bootstrap_servers
        self.topics = tuple(topics)
        self.rate = rate
        self.aggregates = aggregates
        self.tick_s = tick_s
        self.sent = 0
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        if self._task is not None:
            return
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id="kafka-actor-pool-demo",
            enable_idempotence=False,  # the embedded broker lacks InitProducerId
            linger_ms=5,
        )
        await self._producer.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="demo.producer")

    async def __aenter__(self) -> DemoProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        seqs = [0] * self.aggregates
        started = time.monotonic()
        index = 0
        pending: list[asyncio.Future[Any]] = []
        while True:
            due = int((time.monotonic() - started) * self.rate)
            while self.sent < due:
                agg = index % self.aggregates
                index += 1
                aggregate_id = f"demo-{agg}"
                topic = self.topics[agg % len(self.topics)]
                value = make_demo_event(aggregate_id, seqs[agg])
                seqs[agg] += 1
                pending.append(await self._producer.send(topic, value, key=aggregate_id.encode()))
                self.sent += 1
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
            await asyncio.sleep(self.tick_s)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 - the demo must never fail the shutdown
                log.warning("demo.producer_failed", error=repr(exc), sent=self.sent)
        if self._producer is not None:
            await self._producer.stop()
        log.info("demo.producer_stopped", sent=self.sent)
