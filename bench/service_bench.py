"""The service as it ships, against the plain aiokafka loop, in one run.

    .venv/bin/python bench/service_bench.py [--events 200000] [--aggregates 10000]
        [--partitions 8] [--rounds 1] [--rate 10000] [--duration 10]
        [--switches 100] [--json bench/results/service_bench.json] [--quick]
        [--profile DIR [--profile-only] [--profile-blocking]] [--baseline-root DIR]
        [--ablate-timeout]

Everything runs as real processes on one embedded broker:

- **plain loop**: the loop most aiokafka users write, in its own process:
  ``getmany``, ``json.loads`` each value, ``await`` the handler, commit once a
  second (uvloop, and the consumer options of ``bench/e2e_bench.py``'s plain
  loop: the embedded broker holds every fetch ``fetch_max_wait_ms``);
- **pool-server**: ``python -m server`` with its defaults: only ``--brokers``,
  ``--topic``, ``--group-id``, ``--handler``, the gRPC and metrics addresses
  (port 0: free ports), and ``--mode actor`` for the ACTOR rows.

Throughput: one backlog of ``--events`` seed-format envelopes over
``--aggregates`` aggregates is produced first; each row drains it from the
start in a consumer group of its own. The handler is
``bench.campaigns._handler:count`` (a counter; ``HANDLER_LATENCY_MS=1`` awaits
1 ms first); it marks its first and its ``BENCH_TARGET``-th event, and the
rate is events/s between the two (start-up and group join excluded). CPU
µs/event is ``utime + stime`` from ``/proc/<pid>/stat`` of the consumer's
process and of the broker's, sampled every 5 ms, between the same two marks.
A service row is done when its group's committed offsets cover the backlog
(polled with a deadline; ``commit_s`` is how long after the last event). The
plain loop with the 1 ms handler drains a capped share (it would take minutes).
``--rounds N`` repeats the throughput rows N times, interleaved, each round
with its ratios to the plain loop of the same round.

Latency: a steady ``--rate`` events/s for ``--duration`` s into a fresh topic
(``bench.campaigns._harness.SteadyProducer``, stamped at send) while the
service runs with the campaigns' recording handler; produce->handled is the
handler's end minus the stamp, first second skipped. Switch: the same stream
with a 1 ms handler while ``--switches`` ``SetPoolMode`` calls toggle
KEYED/ACTOR over gRPC; their round trips (and the server's own ``took``).
Metrics: the series count and bytes of one ``/metrics`` scrape of the KEYED
service after its backlog.

``--profile DIR`` then drains the backlog once more in KEYED and in ACTOR
under ``py-spy record --format raw`` (files in DIR, not committed) and
attributes the samples to the stages of ``bench/profile_breakdown.py``.
py-spy reads the process without stopping it; ``--profile-blocking`` stops it
for each sample (py-spy's default: consistent stacks, but samples biased
towards system calls). ``--ablate-timeout`` adds the KEYED and ACTOR no-op
rows with ``pool.handlerTimeoutS=null``: the timeout's own cost, directly.
``--baseline-root DIR`` runs every service row a second time with the service
code of another checkout (e.g. ``git archive <commit> | tar -x -C DIR``): a
before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.campaigns._harness import (  # noqa: E402
    ServiceProcess,
    SteadyProducer,
    committed_offsets,
    count_handled,
    percentile,
    read_records,
    wait_for,
)
from bench.e2e_bench import _raw_consumer, produce_backlog  # noqa: E402
from server.__main__ import run_loop  # noqa: E402
from server._broker import EmbeddedBroker  # noqa: E402

COUNT_HANDLER = "bench.campaigns._handler:count"
RECORD_HANDLER = "bench.campaigns._handler:handle"
HANDLERS = {"noop": 0.0, "1ms": 1.0}
#: Throughput rows in run order: (consumer, handler).
ROWS = (
    ("plain", "noop"),
    ("keyed", "noop"),
    ("actor", "noop"),
    ("plain", "1ms"),
    ("keyed", "1ms"),
    ("actor", "1ms"),
)
#: The one setting the ablation rows change: no handler timeout.
NO_TIMEOUT = {"pool.handlerTimeoutS": "null"}
LABELS = {"plain": "plain loop", "keyed": "pool-server KEYED", "actor": "pool-server ACTOR"}
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """``utime + stime`` of ``pid`` (all its threads; only ``tid`` if given), in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, "rb") as fh:
        stat = fh.read()
    # The command name (field 2) may hold spaces: split after its closing paren.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# ------------------------------------------------------------- processes


