"""In-process pool throughput, against a raw asyncio floor measured in the same run.

    .venv/bin/python bench/pool_bench.py [--events 1000000] [--aggregates 10000]
        [--executors 256] [--repeat 3] [--json bench/results/pool_bench.json]
        [--loop uvloop|asyncio]

For each handler (no-op, and one that awaits 1 ms) it runs:

- ``raw-floor``: one ``asyncio.Queue(maxsize)`` per executor and a bare worker
  loop (``await q.get(); await handler(m)``), events routed by the same FNV-1a
  router and offered with ``put_nowait`` (``await put`` only when full): the
  least any design with per-executor queues can cost;
- ``keyed`` / ``actor``: ``KeyedWorkerPool`` / ``ActorPool`` driven the way the
  Kafka consumer drives them (``dispatch_nowait``, ``await dispatch`` only when
  the queue is full; completions through a finish listener), no-op metrics;
- ``keyed+futures``: the same through ``submit_nowait``, one completion future
  per event;
- ``switch-keyed`` / ``switch-actor``: the same pools behind ``PoolSwitch`` (the
  path the Kafka consumer uses), plus ``switch-actor+prom`` with the Prometheus
  collector, to show what metrics cost.

Rates are events/s from the first submit until the last event is finished,
the best of ``--repeat`` interleaved rounds (default 3). Ratios to the raw
floor of the same run are what to compare across machines.
It also reports the memory each queued event costs (tracemalloc, blocked pool).

Every variant runs on the event loop the service runs on (uvloop; ``--loop
asyncio`` for the standard one) and, the raw floor included, under the cyclic-
GC settings the service runs with (``_tune_gc`` in ``server/__main__.py``:
``gc.freeze()`` and thresholds ``(50_000, 20, 10)``); the pre-built event list
is frozen with the start-up objects, as it is no part of the event flow. Under
the interpreter's default thresholds a young collection every 700 allocations
dominates every variant, which is neither fair to the floor nor what the
service sees.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from pool import (
    ActorPool,
    ActorPoolOptions,
    BasePool,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    PrometheusPoolMetrics,
    QueueFullError,
    Router,
)

Handler = Callable[[Message], Awaitable[None]]


async def noop(m: Message) -> None:
    return None


async def sleep_1ms(m: Message) -> None:
    await asyncio.sleep(0.001)


def make_messages(n: int, aggregates: int) -> list[Message]:
    return [
        Message("bench", i % 8, i, None, b"", (), f"aggregate-{i % aggregates}", 0)
        for i in range(n)
    ]


async def run_raw(messages: list[Message], handler: Handler, size: int, cap: int) -> float:
    router = Router(size)
    queues: list[asyncio.Queue[Message]] = [asyncio.Queue(cap) for _ in range(size)]
    remaining = len(messages)
    done = asyncio.Event()

    async def worker(q: asyncio.Queue[Message]) -> None:
        nonlocal remaining
        while True:
            m = await q.get()
            await handler(m)
            remaining -= 1
            if remaining == 0:
                done.set()

    tasks = [asyncio.create_task(worker(q)) for q in queues]
    started = time.perf_counter()
    for m in messages:
        q = queues[router(m.aggregate_id)]
        try:
            q.put_nowait(m)
        except asyncio.QueueFull:
            await q.put(m)
    await done.wait()
    elapsed = time.perf_counter() - started
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


def build_pools(
    handler: Handler, size: int, cap: int, prom: bool
) -> tuple[KeyedWorkerPool, ActorPool]:
    km = am = None
    if prom:
        registry = CollectorRegistry()
        km = PrometheusPoolMetrics("keyed", size, registry)
        am = PrometheusPoolMetrics("actor", size, registry)
    keyed = KeyedWorkerPool(handler, PoolOptions(size=size, capacity=cap), metrics=km)
    actor = ActorPool(handler, ActorPoolOptions(size=size, capacity=cap), metrics=am)
    return keyed, actor


async def run_pool(
    messages: list[Message], handler: Handler, size: int, cap: int, variant: str
) -> float:
    keyed, actor = build_pools(handler, size, cap, prom=variant.endswith("+prom"))
    target: Any
    if variant.startswith("switch"):
        mode = PoolMode.ACTOR if "actor" in variant else PoolMode.KEYED
        target = PoolSwitch(keyed, actor, mode=mode)
    else:
        target = keyed if variant.startswith("keyed") else actor
    target.start()
    if variant.endswith("+futures"):
        submit_nowait, submit = target.submit_nowait, target.submit
    else:
        submit_nowait, submit = target.dispatch_nowait, target.dispatch
    started = time.perf_counter()
    for m in messages:
        # What the Kafka consumer does: the non-blocking path, and wait only when full.
        try:
            submit_nowait(m)
        except QueueFullError:
            await submit(m)
    await target.drain()
    elapsed = time.perf_counter() - started
    await target.close()
    if isinstance(target, PoolSwitch):
        return elapsed
    await (actor if target is keyed else keyed).close()
    return elapsed


async def memory_per_queued_event(size: int, cap: int, aggregates: int) -> dict[str, float]:
    """Bytes allocated per event sitting in a queue (handler blocked)."""
    gate = asyncio.Event()

    async def blocked(m: Message) -> None:
        await gate.wait()

    n = min(size * cap // 2, 100_000)
    messages = make_messages(n, aggregates)
    out: dict[str, float] = {}

    async def measure(name: str, fill: Callable[[], Awaitable[Any]]) -> None:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        keep = await fill()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out[name] = (after - before) / n
        del keep

    async def fill_raw() -> Any:
        router = Router(size)
        queues: list[asyncio.Queue[Message]] = [asyncio.Queue(cap) for _ in range(size)]
        for m in messages:
            queues[router(m.aggregate_id)].put_nowait(m)
        return queues

    pools: list[BasePool] = []

    async def fill_pool(kind: str) -> Any:
        pool: BasePool = (
            KeyedWorkerPool(blocked, PoolOptions(size=size, capacity=cap))
            if kind == "keyed"
            else ActorPool(blocked, ActorPoolOptions(size=size, capacity=cap))
        )
        pools.append(pool)
        pool.start()
        await asyncio.sleep(0)
        return [await pool.submit(m) for m in messages]

    await measure("raw-floor", fill_raw)
    await measure("keyed", lambda: fill_pool("keyed"))
    await measure("actor", lambda: fill_pool("actor"))
    gate.set()
    for p in pools:
        await p.close()
    return out


VARIANTS = [
    "raw-floor",
    "keyed",
    "actor",
    "keyed+futures",
    "switch-keyed",
    "switch-actor",
    "switch-actor+prom",
]


def tune_gc() -> None:
    """The service's GC settings (``server/__main__.py`` ``_tune_gc``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    messages = make_messages(args.events, args.aggregates)
    tune_gc()
    results: list[dict[str, Any]] = []
    for handler_name, handler in (("noop", noop), ("sleep-1ms", sleep_1ms)):
        # Rounds interleave the variants, so a burst of load on a shared
        # machine hits all of them alike; each variant keeps its best round.
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_no in range(1, args.repeat + 1):
            for variant in VARIANTS:
                gc.collect()
                if variant == "raw-floor":
                    elapsed = await run_raw(messages, handler, args.executors, args.capacity)
                else:
                    elapsed = await run_pool(
                        messages, handler, args.executors, args.capacity, variant
                    )
                runs[variant].append(elapsed)
                print(
                    f"{handler_name:>10} {variant:>18} round {round_no}: "
                    f"{len(messages) / elapsed:>12,.0f} ev/s ({elapsed:.2f}s)",
                    flush=True,
                )
        floor = len(messages) / min(runs["raw-floor"])
        for variant in VARIANTS:
            best = min(runs[variant])
            rate = len(messages) / best
            results.append(
                {
                    "handler": handler_name,
                    "variant": variant,
                    "events": len(messages),
                    "seconds": round(best, 3),
                    "events_per_s": round(rate),
                    "ratio_to_floor": round(rate / floor, 3),
                    "rounds_s": [round(t, 3) for t in runs[variant]],
                }
            )
    memory = await memory_per_queued_event(args.executors, args.capacity, args.aggregates)
    return {"results": results, "bytes_per_queued_event": memory}


