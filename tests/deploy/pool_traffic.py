"""A small process that runs both real pools under traffic and serves /metrics.

Used by the Prometheus integration test as a scrape target that depends only
on ``pool``: a :class:`pool.PoolSwitch` in ACTOR mode at 50 % rollout (so both
pools get traffic), each pool with :class:`pool.PrometheusPoolMetrics`, an async
handler that takes 0.2-2 ms, and a few poison aggregates routed to the actor
pool that always raise (restarts, retries, dead letters). ``--per-executor``
exports the pools' metrics per executor (``actor_id``/``worker_id``), as
``metrics.perExecutor`` does in the service.

Run: ``python -m tests.deploy.pool_traffic --port N [--rate 400] [--per-executor]``. Prints
``ready <port>`` on stdout once /metrics is served; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time

from prometheus_client import CollectorRegistry, start_http_server

from pool import (
    ActorPool,
    ActorPoolOptions,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    PrometheusPoolMetrics,
    QueueFullError,
    RetryPolicy,
    rollout_bucket,
)
from server._logging import configure_logging

POOL_SIZE = 8
ROLLOUT = 50.0


def poison_ids(count: int) -> list[str]:
    """Aggregate IDs whose rollout bucket sends them to the actor pool at ``ROLLOUT``."""
    out: list[str] = []
    n = 0
    while len(out) < count:
        candidate = f"poison-{n}"
        if rollout_bucket(candidate) < ROLLOUT * 100:
            out.append(candidate)
        n += 1
    return out


async def run(port: int, rate: float, per_executor: bool) -> None:
    registry = CollectorRegistry()
    keyed_metrics = PrometheusPoolMetrics("keyed", POOL_SIZE, registry, per_executor=per_executor)
    actor_metrics = PrometheusPoolMetrics("actor", POOL_SIZE, registry, per_executor=per_executor)
    poison = set(poison_ids(2))

    async def handler(message: Message) -> None:
        if message.aggregate_id in poison:
            raise RuntimeError(f"poison event {message.offset}")
        await asyncio.sleep(random.uniform(0.0002, 0.002))

    retry = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.01)
    keyed = KeyedWorkerPool(
        handler, PoolOptions(size=POOL_SIZE, capacity=100, retry=retry), metrics=keyed_metrics
    )
    actor = ActorPool(
        handler,
        ActorPoolOptions(
            size=POOL_SIZE, capacity=100, max_restarts=3, restart_window=60.0, retry=retry
        ),
        metrics=actor_metrics,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        async with PoolSwitch(keyed, actor, mode=PoolMode.ACTOR, rollout_percent=ROLLOUT) as sw:
            print(f"ready {port}", flush=True)
            ids = [f"order-{i}" for i in range(200)] + sorted(poison)
            offset = 0
            interval = 1.0 / rate
            next_at = time.monotonic()
            while not stop.is_set():
                # Poison events are rare: one in a hundred.
                agg = random.choice(ids[:-2]) if offset % 100 else random.choice(ids[-2:])
                # Open loop: an event for a full executor is skipped, not
                # waited for, so one slow (poisoned) actor does not throttle
                # the traffic of all the others.
                with contextlib.suppress(QueueFullError):
                    sw.submit_nowait(
                        Message(
                            topic="demo",
                            partition=offset % 4,
                            offset=offset,
                            key=agg.encode(),
                            value=b"{}",
                            headers=(),
                            aggregate_id=agg,
                            timestamp_ms=int(time.time() * 1000),
                        )
                    )
                offset += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            await sw.close(5.0)
    finally:
        server.shutdown()
        thread.join(5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--per-executor", action="store_true", help="metrics per executor")
    args = parser.parse_args(argv)
    configure_logging("warning", json=True)
    asyncio.run(run(args.port, args.rate, args.per_executor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