class ShippedService(ServiceProcess):
    """``python -m server`` with its defaults: brokers, topic, group, handler and
    the two addresses only (``--mode actor`` for ACTOR). ``root`` is the checkout
    whose service code runs (``-P``: the working directory is not on the path)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        workdir: Path,
        *,
        group: str,
        mode: str,
        handler: str,
        latency_ms: float,
        root: Path = ROOT,
        env: Mapping[str, str] | None = None,
        name: str,
        overrides: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(
            bootstrap,
            topic,
            workdir,
            group=group,
            mode=mode,
            latency_ms=latency_ms,
            env={"PYTHONPATH": str(root), **(env or {})},
            name=name,
        )
        self.handler = handler
        # Nothing but what the caller overrides (the harness sets its test values).
        self.settings = dict(overrides or {})

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-P", "-m", "server",
            "--brokers", self.bootstrap,
            "--topic", self.topic,
            "--group-id", self.group,
            "--handler", self.handler,
            "--grpc-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
        ]  # fmt: skip
        if self.mode != "keyed":
            cmd += ["--mode", self.mode]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd


class PlainLoop:
    """The plain loop (:func:`plain_loop_main`) as a child process."""

    def __init__(self, bootstrap: str, topic: str, group: str, env: Mapping[str, str]) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--plain-loop",
            "--brokers", bootstrap, "--topic", topic, "--group-id", group,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def plain_loop(bootstrap: str, topic: str, group: str) -> None:
    from bench.campaigns._handler import count as handler

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = await _raw_consumer(bootstrap, topic, group)
    try:
        last_commit = time.monotonic()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            for records in batches.values():
                for r in records:
                    await handler(json.loads(r.value))
            if time.monotonic() - last_commit >= 1.0:
                await consumer.commit()
                last_commit = time.monotonic()
        await consumer.commit()
    finally:
        await consumer.stop()


def plain_loop_main(args: argparse.Namespace) -> None:
    run_loop(plain_loop(args.brokers, args.topic, args.group_id))


# ------------------------------------------------------------ measuring


@dataclass
class Marks:
    """The handler's two marks with the CPU of both processes at each."""

    first_ns: int = 0
    last_ns: int = 0
    count: int = 0
    #: (the consumer's process, its main thread, the broker), in seconds.
    cpu_first: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu_last: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _read_marks(path: Path, size: int) -> tuple[int, list[list[str]]]:
    """The marks file's size and, when it changed from ``size``, its lines."""
    try:
        now = path.stat().st_size
    except FileNotFoundError:
        return 0, []
    if now == size:
        return size, []
    return now, [line.split() for line in path.read_text().splitlines()]


async def watch_marks(
    path: Path, proc: subprocess.Popen[bytes], broker_pid: int, timeout: float
) -> Marks:
    """Poll ``path`` every 5 ms until its ``last`` mark; the CPU of ``proc`` and of
    the broker is sampled at each mark."""
    pid = proc.pid
    marks = Marks()
    deadline = time.monotonic() + timeout
    size = 0
    while True:
        cpu = (cpu_seconds(pid), cpu_seconds(pid, pid), cpu_seconds(broker_pid))
        size, lines = _read_marks(path, size)
        for kind, *rest in lines:
            if kind == "first" and not marks.first_ns:
                marks.first_ns, marks.cpu_first = int(rest[0]), cpu
            elif kind == "last":
                marks.last_ns, marks.count, marks.cpu_last = int(rest[0]), int(rest[1]), cpu
        if marks.last_ns:
            return marks
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem}: the consumer exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no last mark in {path} within {timeout:g}s")
        await asyncio.sleep(0.005)


