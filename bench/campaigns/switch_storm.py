"""Campaign 1: mode switches and rollout changes at random moments under load."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench.campaigns._harness import (
    SteadyProducer,
    account,
    campaign_env,
    committed_offsets,
    ends_of,
    num,
    percentile,
    read_records,
    read_topic,
    result,
)

NAME = "switch_storm"
DESCRIPTION = (
    "SetPoolMode / SetRollout over gRPC at random moments while a steady stream "
    "flows; per-aggregate offset order, no loss, no duplicate, full commit."
)
ORDER = 1
TIMEOUT_S = 600

ROLLOUTS = (0.0, 10.0, 25.0, 50.0, 75.0, 100.0)


async def run(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    switches = 20 if quick else 200
    rate = 2_000 if quick else 10_000
    partitions, aggregates = 8, 1_000
    # The switches are spread over the production window: mean gap 2x this.
    gap = 0.05 if quick else 0.1
    rng = random.Random(6)
    async with campaign_env(NAME) as env:
        topic = await env.topic(partitions)
        svc = env.service(topic, mode="keyed", latency_ms=1.0)
        await svc.start()
        producer = SteadyProducer(
            env.bootstrap, topic, partitions=partitions, aggregates=aggregates
        )
        stop = asyncio.Event()
        produce = asyncio.ensure_future(producer.run(rate, seconds=600, stop=stop))
        took: list[float] = []
        waited = pending = 0
        kinds = {"mode": 0, "rollout": 0}
        try:
            await asyncio.sleep(0.5)  # the stream is flowing before the first switch
            async with svc.client(timeout=30) as client:
                mode = "keyed"
                for _ in range(switches):
                    await asyncio.sleep(rng.uniform(0, 2 * gap))
                    if rng.random() < 0.5:
                        mode = "actor" if mode == "keyed" else "keyed"
                        outcome = (await client.set_mode(mode)).result
                        kinds["mode"] += 1
                    else:
                        outcome = (await client.set_rollout(rng.choice(ROLLOUTS))).result
                        kinds["rollout"] += 1
                    took.append(outcome.took.ToTimedelta().total_seconds())
                    waited += outcome.waited_aggregates
                    pending += outcome.pending_aggregates
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            stats = await produce
        truth = await read_topic(env.bootstrap, topic)
        keys = {(r.partition, r.offset) for r in truth}
        caught_up = await env.wait_handled(svc.record, keys, timeout=120)
        rc = await svc.stop()
        records = read_records(svc.record)
        acc = account(truth, records)
        ends = ends_of(truth, partitions)
        committed = await committed_offsets(env.bootstrap, svc.group, topic, partitions)
    first = min(r.sent_ns for r in records) if records else 0
    last = max(r.end_ns for r in records) if records else 0
    latencies = [(r.end_ns - r.sent_ns) / 1e6 for r in records if r.sent_ns]
    failures = []
    if not acc.clean:
        failures.append(f"accounting: {acc.as_dict()}")
    if acc.duplicated:
        failures.append(f"{acc.duplicated} events handled twice without a crash")
    if committed != ends:
        failures.append(f"committed {committed} != ends {ends}")
    if rc != 0:
        failures.append(f"service exit code {rc}")
    if len(took) != switches:
        failures.append(f"{len(took)} of {switches} switches done")
    handled_rate = len(records) / ((last - first) / 1e9) if last > first else 0.0
    return result(
        NAME,
        tried=f"{switches} mode switches / rollout changes at random moments under load",
        amount=(
            f"{switches} switches ({kinds['mode']} mode, {kinds['rollout']} rollout), "
            f"{num(len(truth))} events at {num(stats.rate)}/s (target {num(rate)}/s)"
        ),
        accounting=acc,
        passed=not failures,
        seconds=time.monotonic() - started,
        failures=failures,
        details={
            "target_rate_per_s": rate,
            "produced": stats.as_dict(),
            "handled_rate_per_s": round(handled_rate),
            "catch_up_after_production_s": round(caught_up, 2),
            "switches": {
                "mode": kinds["mode"],
                "rollout": kinds["rollout"],
                "took_ms_p50": round(percentile(took, 0.5) * 1000, 2),
                "took_ms_p99": round(percentile(took, 0.99) * 1000, 2),
                "took_ms_max": round(max(took, default=0) * 1000, 2),
                "waited_aggregates_total": waited,
                "pending_aggregates_total": pending,
            },
            "latency_ms": {
                "p50": round(percentile(latencies, 0.5), 1),
                "p99": round(percentile(latencies, 0.99), 1),
                "max": round(max(latencies, default=0), 1),
            },
            "partitions": partitions,
            "aggregates": aggregates,
            "handler_latency_ms": 1.0,
            "exit_code": rc,
            "notes": [
                (
                    "Each switch is a real gRPC call (SetPoolMode toggles KEYED/ACTOR, "
                    "SetRollout picks one of 0/10/25/50/75/100 %), at uniformly random "
                    "gaps while the producer keeps its rate. Order is judged per aggregate "
                    "from the handler's records (first handling of each offset in offset "
                    "order; never two events of one aggregate at once)."
                ),
            ],
        },
    )
