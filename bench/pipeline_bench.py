"""The consumer's per-event path without Kafka and without intake: CPU per event.

    .venv/bin/python bench/pipeline_bench.py [--events 200000] [--aggregates 10000]
        [--partitions 8] [--rounds 3] [--handler noop|1ms] [--mode keyed|actor|both]
        [--decode] [--baseline-root DIR] [--json FILE]

What ``pool-server`` does per event between aiokafka's ``getmany`` and the
commit, in one process, built as ``server/_service.py`` builds it with the
service's defaults: the real :class:`~server._consumer.EventConsumer`'s fetch
loop (``_fetch_loop``, ``_dispatch_batch``, the finish listener, the offset
trackers, the in-flight bound of 20 000), :class:`~pool.PoolSwitch` over a
:class:`~pool.KeyedWorkerPool` and an :class:`~pool.ActorPool` of 256 executors
each (queues of 1 000, the 30 s handler timeout, the Prometheus pool and
consumer metrics). Only two parts are stand-ins: aiokafka's consumer (a
``getmany`` that hands out pre-built records, up to ``max_records`` = 500 per
call over the partitions, with one yield to the loop per call, as a buffered
fetch does) and, unless ``--decode``, the intake decoder (the pre-built
``Message`` of each record: the stage another bench measures). So the figure
is dispatch + executor + handler call + finish + offset tracking + metrics:
the stages of ``docs/performance.md`` that are neither fetch nor intake.

CPU µs/event is ``time.process_time()`` from the first fetch to the last
finish, over the events; each round also commits once at the end (the
committable offsets must cover every partition). ``--baseline-root DIR``
runs the same rounds, interleaved, with the ``pool``/``server`` code of
another checkout (in a child process, so the two never share modules).

``--instructions`` counts instructions per event instead, exactly: each
child runs under valgrind (``callgrind``, needs ``valgrind`` on the PATH) with
4 000 and 12 000 events, and once more each stopping after the set-up; the
difference of the differences over 8 000 events is what the events cost.
It does not move with the load of the machine, as CPU time does (±10 % here),
and takes a few minutes. Use ``--aggregates 1000`` with it: with 10 000, the
first event of each aggregate hashes its ID, and 4 000 vs 12 000 events do
not see the same share of first events.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Records per ``getmany`` (kafka.consumer.maxPollRecords's default; ``--max-records``).
MAX_RECORDS = 500


class _Record:
    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers: tuple[tuple[str, bytes], ...] = ()
        self.timestamp = 0


class _FakeKafka:
    """What ``EventConsumer`` calls on aiokafka's consumer, over pre-built records."""

    def __init__(self, by_tp: dict[Any, list[_Record]], max_records: int) -> None:
        self._max_records = max_records
        self._left = {tp: list(reversed(recs)) for tp, recs in by_tp.items()}
        self.paused: set[Any] = set()
        self.empty = asyncio.Event()

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        await asyncio.sleep(0)  # a buffered fetch still yields to the loop
        room = self._max_records if max_records is None else min(max_records, self._max_records)
        out: dict[Any, list[_Record]] = {}
        tps = [tp for tp, left in self._left.items() if left and tp not in self.paused]
        if not tps:
            if not any(self._left.values()):
                self.empty.set()
            await asyncio.sleep(timeout_ms / 1000)
            return out
        share = max(1, room // len(tps))
        for tp in tps:
            left = self._left[tp]
            take = min(share, len(left), room)
            if take <= 0:
                break
            out[tp] = [left.pop() for _ in range(take)]
            room -= take
        return out

    def pause(self, tp: Any) -> None:
        self.paused.add(tp)

    def resume(self, tp: Any) -> None:
        self.paused.discard(tp)

    async def commit(self, offsets: dict[Any, int]) -> None:
        return None

    def highwater(self, tp: Any) -> int | None:
        return None


def _envelope(agg: str, seq: int) -> bytes:
    return json.dumps(
        {
            "event_id": f"{agg}-{seq}",
            "event_type": "bench.event",
            "event_version": 1,
            "aggregate_id": agg,
            "timestamp": "2026-01-01T00:00:00Z",
            "payload": {"seq": seq, "t": 0},
        },
        separators=(",", ":"),
    ).encode()


async def _one_round(args: argparse.Namespace) -> dict[str, float]:
    from aiokafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from pool import (
        ActorPool,
        ActorPoolOptions,
        KeyedWorkerPool,
        Message,
        PoolMode,
        PoolOptions,
        PoolSwitch,
        PrometheusPoolMetrics,
    )
    from server._consumer import ConsumerOptions, EventConsumer, _Partition
    from server._consumer_metrics import ConsumerMetrics

    latency = 0.001 if args.handler == "1ms" else 0.0
    done = asyncio.Event()
    handled = 0
    target = args.events

    async def handler(message: Message) -> None:
        nonlocal handled
        if latency:
            await asyncio.sleep(latency)
        handled += 1
        if handled == target:
            done.set()

    registry = CollectorRegistry()
    timeout = None if args.no_timeout else 30.0
    keyed = KeyedWorkerPool(
        handler,
        PoolOptions(size=256, capacity=1000, handler_timeout=timeout, log_dead_letters=False),
        metrics=None if args.no_metrics else PrometheusPoolMetrics("keyed", 256, registry=registry),
    )
    actor = ActorPool(
        handler,
        ActorPoolOptions(size=256, capacity=1000, handler_timeout=timeout, log_dead_letters=False),
        metrics=None if args.no_metrics else PrometheusPoolMetrics("actor", 256, registry=registry),
    )
    mode = PoolMode.ACTOR if args.mode == "actor" else PoolMode.KEYED
    switch = PoolSwitch(keyed, actor, mode=mode)
    switch.start()

    topic = "bench"
    tps = [TopicPartition(topic, p) for p in range(args.partitions)]
    by_tp: dict[Any, list[_Record]] = {tp: [] for tp in tps}
    messages: dict[tuple[int, int], Message] = {}
    for i in range(args.events):
        agg = f"agg-{i % args.aggregates}"
        p = (i % args.aggregates) % args.partitions
        tp = tps[p]
        offset = len(by_tp[tp])
        value = _envelope(agg, i // args.aggregates)
        by_tp[tp].append(_Record(topic, p, offset, agg.encode(), value))
        if not args.decode:
            messages[(p, offset)] = Message(
                topic, p, offset, agg.encode(), value, (), agg, 0, json.loads(value)
            )

    decoder: Any
    if args.decode:
        from server._intake import Decoder

        decoder = Decoder()
        first = by_tp[tps[0]][0]
        probe = decoder.decode(topic, 0, 0, first.key, first.value, (), 0)
        if not isinstance(probe, Message):  # the bench measures handled events only
            raise SystemExit(f"the bench's envelope does not pass intake: {probe}")
    else:

        class _Prebuilt:
            def decode(self, topic: str, partition: int, offset: int, *rest: Any) -> Message:
                return messages[(partition, offset)]

        decoder = _Prebuilt()

    class _Sink:
        async def publish(self, dead: Any) -> None:
            return None

    consumer = EventConsumer(
        ConsumerOptions(
            bootstrap_servers="unused", group_id="bench", topics=(topic,),
            max_in_flight=20_000, max_records=args.max_records,
        ),
        decoder=decoder,
        dispatcher=switch,
        dead_letters=_Sink(),
        metrics=ConsumerMetrics(registry),
    )  # fmt: skip
    fake = _FakeKafka(by_tp, args.max_records)
    consumer._consumer = fake
    for tp in tps:
        consumer._pauses.assign(tp)
        part = _Partition(tp, None, consumer._pauses.backlog(tp))
        part.consumed_counter = consumer.metrics.consumed.labels(tp.topic, str(tp.partition))
        consumer._parts[tp] = part
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    if args.setup_only:  # what a round costs besides its events (instruction counts)
        await switch.close()
        gc.unfreeze()
        return {"cpu_us_per_event": 0.0, "events_per_s": 0.0}
    consumer._fetching = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fetch = asyncio.create_task(consumer._fetch_loop())
    await done.wait()
    while consumer.in_flight:  # noqa: ASYNC110 - a few loop turns: the last finishes
        await asyncio.sleep(0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    committed = await consumer.commit()
    expected = {tp.partition: len(by_tp[tp]) for tp in tps}
    got = {c.partition: c.offset for c in committed}
    if got != expected:
        raise AssertionError(f"committed {got}, expected {expected}")
    consumer._fetching = False
    fetch.cancel()
    await asyncio.gather(fetch, return_exceptions=True)
    await switch.close()
    gc.unfreeze()
    return {
        "cpu_us_per_event": cpu / args.events * 1e6,
        "events_per_s": args.events / wall,
    }


def _child(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(_one_round(args))
    print(json.dumps(result))


def _run_child(root: Path, args: argparse.Namespace, mode: str) -> dict[str, float]:
    cmd = [
        sys.executable, "-P", str(Path(__file__).resolve()), "--child",
        "--events", str(args.events), "--aggregates", str(args.aggregates),
        "--partitions", str(args.partitions), "--handler", args.handler, "--mode", mode,
        "--max-records", str(args.max_records),
    ]  # fmt: skip
    if args.decode:
        cmd.append("--decode")
    if args.no_timeout:
        cmd.append("--no-timeout")
    if args.no_metrics:
        cmd.append("--no-metrics")
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=root)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _instructions(root: Path, args: argparse.Namespace, mode: str) -> float:
    """Instructions per event of ``root``'s code (see the module docstring)."""
    small, large = 4_000, 12_000

    def count(events: int, setup_only: bool) -> int:
        cmd = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-P", str(Path(__file__).resolve()), "--child",
            "--events", str(events), "--aggregates", str(args.aggregates),
            "--partitions", str(args.partitions), "--handler", args.handler, "--mode", mode,
            "--max-records", str(args.max_records),
        ]  # fmt: skip
        if setup_only:
            cmd.append("--setup-only")
        if args.no_timeout:
            cmd.append("--no-timeout")
        if args.no_metrics:
            cmd.append("--no-metrics")
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=root)
        for line in out.stderr.splitlines():
            if "Collected :" in line:
                return int(line.rsplit(":", 1)[1].strip())
        raise RuntimeError(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")

    run = count(large, False) - count(small, False)
    setup = count(large, True) - count(small, True)
    return (run - setup) / (large - small)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--aggregates", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--handler", choices=["noop", "1ms"], default="noop")
    p.add_argument("--max-records", type=int, default=MAX_RECORDS, help="records per getmany")
    p.add_argument("--mode", choices=["keyed", "actor", "both"], default="both")
    p.add_argument("--decode", action="store_true", help="the real intake decoder")
    p.add_argument("--no-timeout", action="store_true", help="pool.handlerTimeoutS=null")
    p.add_argument("--no-metrics", action="store_true", help="the pools' no-op metrics")
    p.add_argument("--instructions", action="store_true", help="count them under valgrind")
    p.add_argument("--baseline-root", metavar="DIR")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    modes = ["keyed", "actor"] if args.mode == "both" else [args.mode]
    roots = [("current", ROOT)]
    if args.baseline_root:
        roots.append(("baseline", Path(args.baseline_root).resolve()))
    if args.instructions:
        if args.handler != "noop":
            p.error("--instructions needs the no-op handler (a 1 ms one counts idle loop turns)")
        print("\n| code | mode | instructions/event |\n|---|---|---:|")
        for mode in modes:
            for name, root in roots:
                print(f"| {name} | {mode} | {_instructions(root, args, mode):,.0f} |", flush=True)
        return
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rnd in range(1, args.rounds + 1):
        for mode in modes:
            for name, root in roots:
                r = _run_child(root, args, mode)
                runs.setdefault((name, mode), []).append(r)
                print(
                    f"round {rnd} {name:>8} {mode:>5}: {r['cpu_us_per_event']:.2f} CPU µs/event, "
                    f"{r['events_per_s']:,.0f} events/s",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    print(f"\n{args.events:,} events, {args.handler} handler, Python {platform.python_version()}")
    print("\n| code | mode | CPU µs/event (median) | range | events/s (best) |")
    print("|---|---|---:|---:|---:|")
    for (name, mode), rs in runs.items():
        cpu = [r["cpu_us_per_event"] for r in rs]
        rate = max(r["events_per_s"] for r in rs)
        print(
            f"| {name} | {mode} | {statistics.median(cpu):.2f} | "
            f"{min(cpu):.2f}-{max(cpu):.2f} | {rate:,.0f} |"
        )
        rows.append({"code": name, "mode": mode, "runs": rs})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
