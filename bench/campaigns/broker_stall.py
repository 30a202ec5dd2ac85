"""Campaign 3: SIGSTOP the broker, SIGCONT it; the service recovers by itself."""

from __future__ import annotations

import asyncio
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
    wait_for,
)

NAME = "broker_stall"
DESCRIPTION = (
    "Freeze the broker process (SIGSTOP) while the service consumes a steady "
    "stream, then continue it (SIGCONT); the same service process recovers, "
    "catches up and commits everything, with no restart."
)
ORDER = 3
TIMEOUT_S = 600


async def _lag(svc: Any) -> int | None:
    try:
        async with svc.client(timeout=3.0) as client:
            status = await client.status()
    except Exception:
        return None
    if not status.partitions:
        return None
    return int(sum(p.lag for p in status.partitions if p.HasField("lag")))


async def run(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    stall = 2.0 if quick else 10.0
    before, after = (1.5, 2.0) if quick else (5.0, 10.0)
    rate = 1_000 if quick else 2_000
    partitions, aggregates = 8, 500
    async with campaign_env(NAME) as env:
        topic = await env.topic(partitions)
        svc = env.service(topic, latency_ms=1.0)
        await svc.start()
        pid = svc.proc.pid if svc.proc else -1
        producer = SteadyProducer(
            env.bootstrap, topic, partitions=partitions, aggregates=aggregates
        )
        stop = asyncio.Event()
        produce = asyncio.ensure_future(producer.run(rate, seconds=600, stop=stop))
        try:
            await asyncio.sleep(before)
            stalled_ns = time.monotonic_ns()
            env.broker.suspend()
            try:
                await asyncio.sleep(stall)
            finally:
                env.broker.resume()
            resumed_ns = time.monotonic_ns()
            await asyncio.sleep(after)
        finally:
            stop.set()
            stats = await produce
        alive_after = svc.running
        truth = await read_topic(env.bootstrap, topic)
        caught_up = await env.wait_handled(
            svc.record, {(r.partition, r.offset) for r in truth}, timeout=120
        )
        lag_zero_s = await wait_for(lambda: _lag_is_zero(svc), 60, "lag back to 0", 0.2)
        metrics = svc.metrics()
        rc = await svc.stop()
        records = read_records(svc.record)
        acc = account(truth, records)
        ends = ends_of(truth, partitions)
        committed = await committed_offsets(env.bootstrap, svc.group, topic, partitions)
    # The backlog of the stall: everything sent before the broker came back.
    backlog = [r for r in records if r.sent_ns < resumed_ns]
    caught_up_ns = max((r.end_ns for r in backlog), default=resumed_ns)
    catch_up_s = max(0.0, (caught_up_ns - resumed_ns) / 1e9)
    # Latency of what was sent after the backlog was cleared: back to normal?
    steady = [(r.end_ns - r.sent_ns) / 1e6 for r in records if r.sent_ns > caught_up_ns]
    early = [(r.end_ns - r.sent_ns) / 1e6 for r in records if r.sent_ns < stalled_ns - 10**9]
    pids = {r.pid for r in records}
    failures = []
    if acc.lost or acc.reordered or acc.overlapped or acc.unexpected:
        failures.append(f"accounting: {acc.as_dict()}")
    if not alive_after or pids != {pid}:
        failures.append(f"the service did not survive by itself (pids {sorted(pids)}, {pid})")
    if committed != ends:
        failures.append(f"committed {committed} != ends {ends}")
    if rc != 0:
        failures.append(f"service exit code {rc}")
    return result(
        NAME,
        tried=f"SIGSTOP the broker for {stall:g} s under load, then SIGCONT",
        amount=(
            f"{stall:g} s stall, {num(len(truth))} events at {num(stats.rate)}/s; "
            f"caught up {catch_up_s:.1f} s after SIGCONT"
        ),
        accounting=acc,
        passed=not failures,
        seconds=time.monotonic() - started,
        failures=failures,
        details={
            "stall_s": stall,
            "target_rate_per_s": rate,
            "produced": stats.as_dict(),
            "same_process": pids == {pid},
            "catch_up_after_sigcont_s": round(catch_up_s, 2),
            "backlog_events": len(backlog),
            "latency_ms_before_stall": {
                "p50": round(percentile(early, 0.5), 1),
                "p99": round(percentile(early, 0.99), 1),
            },
            "latency_ms_after_catch_up": {
                "p50": round(percentile(steady, 0.5), 1),
                "p99": round(percentile(steady, 0.99), 1),
            },
            "all_handled_after_production_s": round(caught_up, 2),
            "lag_zero_after_s": round(lag_zero_s, 2),
            "redeliveries_metric": metrics.get("kafka_eventbus_consumer_redeliveries_total", 0),
            "partitions": partitions,
            "aggregates": aggregates,
            "exit_code": rc,
        },
    )


async def _lag_is_zero(svc: Any) -> bool:
    return await _lag(svc) == 0