def print_table(report: dict[str, Any], targets: dict[str, Any]) -> None:
    print()
    print("| handler | variant | events/s | vs raw floor | seconds |")
    print("|---|---|---:|---:|---:|")
    for r in report["results"]:
        print(
            f"| {r['handler']} | {r['variant']} | {r['events_per_s']:,} | "
            f"{r['ratio_to_floor']:.2f} | {r['seconds']} |"
        )
    print()
    print("| memory per queued event | bytes |")
    print("|---|---:|")
    for name, b in report["bytes_per_queued_event"].items():
        print(f"| {name} | {b:.0f} |")
    print()
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


def evaluate(report: dict[str, Any]) -> dict[str, bool]:
    rows = {(r["handler"], r["variant"]): r for r in report["results"]}
    return {
        "noop: each mode >= 60% of raw floor": all(
            rows[("noop", v)]["ratio_to_floor"] >= 0.6 for v in ("keyed", "actor")
        ),
        "noop: each mode through PoolSwitch >= 60% of raw floor": all(
            rows[("noop", v)]["ratio_to_floor"] >= 0.6 for v in ("switch-keyed", "switch-actor")
        ),
        "sleep-1ms: each mode >= 100k events/s": all(
            rows[("sleep-1ms", v)]["events_per_s"] >= 100_000 for v in ("keyed", "actor")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--aggregates", type=int, default=10_000)
    parser.add_argument("--executors", type=int, default=256)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds per variant; the best one counts"
    )
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop; uvloop is what pool-server runs on (default)",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("bench/results/pool_bench.json"), help="output file"
    )
    args = parser.parse_args()
    print(
        f"pool bench: {args.events:,} events, {args.aggregates:,} aggregates, "
        f"{args.executors} executors x {args.capacity}, Python {platform.python_version()}",
        flush=True,
    )
    print(f"event loop: {args.loop}", flush=True)
    if args.loop == "uvloop":
        import uvloop

        report = uvloop.run(main_async(args))
    else:
        report = asyncio.run(main_async(args))
    targets = evaluate(report)
    report.update(
        {
            "targets": targets,
            "config": vars(args) | {"json": str(args.json)},
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
    )
    print_table(report, targets)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
