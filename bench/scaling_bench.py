"""Scaling out: 1 and 2 replicas of the shipped ``pool-server`` drain one backlog.

    .venv/bin/python bench/scaling_bench.py [--events 200000] [--aggregates 10000]
        [--partitions 8] [--latencies 0,1,10] [--replicas 1,2] [--rounds 1]
        [--mode keyed] [--set KEY=VALUE ...] [--idle-seconds 10]
        [--json bench/results/scaling_bench.json] [--quick]

Built on ``bench/service_bench.py`` (its process runner ``ShippedService``, the
backlog producer, CPU from ``/proc`` and the committed-offsets check): every
replica is ``python -m server`` with its defaults (fleet control on), one
consumer group per row, on one embedded broker.

A row: a backlog of ``--events`` seed-format envelopes over ``--aggregates``
aggregates (``--partitions`` partitions, produced once, before every row) is
drained from the start by N replicas in one group, with the handler
``bench.campaigns._handler:count`` at ``HANDLER_LATENCY_MS``. So that the
group's join and rebalance are not part of the figure, the row starts paused:

1. a *primer* (a replica on an empty topic, in a group of its own, following
   the row's control topic ``<group>.control``) writes a fleet ``Pause`` of
   everything and stops;
2. the N replicas start at once; each applies the fleet's pause before its
   first fetch; the bench waits until the group is stable (the replicas
   report disjoint, non-empty sets of partitions covering the topic, all
   paused), then tells each replica its share of the backlog (the sum of its
   partitions' end offsets: ``BENCH_TARGET_FILE``);
3. one fleet ``Resume`` through the first replica; the rate is the backlog
   over the time from the first event handled (on any replica) to the last
   (on every replica); the row counts once the group's committed offsets
   cover the backlog.

CPU: ``utime + stime`` of every replica's process, of the broker's and of the
whole machine (``/proc/stat``: what the other jobs on the machine took),
sampled every 5 ms, between the same two marks. ``events/s per core`` is the
backlog over the replicas' CPU seconds (= events/s over the cores the
replicas used): what one core buys at that handler latency.

Executor bound: with a handler latency L, an executor handles at most 1/L
events/s, and a replica's executors are not evenly loaded (aggregates are
hashed onto them): the backlog cannot drain faster than the backlog over
(the events of the busiest executor of any replica x L). The bench computes
it from the backlog's layout (``backlog_layout``: the producer's partitioner,
checked against the end offsets), each replica's partitions and the pool size
(256, or ``--set pool.keyed.workers=N``).

Idle: one replica with nothing to consume (an empty topic of
``--partitions`` partitions) for ``--idle-seconds``, with fleet control on
(the default) and off (``control.enabled=false``), and the broker alone: the
standing cost of a replica, and of its control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.partitioner import DefaultPartitioner  # noqa: E402

from bench.campaigns._harness import wait_for  # noqa: E402
from bench.e2e_bench import produce_backlog  # noqa: E402
from bench.service_bench import (  # noqa: E402
    COUNT_HANDLER,
    Bench,
    Marks,
    ShippedService,
    _read_marks,
    cpu_seconds,
)
from pool import executor_index  # noqa: E402
from server.__main__ import run_loop  # noqa: E402
from server._broker import EmbeddedBroker  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / _TICK


def git_commit() -> str:
    """The measured commit (``+dirty`` when the worktree has changes)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """Each partition's high watermark, from fetch responses (the embedded broker
    answers ``ListOffsets`` for the latest offset with 1 here)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def known() -> bool:
            await consumer.getmany(timeout_ms=200, max_records=1)
            return all(consumer.highwater(tp) is not None for tp in tps)

        await wait_for(known, 60, f"{topic} high watermarks", interval=0)
        return {tp.partition: int(consumer.highwater(tp) or 0) for tp in tps}
    finally:
        await consumer.stop()


#: The pool size setting of each mode (``pool.<key>``; 256 by default).
POOL_SIZE_KEYS = {"keyed": "keyed.workers", "actor": "actor.actors"}


def backlog_layout(events: int, aggregates: int, partitions: int) -> dict[int, dict[str, int]]:
    """Events per aggregate in each partition, as :func:`produce_backlog` keys
    them (``agg-<i % aggregates>``) and the producer's default partitioner
    places them (checked against the topic's end offsets by the caller)."""
    partitioner = DefaultPartitioner()
    every = list(range(partitions))
    layout: dict[int, dict[str, int]] = {p: {} for p in every}
    for i in range(min(events, aggregates)):
        agg = f"agg-{i}"
        n = events // aggregates + (1 if i < events % aggregates else 0)
        layout[partitioner(agg.encode(), every, every)][agg] = n
    return layout


@dataclass
class Sample:
    """CPU seconds of each replica, the broker, this bench and the machine, at ``at``."""

    at: float
    replicas: list[float]
    broker: float
    bench: float
    machine: float

    @classmethod
    def take(cls, pids: Sequence[int], broker_pid: int) -> Sample:
        return cls(
            at=time.monotonic(),
            replicas=[cpu_seconds(pid) for pid in pids],
            broker=cpu_seconds(broker_pid),
            bench=cpu_seconds(os.getpid()),
            machine=machine_busy_seconds(),
        )


@dataclass
class Window:
    """The replicas' marks and the CPU samples at the first and the last of them."""

    first_ns: list[int]
    last_ns: list[int]
    counts: list[int]
    start: Sample
    end: Sample
    marks: Marks = field(default_factory=Marks)


async def watch_replicas(
    paths: Sequence[Path],
    svcs: Sequence[ShippedService],
    targets: Sequence[int],
    broker_pid: int,
    timeout: float,
) -> Window:
    """Poll every replica's marks file every 5 ms until each replica with a share
    has its ``last`` mark; CPU sampled when the first ``first`` mark (any replica)
    and the last ``last`` mark are seen."""
    procs = [s.proc for s in svcs]
    assert all(p is not None for p in procs)
    pids = [p.pid for p in procs if p is not None]
    n = len(paths)
    sizes, first, last, counts = [0] * n, [0] * n, [0] * n, [0] * n
    start: Sample | None = None
    deadline = time.monotonic() + timeout
    while True:
        sample = Sample.take(pids, broker_pid)
        for i, path in enumerate(paths):
            sizes[i], lines = _read_marks(path, sizes[i])
            for kind, *rest in lines:
                if kind == "first" and not first[i]:
                    first[i] = int(rest[0])
                    start = start or sample
                elif kind == "last":
                    last[i], counts[i] = int(rest[0]), int(rest[1])
        if start is not None and all(last[i] or not targets[i] for i in range(n)):
            marks = Marks(first_ns=min(f for f in first if f), last_ns=max(last), count=sum(counts))
            return Window(first, last, counts, start, sample, marks)
        for svc in svcs:
            if svc.proc is not None and svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"not every replica reached its share within {timeout:g}s "
                f"(counts {counts}, targets {list(targets)}): a rebalance during the drain?"
            )
        await asyncio.sleep(0.005)