def _row(consumer: str, handler: str, variant: str, marks: Marks, rnd: int) -> dict[str, Any]:
    span = (marks.last_ns - marks.first_ns) / 1e9
    events = marks.count - 1  # between the first mark and the last

    def per_event(i: int) -> float:
        return round((marks.cpu_last[i] - marks.cpu_first[i]) * 1e6 / events, 2)

    return {
        "consumer": consumer,
        "handler": handler,
        "variant": variant,
        "round": rnd,
        "events": marks.count,
        "seconds": round(span, 3),
        "events_per_s": round(events / span) if span > 0 else 0,
        "cpu_us_per_event": per_event(0),
        # The event loop's thread (the rest: gRPC's poller, the metrics server).
        "main_thread_cpu_us_per_event": per_event(1),
        "broker_cpu_us_per_event": per_event(2),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path) -> None:
        self.args = args
        self.broker = broker
        self.workdir = workdir
        self.backlog = "svc-backlog"
        self.n = 0

    def _env(self, handler: str, target: int, marks: Path) -> dict[str, str]:
        return {
            "HANDLER_LATENCY_MS": str(HANDLERS[handler]),
            "BENCH_TARGET": str(target),
            "BENCH_MARKS": str(marks),
        }

    def _target(self, consumer: str, handler: str) -> int:
        events = int(self.args.events)
        if consumer == "plain" and handler == "1ms":
            return min(events, int(self.args.plain_1ms_events))
        return events

    async def throughput(
        self, consumer: str, handler: str, rnd: int, variant: str = "current",
        root: Path = ROOT, profile: Path | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        self.n += 1
        name = f"{consumer}-{handler}-{variant}-{rnd}-{self.n}"
        group = f"g-{name}"
        marks_path = self.workdir / f"{name}.marks"
        target = self._target(consumer, handler)
        env = self._env(handler, target, marks_path)
        timeout = self.args.timeout
        if consumer == "plain":
            plain = PlainLoop(self.broker.bootstrap, self.backlog, group, env)
            try:
                marks = await watch_marks(marks_path, plain.proc, self.broker.pid, timeout)
            finally:
                plain.stop()
            row = _row(consumer, handler, variant, marks, rnd)
        else:
            svc = ShippedService(
                self.broker.bootstrap, self.backlog, self.workdir, group=group, mode=consumer,
                handler=COUNT_HANDLER, latency_ms=HANDLERS[handler], root=root, env=env,
                name=name, overrides=overrides,
            )  # fmt: skip
            spy: subprocess.Popen[bytes] | None = None
            try:
                await svc.start(timeout=60, wait_assigned=False)
                assert svc.proc is not None
                if profile is not None:
                    spy = start_py_spy(svc.proc.pid, profile, blocking=self.args.profile_blocking)
                marks = await watch_marks(marks_path, svc.proc, self.broker.pid, timeout)
                if spy is not None:
                    stop_py_spy(spy)
                    spy = None
                row = _row(consumer, handler, variant, marks, rnd)
                row["commit_s"] = round(await self._wait_committed(group, marks), 2)
                if consumer == "keyed" and handler == "noop" and variant == "current":
                    row["scrape"] = await asyncio.to_thread(scrape, svc.metrics_address)
                rc = await svc.stop()
                if rc != 0:
                    raise RuntimeError(f"{name} exited with {rc}:\n{svc.stderr_tail()}")
            finally:
                if spy is not None:
                    stop_py_spy(spy)
                svc.cleanup()
        print(_progress(row), file=sys.stderr)
        return row

    async def _wait_committed(self, group: str, marks: Marks) -> float:
        """Seconds from the last handled event to the backlog's full commit."""

        async def covered() -> bool:
            committed = await committed_offsets(
                self.broker.bootstrap, group, self.backlog, self.args.partitions
            )
            return sum(v or 0 for v in committed.values()) >= int(self.args.events)

        await wait_for(covered, 60, f"{group} committed the backlog", interval=0.2)
        return (time.monotonic_ns() - marks.last_ns) / 1e9

    async def latency(self, mode: str) -> dict[str, Any]:
        """Produce -> handled at a steady rate (no-op handler that records)."""
        a = self.args
        self.n += 1
        topic = f"svc-steady-{self.n}"
        await self.broker.create_topics({topic: a.partitions})
        svc = ShippedService(
            self.broker.bootstrap, topic, self.workdir, group=f"g-{topic}", mode=mode,
            handler=RECORD_HANDLER, latency_ms=0.0, name=topic,
        )  # fmt: skip
        try:
            await svc.start(timeout=60)
            producer = SteadyProducer(
                self.broker.bootstrap, topic, partitions=a.partitions, aggregates=a.aggregates
            )
            begun = time.monotonic_ns()
            stats = await producer.run(a.rate, a.duration)
            await wait_for(lambda: count_handled(svc.record) >= stats.acked, 60, f"{topic} handled")
            await svc.stop()
        finally:
            svc.cleanup()
        skip = begun + 1_000_000_000
        lat = [(r.end_ns - r.sent_ns) / 1e6 for r in read_records(svc.record) if r.sent_ns >= skip]
        row = {
            "mode": mode,
            "rate": a.rate,
            "seconds": a.duration,
            "produced_per_s": round(stats.rate),
            "events": len(lat),
            **_percentiles(lat),
        }
        print(f"latency {mode}: {row}", file=sys.stderr)
        return row

    async def switch(self) -> dict[str, Any]:
        """SetPoolMode round trips under a steady rate with a 1 ms handler."""
        a = self.args
        self.n += 1
        topic = f"svc-switch-{self.n}"
        await self.broker.create_topics({topic: a.partitions})
        svc = ShippedService(
            self.broker.bootstrap, topic, self.workdir, group=f"g-{topic}", mode="keyed",
            handler=RECORD_HANDLER, latency_ms=1.0, name=topic,
        )  # fmt: skip
        round_trips: list[float] = []
        took: list[float] = []
        rng = random.Random(12)
        try:
            await svc.start(timeout=60)
            producer = SteadyProducer(
                self.broker.bootstrap, topic, partitions=a.partitions, aggregates=a.aggregates
            )
            stop = asyncio.Event()
            produce = asyncio.ensure_future(producer.run(a.rate, seconds=600, stop=stop))
            try:
                await asyncio.sleep(1.0)  # the stream flows before the first switch
                async with svc.client(timeout=30) as client:
                    mode = "keyed"
                    for _ in range(a.switches):
                        await asyncio.sleep(rng.uniform(0.0, 0.1))
                        mode = "actor" if mode == "keyed" else "keyed"
                        t0 = time.monotonic()
                        outcome = (await client.set_mode(mode)).result
                        round_trips.append((time.monotonic() - t0) * 1000)
                        took.append(outcome.took.ToTimedelta().total_seconds() * 1000)
            finally:
                stop.set()
                stats = await produce
            await wait_for(
                lambda: count_handled(svc.record) >= stats.acked, 120, f"{topic} handled"
            )
            await svc.stop()
        finally:
            svc.cleanup()
        row = {
            "rate": a.rate,
            "produced_per_s": round(stats.rate),
            "handler_ms": 1.0,
            "switches": len(round_trips),
            "round_trip_ms": _percentiles(round_trips),
            "took_ms": _percentiles(took),
        }
        print(f"switch: {row}", file=sys.stderr)
        return row


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.50), 2),
        "p95_ms": round(percentile(values, 0.95), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "max_ms": round(max(values, default=0.0), 2),
    }


