"""End-to-end throughput and latency through the embedded broker.

    .venv/bin/python bench/e2e_bench.py [--events 100000] [--partitions 8]
        [--aggregates 1000] [--rate 10000] [--duration 5]
        [--json bench/results/e2e_bench.json] [--quick] [--loop uvloop|asyncio]

Four consumers of the same topic and partitions, each in its own consumer
group reading from the start:

- ``a-plain-await``: the loop most aiokafka users write: ``getmany``, then for
  each record decode and ``await handler(message)`` in turn;
- ``b-partition-wait``: the Go original's design: partitions run
  concurrently, but each waits for its event's completion through the pool
  (``await switch.submit(...)`` then ``await completion``) before the next;
- ``c-keyed`` / ``d-actor``: this service's consumer (``EventConsumer``:
  dispatch without waiting, offset tracking, commits) over ``PoolSwitch`` in
  KEYED / ACTOR mode, with the Prometheus pool metrics the service runs with.

Each with a no-op handler and one that awaits 1 ms.

Throughput: a backlog of ``--events`` events is produced first; the rate is
events/s from the first handled event to the last (group join excluded).
Slow combinations handle a capped share of the backlog (see ``events`` in the
output). Latency: a separate producer process sends ``--rate`` events/s for
``--duration`` s while the consumer runs; latency is handler time minus the
producer's wall-clock stamp in the payload (same machine), first second
skipped. Combinations that cannot sustain the rate are marked as such.

The process tunes the cyclic GC as ``pool-server`` does and runs on its event
loop (uvloop; ``--loop asyncio`` for the standard one).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from pool import (
    ActorPool,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolSwitch,
    PrometheusPoolMetrics,
)
from server.__main__ import run_loop
from server._broker import EmbeddedBroker
from server._consumer import ConsumerOptions, EventConsumer
from server._intake import Decoder

SCENARIOS = ("a-plain-await", "b-partition-wait", "c-keyed", "d-actor")
HANDLERS = ("noop", "sleep-1ms")
#: Share of the backlog the slow combinations handle (they would take minutes).
CAPS = {("a-plain-await", "sleep-1ms"): 2_000, ("b-partition-wait", "sleep-1ms"): 10_000}


def envelope(aggregate_id: str, seq: int, stamp: float) -> bytes:
    return json.dumps(
        {
            "event_id": f"{aggregate_id}:{seq}",
            "aggregate_id": aggregate_id,
            "event_type": "BenchEvent",
            "event_version": 1,
            "timestamp": "2026-01-01T00:00:00Z",
            "payload": {"seq": seq, "t": stamp},
        },
        separators=(",", ":"),
    ).encode()


async def produce_backlog(bootstrap: str, topic: str, events: int, aggregates: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5,
        max_batch_size=512 * 1024,
    )  # fmt: skip
    await producer.start()
    try:
        pending = []
        for i in range(events):
            agg = f"agg-{i % aggregates}"
            pending.append(
                await producer.send(topic, envelope(agg, i // aggregates, 0.0), key=agg.encode())
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _steady_producer(bootstrap: str, topic: str, rate: float, duration: float, aggs: int) -> None:
    """Runs in a child process: ``rate`` events/s for ``duration`` s, stamped at send."""

    async def run() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=1
        )
        await producer.start()
        try:
            start = time.monotonic()
            sent = 0
            total = int(rate * duration)
            while sent < total:
                due = min(total, int((time.monotonic() - start) * rate))
                while sent < due:
                    agg = f"agg-{sent % aggs}"
                    await producer.send(
                        topic, envelope(agg, sent // aggs, time.time()), key=agg.encode()
                    )
                    sent += 1
                await asyncio.sleep(0.001)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


class Sink:
    """Counts handled events; records latency from the payload stamp."""

    def __init__(self, target: int, skip_before: float = 0.0) -> None:
        self.target = target
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self.latencies: list[float] = []
        self.skip_before = skip_before
        self.done = asyncio.Event()

    def seen(self, message: Message) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.count += 1
        self.last = now
        envelope = message.envelope
        stamp = envelope["payload"]["t"] if envelope else 0.0
        if stamp:
            wall = time.time()
            if stamp >= self.skip_before:
                self.latencies.append(wall - stamp)
        if self.count >= self.target:
            self.done.set()


def make_handler(kind: str, sink: Sink) -> Callable[[Message], Awaitable[None]]:
    if kind == "noop":

        async def noop(message: Message) -> None:
            sink.seen(message)

        return noop

    async def sleepy(message: Message) -> None:
        await asyncio.sleep(0.001)
        sink.seen(message)

    return sleepy


class NoDeadLetters:
    async def publish(self, dead: Any) -> None:
        raise RuntimeError(f"unexpected dead letter: {dead.reason}")


def _switch(handler: Callable[[Message], Awaitable[None]], mode: PoolMode) -> PoolSwitch:
    registry = CollectorRegistry()
    keyed = KeyedWorkerPool(handler, metrics=PrometheusPoolMetrics("keyed", 256, registry))
    actor = ActorPool(handler, metrics=PrometheusPoolMetrics("actor", 256, registry))
    return PoolSwitch(keyed, actor, mode=mode)


async def _raw_consumer(bootstrap: str, topic: str, group: str) -> Any:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500,
        fetch_max_wait_ms=20,  # as EventConsumer: the embedded broker holds a fetch this long
    )  # fmt: skip
    await consumer.start()
    return consumer


async def run_scenario(
    scenario: str, handler_kind: str, bootstrap: str, topic: str, group: str, sink: Sink,
    timeout: float,
) -> None:  # fmt: skip
    """Consume until ``sink`` saw its target (or ``timeout``)."""
    handler = make_handler(handler_kind, sink)
    decoder = Decoder()
    if scenario in ("c-keyed", "d-actor"):
        mode = PoolMode.KEYED if scenario == "c-keyed" else PoolMode.ACTOR
        switch = _switch(handler, mode)
        options = ConsumerOptions(
            bootstrap_servers=bootstrap, group_id=group, topics=(topic,),
            session_timeout_ms=2000, heartbeat_interval_ms=500, max_records=2000,
            max_in_flight=20_000,
        )  # fmt: skip
        consumer = EventConsumer(
            options, decoder=decoder, dispatcher=switch, dead_letters=NoDeadLetters()
        )
        async with switch:
            await consumer.start()
            try:
                await asyncio.wait_for(sink.done.wait(), timeout)
            finally:
                await consumer.shutdown(timeout=5)
        return
    consumer = await _raw_consumer(bootstrap, topic, group)
    try:
        if scenario == "a-plain-await":
            await asyncio.wait_for(_plain_loop(consumer, decoder, handler, sink), timeout)
        else:
            switch = _switch(handler, PoolMode.KEYED)
            async with switch:
                await asyncio.wait_for(
                    _partition_wait_loop(consumer, decoder, switch, sink), timeout
                )
    finally:
        await consumer.stop()


async def _plain_loop(
    consumer: Any, decoder: Decoder, handler: Callable[[Message], Awaitable[None]], sink: Sink
) -> None:
    last_commit = time.monotonic()
    while not sink.done.is_set():
        batches = await consumer.getmany(timeout_ms=100, max_records=500)
        for records in batches.values():
            for r in records:
                item = decoder.decode(
                    r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp
                )
                if isinstance(item, Message):
                    await handler(item)
        if time.monotonic() - last_commit >= 1.0:
            await consumer.commit()
            last_commit = time.monotonic()


async def _partition_wait_loop(
    consumer: Any, decoder: Decoder, switch: PoolSwitch, sink: Sink
) -> None:
    """One task per partition, each submitting its next event only after the
    previous one completed; a partition with a long local queue is paused."""
    queues: dict[Any, asyncio.Queue[Any]] = {}
    tasks: list[asyncio.Task[None]] = []

    async def partition_worker(tp: Any, queue: asyncio.Queue[Any]) -> None:
        while True:
            r = await queue.get()
            if queue.qsize() < 200 and tp in consumer.paused():
                consumer.resume(tp)
            item = decoder.decode(
                r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp
            )
            if isinstance(item, Message):
                completion = await switch.submit(item)
                await completion  # the original waited for each event

    try:
        while not sink.done.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            for tp, records in batches.items():
                queue = queues.get(tp)
                if queue is None:
                    queue = queues[tp] = asyncio.Queue()
                    tasks.append(asyncio.ensure_future(partition_worker(tp, queue)))
                for r in records:
                    queue.put_nowait(r)
                if queue.qsize() > 1000:
                    consumer.pause(tp)  # bounded like the original's channel
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        backlog = "bench-backlog"
        await broker.create_topics({backlog: args.partitions})
        t0 = time.monotonic()
        await produce_backlog(bootstrap, backlog, args.events, args.aggregates)
        print(f"produced {args.events} events in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        for handler_kind in HANDLERS:
            for scenario in SCENARIOS:
                target = min(args.events, CAPS.get((scenario, handler_kind), args.events))
                sink = Sink(target)
                group = f"tp-{scenario}-{handler_kind}"
                started = time.monotonic()
                timed_out = False
                try:
                    await run_scenario(
                        scenario, handler_kind, bootstrap, backlog, group, sink, args.timeout
                    )
                except TimeoutError:
                    timed_out = True
                span = (sink.last - sink.first) if sink.first is not None else 0.0
                rate = sink.count / span if span > 0 else 0.0
                row = {
                    "kind": "throughput",
                    "scenario": scenario,
                    "handler": handler_kind,
                    "events": sink.count,
                    "seconds": round(span, 3),
                    "events_per_s": round(rate),
                    "timed_out": timed_out,
                }
                results.append(row)
                print(
                    f"throughput {scenario:17} {handler_kind:9} {rate:>10,.0f} ev/s "
                    f"({sink.count} events, {time.monotonic() - started:.1f}s)",
                    file=sys.stderr,
                )
        # Latency at a steady rate.
        n = 0
        for handler_kind in HANDLERS:
            for scenario in SCENARIOS:
                if handler_kind == "sleep-1ms" and scenario in (
                    "a-plain-await",
                    "b-partition-wait",
                ):
                    continue  # cannot sustain the rate: latency would only grow
                n += 1
                topic = f"bench-steady-{n}"
                await broker.create_topics({topic: args.partitions})
                total = int(args.rate * args.duration)
                sink = Sink(total, skip_before=0.0)
                group = f"lat-{scenario}-{handler_kind}"
                task = asyncio.ensure_future(
                    run_scenario(
                        scenario, handler_kind, bootstrap, topic, group, sink,
                        args.duration + 30,
                    )
                )  # fmt: skip
                await _wait_assigned(bootstrap, topic, group)
                sink.skip_before = time.time() + 1.0
                proc = multiprocessing.get_context("spawn").Process(
                    target=_steady_producer,
                    args=(bootstrap, topic, args.rate, args.duration, args.aggregates),
                )
                proc.start()
                timed_out = False
                try:
                    await task
                except TimeoutError:
                    timed_out = True
                proc.join(30)
                lat = sink.latencies
                row = {
                    "kind": "latency",
                    "scenario": scenario,
                    "handler": handler_kind,
                    "rate": args.rate,
                    "events": sink.count,
                    "p50_ms": _ms(_pct(lat, 0.50)),
                    "p95_ms": _ms(_pct(lat, 0.95)),
                    "p99_ms": _ms(_pct(lat, 0.99)),
                    "max_ms": _ms(max(lat) if lat else None),
                    "mean_ms": _ms(statistics.fmean(lat) if lat else None),
                    "timed_out": timed_out,
                }
                results.append(row)
                print(
                    f"latency    {scenario:17} {handler_kind:9} p50 {row['p50_ms']} "
                    f"p95 {row['p95_ms']} p99 {row['p99_ms']} ms",
                    file=sys.stderr,
                )
    return {
        "benchmark": "e2e",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": multiprocessing.cpu_count(),
        "partitions": args.partitions,
        "aggregates": args.aggregates,
        "backlog_events": args.events,
        "results": results,
    }


async def _wait_assigned(bootstrap: str, topic: str, group: str) -> None:
    """Wait until ``group`` has a member with ``topic`` assigned (group joined)."""
    # The scenario's consumer joins on its own; give it the join delay of the
    # broker (half the session timeout) plus margin, polling the group state.
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                groups = await admin.describe_consumer_groups([group])
                state = groups[0].state if groups else ""
                if state == "Stable":
                    return
            except Exception:
                await asyncio.sleep(2.0)
                return
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def table(report: dict[str, Any]) -> str:
    rows = report["results"]
    out = [
        "| scenario | handler | events/s | events |",
        "|---|---|---:|---:|",
    ]
    out += [
        f"| {r['scenario']} | {r['handler']} | {r['events_per_s']:,} | {r['events']:,} |"
        for r in rows
        if r["kind"] == "throughput"
    ]
    out += [
        "",
        "| scenario | handler | rate | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r['scenario']} | {r['handler']} | {r['rate']:,.0f} | {r['p50_ms']} | "
        f"{r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        for r in rows
        if r["kind"] == "latency"
    ]
    tp = {
        (r["scenario"], r["handler"]): r["events_per_s"] for r in rows if r["kind"] == "throughput"
    }
    lat = {(r["scenario"], r["handler"]): r["p99_ms"] for r in rows if r["kind"] == "latency"}
    out.append("")
    for s in ("c-keyed", "d-actor"):
        noop = tp.get((s, "noop"), 0)
        out.append(f"target {s} no-op >= 100,000 events/s: {noop:,} -> {_ok(noop >= 100_000)}")
        base = tp.get(("a-plain-await", "sleep-1ms"), 0) or 1
        one = tp.get((s, "sleep-1ms"), 0)
        out.append(f"target {s} 1 ms >= 20x (a): {one / base:.1f}x -> {_ok(one >= 20 * base)}")
        p99 = lat.get((s, "noop"))
        out.append(
            f"target {s} P99 <= 50 ms at {report['results'][-1].get('rate', 0):,.0f}/s: "
            f"{p99} ms -> {_ok(p99 is not None and p99 <= 50)}"
        )
    return "\n".join(out)


def _ok(flag: bool) -> str:
    return "met" if flag else "NOT met"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--aggregates", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=120.0, help="per throughput run")
    p.add_argument("--json", default="bench/results/e2e_bench.json")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop; uvloop is what pool-server runs on (default)",
    )
    args = p.parse_args()
    if args.quick:
        args.events, args.duration, args.rate = 5_000, 2.0, 2_000
        CAPS.update({k: min(v, 500) for k, v in CAPS.items()})
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    os.environ["POOL_EVENT_LOOP"] = args.loop
    print(f"event loop: {args.loop}", file=sys.stderr)
    report = run_loop(main_async(args))
    report["loop"] = args.loop
    text = table(report)
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