class ScalingBench:
    def __init__(self, args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path) -> None:
        self.args = args
        self.broker = broker
        self.workdir = workdir
        # The service bench's committed-offsets check (on its backlog topic).
        self.bench = Bench(args, broker, workdir)
        self.backlog = self.bench.backlog
        self.idle_topic = "scale-idle"
        self.ends: dict[int, int] = {}
        self.layout: dict[int, dict[str, int]] = {}
        self.n = 0
        # ``--set KEY=VALUE``: the same on every replica (and the primer), e.g.
        # pool.keyed.workers=512 against a second replica. None by default.
        self.settings = dict(kv.split("=", 1) for kv in args.set)

    def _service(
        self,
        topic: str,
        group: str,
        name: str,
        latency_ms: float = 0.0,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> ShippedService:
        return ShippedService(
            self.broker.bootstrap, topic, self.workdir, group=group, mode=self.args.mode,
            handler=COUNT_HANDLER, latency_ms=latency_ms, env=env, name=name,
            overrides={**self.settings, **(overrides or {})},
        )  # fmt: skip

    async def setup(self) -> None:
        a = self.args
        await self.broker.create_topics({self.backlog: a.partitions, self.idle_topic: a.partitions})
        t0 = time.monotonic()
        await produce_backlog(self.broker.bootstrap, self.backlog, a.events, a.aggregates)
        print(f"produced {a.events:,} events in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        self.ends = await end_offsets(self.broker.bootstrap, self.backlog, a.partitions)
        if sum(self.ends.values()) != a.events:
            raise RuntimeError(f"backlog end offsets {self.ends} do not add up to {a.events}")
        self.layout = backlog_layout(a.events, a.aggregates, a.partitions)
        if {p: sum(aggs.values()) for p, aggs in self.layout.items()} != self.ends:
            self.layout = {}  # not the producer's partitioning: no executor bound

    def executor_bound(self, owned: Sequence[Sequence[int]], latency_ms: float) -> int | None:
        """The fastest the backlog can drain with ``owned`` partitions per replica
        and this handler latency: each executor handles one event at a time, so
        the replica whose busiest executor has the most events finishes last."""
        if not latency_ms or not self.layout:
            return None
        size = int(self.settings.get(f"pool.{POOL_SIZE_KEYS[self.args.mode]}", 256))
        busiest = 0
        for parts in owned:
            load: dict[int, int] = {}
            for p in parts:
                for agg, n in self.layout[p].items():
                    i = executor_index(agg, size)
                    load[i] = load.get(i, 0) + n
            busiest = max(busiest, max(load.values(), default=0))
        return round(self.args.events / (busiest * latency_ms / 1000)) if busiest else None

    async def prime(self, group: str, name: str) -> ShippedService:
        """Write a fleet-wide pause to ``group``'s control topic before any replica
        of the row starts: a primer replica on the empty topic, in a group of its
        own (a member of the row's group that left would hold up the group's next
        join on the embedded broker), following the row's control topic. The
        primer is returned running: the caller stops it."""
        primer = self._service(
            self.idle_topic, f"{group}-primer", f"{name}-primer",
            overrides={"control.topic": f"{group}.control"},
        )  # fmt: skip
        try:
            await primer.start(timeout=60, wait_assigned=False)
            async with primer.client(timeout=30) as client:
                reply = await client.pause_reply(scope="fleet")
        except BaseException:
            primer.cleanup()
            raise
        if not (reply.all_paused and reply.fleet.complete):
            primer.cleanup()
            raise RuntimeError(f"{group}: the fleet pause did not complete: {reply}")
        return primer

    async def _stable(self, svcs: Sequence[ShippedService]) -> list[list[int]] | None:
        """Each replica's partitions once the group is stable (disjoint, non-empty,
        covering the topic, all paused), else None."""
        owned: list[list[int]] = []
        for svc in svcs:
            try:
                async with svc.client(timeout=2.0) as client:
                    status = await client.status()
            except Exception:
                return None
            parts = sorted(p.partition for p in status.partitions if p.topic == self.backlog)
            if not parts or not all(p.paused for p in status.partitions):
                return None
            owned.append(parts)
        every = [p for parts in owned for p in parts]
        if sorted(every) != list(range(self.args.partitions)):
            return None
        return owned

    async def drain(self, replicas: int, latency_ms: float, rnd: int) -> dict[str, Any]:
        self.n += 1
        name = f"r{replicas}-{latency_ms:g}ms-{rnd}-{self.n}"
        group = f"g-scale-{name}"
        began = time.monotonic()
        primer = await self.prime(group, name)
        prime_s = time.monotonic() - began
        marks = [self.workdir / f"{name}-{i}.marks" for i in range(replicas)]
        target_files = [self.workdir / f"{name}-{i}.target" for i in range(replicas)]
        svcs = [
            self._service(
                self.backlog,
                group,
                f"{name}-{i}",
                latency_ms,
                env={"BENCH_MARKS": str(marks[i]), "BENCH_TARGET_FILE": str(target_files[i])},
            )
            for i in range(replicas)
        ]
        try:
            started = time.monotonic()
            await asyncio.gather(
                _stopped(primer), *(s.start(timeout=90, wait_assigned=False) for s in svcs)
            )
            owned: list[list[int]] = []

            async def stable() -> bool:
                nonlocal owned
                owned = await self._stable(svcs) or []
                return bool(owned)

            await wait_for(stable, 120, f"{group} stable and paused", interval=0.2)
            join_s = time.monotonic() - started
            if any(path.exists() for path in marks):
                raise RuntimeError(f"{group}: events handled while the fleet was paused")
            targets = [sum(self.ends[p] for p in parts) for parts in owned]
            for path, target in zip(target_files, targets, strict=True):
                path.write_text(str(target))
            # Watching before the resume: the first events are handled while the
            # fleet call still waits for every replica's report.
            watch = asyncio.ensure_future(
                watch_replicas(marks, svcs, targets, self.broker.pid, self.args.timeout)
            )
            try:
                async with svcs[0].client(timeout=30) as client:
                    t0 = time.monotonic()
                    reply = await client.resume_reply(scope="fleet")
                    resume_ms = (time.monotonic() - t0) * 1000
                if not reply.fleet.complete:
                    raise RuntimeError(f"{group}: the fleet resume did not complete: {reply}")
                window = await watch
            finally:
                watch.cancel()
            commit_s = await self.bench._wait_committed(group, window.marks)
            await asyncio.gather(*(_stopped(s) for s in svcs))
        finally:
            for svc in (primer, *svcs):
                svc.cleanup()
        row = _row(replicas, latency_ms, rnd, window, owned)
        row["executor_bound_events_per_s"] = self.executor_bound(owned, latency_ms)
        row.update(
            resume_ms=round(resume_ms, 1),
            commit_s=round(commit_s, 2),
            # Where the row's wall time went: the primer, the replicas' start and
            # the group's join, the whole row.
            prime_s=round(prime_s, 2),
            join_s=round(join_s, 2),
            row_s=round(time.monotonic() - began, 2),
        )
        print(_progress(row), file=sys.stderr)
        return row

    async def idle(self) -> dict[str, Any]:
        """The standing CPU of the broker alone, of one idle replica with fleet
        control (the default) and without."""
        seconds = self.args.idle_seconds
        out: dict[str, Any] = {"seconds": seconds}
        s0 = Sample.take([], self.broker.pid)
        await asyncio.sleep(seconds)  # a measurement window, not a synchronisation
        s1 = Sample.take([], self.broker.pid)
        out["broker_alone_cores"] = round((s1.broker - s0.broker) / (s1.at - s0.at), 4)
        out["machine_busy_cores"] = round((s1.machine - s0.machine) / (s1.at - s0.at), 3)
        for label, overrides in (
            ("control_on", None),
            ("control_off", {"control.enabled": "false"}),
        ):
            self.n += 1
            svc = self._service(
                self.idle_topic, f"g-idle-{self.n}", f"idle-{label}", overrides=overrides
            )
            try:
                await svc.start(timeout=60)
                assert svc.proc is not None
                # Past the start-up work (a settle: the window is measured after).
                await asyncio.sleep(min(2.0, seconds))
                s0 = Sample.take([svc.proc.pid], self.broker.pid)
                await asyncio.sleep(seconds)
                s1 = Sample.take([svc.proc.pid], self.broker.pid)
                await _stopped(svc)
            finally:
                svc.cleanup()
            wall = s1.at - s0.at
            out[label] = {
                "replica_cores": round((s1.replicas[0] - s0.replicas[0]) / wall, 4),
                "broker_cores": round((s1.broker - s0.broker) / wall, 4),
            }
        print(f"idle: {out}", file=sys.stderr)
        return out


async def _stopped(svc: ShippedService) -> None:
    """Stop ``svc`` (SIGTERM); anything but exit code 0 is an error."""
    rc = await svc.stop()
    if rc != 0:
        raise RuntimeError(f"{svc.name} exited with {rc}:\n{svc.stderr_tail()}")


def _row(
    replicas: int, latency_ms: float, rnd: int, w: Window, owned: Sequence[Sequence[int]]
) -> dict[str, Any]:
    span = (w.marks.last_ns - w.marks.first_ns) / 1e9
    events = w.marks.count - 1  # between the first mark and the last
    wall = max(w.end.at - w.start.at, 1e-9)
    cpu = [e - s for s, e in zip(w.start.replicas, w.end.replicas, strict=True)]
    replica_cpu = sum(cpu)
    broker_cpu = w.end.broker - w.start.broker
    per_event = replica_cpu * 1e6 / events
    return {
        "replicas": replicas,
        "handler_ms": latency_ms,
        "round": rnd,
        "events": w.marks.count,
        "seconds": round(span, 3),
        "events_per_s": round(events / span) if span > 0 else 0,
        "cpu_us_per_event": round(per_event, 2),
        "events_per_s_per_core": round(1e6 / per_event) if per_event else 0,
        "replica_cores": round(replica_cpu / wall, 3),
        "broker_cpu_us_per_event": round(broker_cpu * 1e6 / events, 2),
        "broker_cores": round(broker_cpu / wall, 3),
        "bench_cores": round((w.end.bench - w.start.bench) / wall, 3),
        "machine_busy_cores": round((w.end.machine - w.start.machine) / wall, 3),
        # What the rest of the machine (other jobs) took meanwhile.
        "other_cores": round(
            (
                (w.end.machine - w.start.machine)
                - replica_cpu
                - broker_cpu
                - (w.end.bench - w.start.bench)
            )
            / wall,
            3,
        ),
        "per_replica": [
            {
                "partitions": list(parts),
                "events": w.counts[i],
                "cores": round(cpu[i] / wall, 3),
                "cpu_us_per_event": round(cpu[i] * 1e6 / w.counts[i], 2) if w.counts[i] else 0,
                "seconds": round((w.last_ns[i] - w.first_ns[i]) / 1e9, 3),
            }
            for i, parts in enumerate(owned)
        ],
    }


def _progress(row: dict[str, Any]) -> str:
    return (
        f"{row['handler_ms']:g} ms x{row['replicas']} r{row['round']} "
        f"{row['events_per_s']:>9,} ev/s  cpu {row['cpu_us_per_event']:6.1f} us/ev  "
        f"{row['events_per_s_per_core']:>8,} ev/s/core  replicas {row['replica_cores']:.2f} "
        f"broker {row['broker_cores']:.2f} others {row['other_cores']:.2f} cores  "
        f"resume {row['resume_ms']} ms  (prime {row['prime_s']}s join {row['join_s']}s "
        f"commit {row['commit_s']}s row {row['row_s']}s)"
    )


# --------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (handler, replicas): medians over the rounds (events/s with its range),
    and the speed-up over the fewest replicas of the same handler and round.
    ``quietest``: the round in which the other jobs on the machine took the least
    (the most of both cores the bench had), its speed-up over the quietest row
    of the fewest replicas."""
    by = {(r["handler_ms"], r["replicas"], r["round"]): r for r in rows}
    base = min(r["replicas"] for r in rows)
    quietest: dict[tuple[float, int], dict[str, Any]] = {}
    for r in rows:
        q = quietest.get((r["handler_ms"], r["replicas"]))
        if q is None or r["other_cores"] < q["other_cores"]:
            quietest[(r["handler_ms"], r["replicas"])] = r
    out = []
    for latency, replicas in dict.fromkeys((r["handler_ms"], r["replicas"]) for r in rows):
        sel = [r for r in rows if (r["handler_ms"], r["replicas"]) == (latency, replicas)]
        speedups = [
            r["events_per_s"] / one["events_per_s"]
            for r in sel
            if (one := by.get((latency, base, r["round"]))) and one["events_per_s"]
        ]
        rates = [r["events_per_s"] for r in sel]

        quiet, quiet_one = quietest[(latency, replicas)], quietest.get((latency, base))

        def med(key: str, sel: list[dict[str, Any]] = sel) -> float:
            return round(float(statistics.median(r[key] for r in sel)), 3)

        out.append(
            {
                "handler_ms": latency,
                "replicas": replicas,
                "rounds": len(sel),
                "events_per_s": round(statistics.median(rates)),
                "events_per_s_range": [min(rates), max(rates)],
                "speedup": round(statistics.median(speedups), 2) if speedups else None,
                "speedup_range": [round(min(speedups), 2), round(max(speedups), 2)]
                if speedups
                else None,
                "cpu_us_per_event": round(med("cpu_us_per_event"), 1),
                "events_per_s_per_core": round(med("events_per_s_per_core")),
                "replica_cores": round(med("replica_cores"), 2),
                "broker_cpu_us_per_event": round(med("broker_cpu_us_per_event"), 2),
                "broker_cores": round(med("broker_cores"), 2),
                "machine_busy_cores": round(med("machine_busy_cores"), 2),
                "other_cores": round(med("other_cores"), 2),
                "executor_bound_events_per_s": sel[0]["executor_bound_events_per_s"],
                "quietest": {
                    "round": quiet["round"],
                    "events_per_s": quiet["events_per_s"],
                    "speedup": round(quiet["events_per_s"] / quiet_one["events_per_s"], 2)
                    if quiet_one and quiet_one["events_per_s"]
                    else None,
                    "cpu_us_per_event": quiet["cpu_us_per_event"],
                    "replica_cores": quiet["replica_cores"],
                    "broker_cores": quiet["broker_cores"],
                    "other_cores": quiet["other_cores"],
                },
            }
        )
    return out


def table(report: dict[str, Any]) -> str:
    def rng(values: list[float] | None, fmt: str) -> str:
        if not values:
            return "-"
        lo, hi = values
        return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"

    head = (
        "| handler | replicas | events/s | executor bound | speed-up | CPU µs/event (replicas) "
        "| events/s per core | cores: replicas | broker | other jobs |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["summary"]:
        speed = "1" if s["replicas"] == 1 else rng(s["speedup_range"], ".2f") + "×"  # noqa: RUF001
        bound = s["executor_bound_events_per_s"]
        bound_text = "-" if bound is None else format(bound, ",")
        out.append(
            f"| {s['handler_ms']:g} ms | {s['replicas']} | {rng(s['events_per_s_range'], ',.0f')} "
            f"| {bound_text} | {speed} | {s['cpu_us_per_event']} | {s['events_per_s_per_core']:,} "
            f"| {s['replica_cores']:.2f} | {s['broker_cores']:.2f} "
            f"({s['broker_cpu_us_per_event']} µs/ev) | {s['other_cores']:.2f} |"
        )
    if report["rounds"] > 1:
        out += [
            "",
            "quietest round of each row (the least taken by other jobs):",
            "",
            (
                "| handler | replicas | round | events/s | speed-up | CPU µs/event | events/s "
                "per core | cores: replicas | broker | other jobs |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in report["summary"]:
            q = s["quietest"]
            speed = "-" if q["speedup"] is None else f"{q['speedup']:.2f}"
            per_core = round(1e6 / q["cpu_us_per_event"]) if q["cpu_us_per_event"] else 0
            out.append(
                f"| {s['handler_ms']:g} ms | {s['replicas']} | {q['round']} "
                f"| {q['events_per_s']:,} | {speed} | {q['cpu_us_per_event']} | {per_core:,} "
                f"| {q['replica_cores']:.2f} | {q['broker_cores']:.2f} | {q['other_cores']:.2f} |"
            )
    idle = report.get("idle")
    if idle:
        on, off = idle["control_on"], idle["control_off"]
        line = (
            f"idle over {idle['seconds']:g} s, cores: broker alone "
            f"{idle['broker_alone_cores']:.3f}; one idle replica with fleet control "
            f"{on['replica_cores']:.3f} (broker {on['broker_cores']:.3f}), without "
            f"{off['replica_cores']:.3f} (broker {off['broker_cores']:.3f})"
        )
        out += ["", line]
    return "\n".join(out)


# ----------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "commit": git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": multiprocessing.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "mode": args.mode,
        "partitions": args.partitions,
        "aggregates": args.aggregates,
        "backlog_events": args.events,
        "rounds": args.rounds,
        "settings": dict(kv.split("=", 1) for kv in args.set),
    }
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    await asyncio.to_thread(broker.start)
    try:
        bench = ScalingBench(args, broker, workdir)
        await bench.setup()
        for rnd in range(1, args.rounds + 1):
            for latency in args.latencies:
                # Alternate the order by round: drift on the machine is not one row's.
                order = args.replicas if rnd % 2 else list(reversed(args.replicas))
                rows.extend([await bench.drain(replicas, latency, rnd) for replicas in order])
        report["throughput"] = rows
        report["summary"] = summarise(rows)
        if args.idle_seconds > 0:
            report["idle"] = await bench.idle()
    finally:
        await asyncio.to_thread(broker.stop)
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--aggregates", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--latencies", type=_floats, default=[0.0, 1.0, 10.0], help="handler ms")
    p.add_argument("--replicas", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mode", choices=("keyed", "actor"), default="keyed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every replica (default: none, the shipped defaults)",
    )
    p.add_argument("--idle-seconds", type=float, default=10.0, help="0: no idle measurement")
    p.add_argument("--timeout", type=float, default=300.0, help="per drain")
    p.add_argument("--json", default="bench/results/scaling_bench.json")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.quick:
        args.events, args.aggregates, args.idle_seconds = 3_000, 500, 1.0
    if any("=" not in kv for kv in args.set):
        p.error("--set takes KEY=VALUE")
    if max(args.replicas) > args.partitions:
        p.error("more replicas than partitions: the extra ones would idle")
    report = run_loop(main_async(args))
    print(table(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
