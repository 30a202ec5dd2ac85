"""Campaign 2: kill -9 the service at random points while it works, restart it."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

from bench.campaigns._harness import (
    SteadyProducer,
    account,
    campaign_env,
    committed_offsets,
    count_handled,
    ends_of,
    num,
    read_records,
    read_topic,
    result,
)

NAME = "crash_loop"
DESCRIPTION = (
    "SIGKILL the service at random moments while a steady stream flows and restart "
    "it at once; after each kill no committed offset is ahead of an unhandled event; "
    "in the end every event is handled at least once, in order, and fully committed."
)
ORDER = 2
TIMEOUT_S = 600


async def run(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    kills = 3 if quick else 10
    rate = 1_000 if quick else 2_000
    partitions, aggregates = 8, 500
    work = (0.3, 1.0) if quick else (0.5, 4.0)  # seconds of work before a kill
    rng = random.Random(2)
    violations: list[str] = []
    downtime: list[float] = []
    handled_at_kill: list[int] = []
    async with campaign_env(NAME) as env:
        topic = await env.topic(partitions)
        svc = env.service(topic, latency_ms=2.0)
        producer = SteadyProducer(
            env.bootstrap, topic, partitions=partitions, aggregates=aggregates
        )
        stop = asyncio.Event()
        await svc.start()
        produce = asyncio.ensure_future(producer.run(rate, seconds=600, stop=stop))
        try:
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(*work))
                svc.kill(signal.SIGKILL)
                killed_at = time.monotonic()
                records = read_records(svc.record)
                handled_at_kill.append(count_handled(svc.record))
                handled = {(r.partition, r.offset) for r in records}
                committed = await committed_offsets(env.bootstrap, svc.group, topic, partitions)
                for p, c in committed.items():
                    ahead = [o for o in range(c or 0) if (p, o) not in handled]
                    if ahead:
                        violations.append(
                            f"kill {len(downtime) + 1}: partition {p} committed {c} "
                            f"but {len(ahead)} offsets below it unhandled (first {ahead[0]})"
                        )
                await svc.start(timeout=60)
                downtime.append(time.monotonic() - killed_at)
            await asyncio.sleep(rng.uniform(*work))
        finally:
            stop.set()
            stats = await produce
        truth = await read_topic(env.bootstrap, topic)
        caught_up = await env.wait_handled(
            svc.record, {(r.partition, r.offset) for r in truth}, timeout=120
        )
        metrics = svc.metrics()
        rc = await svc.stop()
        records = read_records(svc.record)
        acc = account(truth, records)
        ends = ends_of(truth, partitions)
        committed = await committed_offsets(env.bootstrap, svc.group, topic, partitions)
    failures = list(violations)
    if acc.lost or acc.reordered or acc.overlapped or acc.unexpected:
        failures.append(f"accounting: {acc.as_dict()}")
    if committed != ends:
        failures.append(f"final committed {committed} != ends {ends}")
    if rc != 0:
        failures.append(f"last service exit code {rc}")
    if len(downtime) != kills:
        failures.append(f"{len(downtime)} of {kills} kill/restart cycles done")
    return result(
        NAME,
        tried=f"kill -9 the service {kills} times at random points under load, restart each time",
        amount=(
            f"{kills} kills, {num(len(truth))} events at {num(stats.rate)}/s, "
            f"{acc.processes} processes"
        ),
        accounting=acc,
        passed=not failures,
        seconds=time.monotonic() - started,
        failures=failures,
        details={
            "target_rate_per_s": rate,
            "produced": stats.as_dict(),
            "kills": kills,
            "commit_ahead_violations": len(violations),
            "redelivered_events": acc.duplicated,
            "redelivered_per_kill": round(acc.duplicated / kills, 1) if kills else 0,
            "restart_to_assigned_s": {
                "mean": round(sum(downtime) / len(downtime), 2) if downtime else 0,
                "max": round(max(downtime, default=0), 2),
            },
            "handled_lines_at_each_kill": handled_at_kill,
            "catch_up_after_production_s": round(caught_up, 2),
            "last_process_redeliveries_metric": metrics.get(
                "kafka_eventbus_consumer_redeliveries_total", 0
            ),
            "partitions": partitions,
            "aggregates": aggregates,
            "handler_latency_ms": 2.0,
            "exit_code": rc,
            "notes": [
                (
                    "Redelivered events are those handled again after a restart: the "
                    "events finished by the killed process after its last commit. A new "
                    "process cannot tell them from first deliveries, so the consumer's "
                    "redeliveries metric (per process) does not count them; the figure "
                    "here comes from the handler's records."
                ),
            ],
        },
    )