def scrape(address: str) -> dict[str, int]:
    """Series and bytes of one ``/metrics`` scrape."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        body = resp.read()
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    return {
        "bytes": len(body),
        "series": len(lines),
        "kafka_eventbus_series": sum(ln.startswith("kafka_eventbus_") for ln in lines),
    }


def _progress(row: dict[str, Any]) -> str:
    return (
        f"{LABELS[row['consumer']]:18} {row['handler']:5} {row['variant']:8} "
        f"r{row['round']} {row['events_per_s']:>9,} ev/s  "
        f"cpu {row['cpu_us_per_event']:6.1f} us/ev  broker {row['broker_cpu_us_per_event']:5.1f}"
    )


# ------------------------------------------------------------- profiling


def start_py_spy(pid: int, out: Path, *, blocking: bool = False) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    # --nonblocking: read the process's memory while it runs. Stopping it for
    # each sample (the default) biases the samples towards system calls: a
    # thread stops at its next kernel entry, and on Python 3.11 each
    # asyncio.get_running_loop() is a getpid().
    cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
           "--threads", "--output", str(out)]  # fmt: skip
    if not blocking:
        cmd.append("--nonblocking")
    if os.environ.get("BENCH_PY_SPY_NATIVE"):
        cmd.append("--native")  # C frames too (slower sampling; for a second look)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)  # attached before the backlog drains (a one-off, not a sync point)
    return proc


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (consumer, handler, variant): median and range over rounds, with the
    ratio to the plain loop of the same round and handler."""
    plain = {
        (r["handler"], r["round"]): r["events_per_s"] for r in rows if r["consumer"] == "plain"
    }
    plain_cpu = {
        r["round"]: r["cpu_us_per_event"]
        for r in rows
        if r["consumer"] == "plain" and r["handler"] == "noop"
    }
    out = []
    keys = list(dict.fromkeys((r["consumer"], r["handler"], r["variant"]) for r in rows))
    for consumer, handler, variant in keys:
        sel = [
            r
            for r in rows
            if (r["consumer"], r["handler"], r["variant"]) == (consumer, handler, variant)
        ]
        rates = [r["events_per_s"] for r in sel]
        ratios = [
            r["events_per_s"] / plain[(handler, r["round"])]
            for r in sel
            if plain.get((handler, r["round"]))
        ]
        # The same comparison by CPU per event (what each would reach with a
        # core of its own): steadier than events/s on a shared machine. Only
        # for the no-op handler: the plain loop with 1 ms waits, idle.
        cpu_ratios = [
            plain_cpu[r["round"]] / r["cpu_us_per_event"]
            for r in sel
            if handler == "noop" and plain_cpu.get(r["round"]) and r["cpu_us_per_event"]
        ]
        out.append(
            {
                "consumer": consumer,
                "handler": handler,
                "variant": variant,
                "rounds": len(sel),
                "events_per_s": round(statistics.median(rates)),
                "events_per_s_range": [min(rates), max(rates)],
                "ratio": round(statistics.median(ratios), 3) if ratios else None,
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
                "cpu_ratio": round(statistics.median(cpu_ratios), 3) if cpu_ratios else None,
                "cpu_us_per_event": round(statistics.median(r["cpu_us_per_event"] for r in sel), 1),
                "main_thread_cpu_us_per_event": round(
                    statistics.median(r["main_thread_cpu_us_per_event"] for r in sel), 1
                ),
                "broker_cpu_us_per_event": round(
                    statistics.median(r["broker_cpu_us_per_event"] for r in sel), 1
                ),
            }
        )
    return out


def table(report: dict[str, Any]) -> str:
    def rng(values: list[float] | None, fmt: str) -> str:
        if not values:
            return "-"
        lo, hi = values
        return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"

    head = "| consumer | handler | events/s | vs plain loop | by CPU | CPU µs/event: service "
    out = [head + "(loop thread) | broker |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in report["summary"]:
        name = LABELS[s["consumer"]] + ("" if s["variant"] == "current" else f" ({s['variant']})")
        out.append(
            f"| {name} | {s['handler']} | {rng(s['events_per_s_range'], ',.0f')} "
            f"| {rng(s['ratio_range'], '.2f')} "
            f"| {'-' if s['cpu_ratio'] is None else format(s['cpu_ratio'], '.2f')} "
            f"| {s['cpu_us_per_event']} ({s['main_thread_cpu_us_per_event']}) "
            f"| {s['broker_cpu_us_per_event']} |"
        )
    out.append("")
    out.extend(
        f"produce->handled at {lat['rate']:,.0f}/s, {lat['mode']}: p50 {lat['p50_ms']} ms, "
        f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms ({lat['events']:,} events)"
        for lat in report.get("latency", ())
    )
    sw = report.get("switch")
    if sw:
        rt, took = sw["round_trip_ms"], sw["took_ms"]
        out.append(
            f"SetPoolMode under {sw['rate']:,.0f}/s, 1 ms handler, {sw['switches']} switches: "
            f"round trip p50 {rt['p50_ms']} ms, p99 {rt['p99_ms']} ms, max {rt['max_ms']} ms "
            f"(server took p99 {took['p99_ms']} ms)"
        )
    sc = report.get("metrics")
    if sc:
        out.append(
            f"/metrics: {sc['series']:,} series "
            f"({sc['kafka_eventbus_series']:,} kafka_eventbus_*), {sc['bytes']:,} bytes per scrape"
        )
    if report.get("profile"):
        from bench.profile_breakdown import table as breakdown_table

        for mode, prof in report["profile"].items():
            title = (
                f"profile {mode}, no-op handler: {prof['samples']:,} samples, "
                f"{prof['events_per_s']:,} events/s, {prof['cpu_us_per_event']} CPU µs/event "
                f"({prof['main_thread_cpu_us_per_event']} in the event loop's thread)"
            )
            out += ["", title, "", breakdown_table(prof)]
    return "\n".join(out)


# ----------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="service-bench-"))
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "service",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": multiprocessing.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "partitions": args.partitions,
        "aggregates": args.aggregates,
        "backlog_events": args.events,
        "plain_1ms_events": min(args.events, args.plain_1ms_events),
        "rounds": args.rounds,
    }
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    await asyncio.to_thread(broker.start)
    try:
        bench = Bench(args, broker, workdir)
        await broker.create_topics({bench.backlog: args.partitions})
        t0 = time.monotonic()
        await produce_backlog(broker.bootstrap, bench.backlog, args.events, args.aggregates)
        print(f"produced {args.events:,} events in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        baseline = Path(args.baseline_root) if args.baseline_root else None
        for rnd in range(1, 0 if args.profile_only else args.rounds + 1):
            for consumer, handler in ROWS:
                row = await bench.throughput(consumer, handler, rnd)
                if "scrape" in row:
                    report["metrics"] = row.pop("scrape")
                rows.append(row)
                if baseline is not None and consumer != "plain":
                    rows.append(
                        await bench.throughput(consumer, handler, rnd, "baseline", baseline)
                    )
                if args.ablate_timeout and consumer != "plain" and handler == "noop":
                    for variant, root in (("no-timeout", ROOT), ("baseline-no-timeout", baseline)):
                        if root is not None:
                            rows.append(
                                await bench.throughput(
                                    consumer, handler, rnd, variant, root, overrides=NO_TIMEOUT
                                )
                            )
        report["throughput"] = rows
        report["summary"] = summarise(rows)
        if not args.profile_only:
            report["latency"] = [await bench.latency("keyed"), await bench.latency("actor")]
            report["switch"] = await bench.switch()
        if args.profile:
            report["profile"] = await profile(bench, Path(args.profile))
    finally:
        await asyncio.to_thread(broker.stop)
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


async def profile(bench: Bench, outdir: Path) -> dict[str, Any]:
    from bench.profile_breakdown import breakdown

    os.makedirs(outdir, exist_ok=True)
    result: dict[str, Any] = {}
    for mode in ("keyed", "actor"):
        raw = outdir / f"{mode}-noop.txt"
        row = await bench.throughput(mode, "noop", 0, "profiled", profile=raw)
        result[mode] = {
            "raw_file": raw.name,
            "py_spy": "blocking" if bench.args.profile_blocking else "nonblocking",
            "events_per_s": row["events_per_s"],
            "cpu_us_per_event": row["cpu_us_per_event"],
            "main_thread_cpu_us_per_event": row["main_thread_cpu_us_per_event"],
            **breakdown(raw.read_text(), row["main_thread_cpu_us_per_event"]),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--aggregates", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--plain-1ms-events", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--switches", type=int, default=100)
    p.add_argument("--timeout", type=float, default=300.0, help="per throughput row")
    p.add_argument("--json", default="bench/results/service_bench.json")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--profile", metavar="DIR", help="profile KEYED and ACTOR with py-spy")
    p.add_argument("--profile-only", action="store_true", help="only the --profile runs")
    p.add_argument("--profile-blocking", action="store_true", help="py-spy stops the process")
    p.add_argument("--baseline-root", metavar="DIR", help="also run the service from DIR")
    p.add_argument(
        "--ablate-timeout",
        action="store_true",
        help="also KEYED/ACTOR no-op with pool.handlerTimeoutS=null (the timeout's own cost)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    # The plain loop's child process.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--brokers", help=argparse.SUPPRESS)
    p.add_argument("--topic", help=argparse.SUPPRESS)
    p.add_argument("--group-id", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_loop:
        plain_loop_main(args)
        return
    if args.profile_only and not args.profile:
        p.error("--profile-only needs --profile DIR")
    if args.baseline_root:
        args.baseline_root = os.path.abspath(args.baseline_root)
    if args.quick:
        args.events, args.aggregates, args.plain_1ms_events = 5_000, 1_000, 300
        args.rate, args.duration, args.switches = 2_000, 2.0, 5
    report = run_loop(main_async(args))
    print(table(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
