"""The service as it ships, against the plain aiokafka loop, in one run.

    .venv/bin/python bench/service_bench.py [--events 200000] [--aggregates 10000]
        [--partitions 8] [--rounds 1] [--rate 10000] [--duration 10]
        [--switches 100] [--json bench/results/service_bench.json] [--quick]
        [--profile DIR [--profile-only] [--profile-blocking] [--profile-handler noop|1ms]]
        [--baseline-root DIR] [--ablate-timeout] [--service-set SPEC] [--sleep-floor]
        [--latency-only | --throughput-only] [--latency-rounds N] [--latency-variant SPEC]
        [--idle S]          (--help describes each)

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
handler's end minus the stamp, first second skipped; the plain loop runs the
same rows with the same handler (its commits from a task of its own, as the
service's), the floor that the producer and the broker set. ``--latency-variant``
adds rows with another fetch wait (both consumers), another linger of the load
generator or other service settings; ``--idle S`` an idle service's cores per
variant. Switch: the same stream
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
import contextlib
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
from collections.abc import Iterator, Mapping
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
    """The plain loop (:func:`plain_loop_main`) as a child process. ``record``:
    it passes each event to the campaigns' recording handler instead of the
    counter (the latency rows); ``fetch_max_wait_ms``: its consumer's."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        env: Mapping[str, str],
        *,
        record: bool = False,
        fetch_max_wait_ms: int = 20,
    ) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--plain-loop",
            "--brokers", bootstrap, "--topic", topic, "--group-id", group,
            "--plain-fetch-wait-ms", str(fetch_max_wait_ms),
        ]  # fmt: skip
        if record:
            cmd.append("--plain-record")
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


@dataclass(slots=True)
class _PlainMessage:
    """What the recording handler reads of a ``pool.Message``, for the plain loop."""

    topic: str
    partition: int
    offset: int
    aggregate_id: str
    envelope: Any


async def _plain_consumer(bootstrap: str, topic: str, group: str, fetch_max_wait_ms: int) -> Any:
    """``bench/e2e_bench.py``'s plain consumer, with the fetch wait as a parameter."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )  # fmt: skip
    await consumer.start()
    return consumer


async def plain_loop(
    bootstrap: str, topic: str, group: str, *, record: bool = False, fetch_max_wait_ms: int = 20
) -> None:
    from bench.campaigns._handler import count, handle

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if fetch_max_wait_ms == 20:
        consumer = await _raw_consumer(bootstrap, topic, group)
    else:
        consumer = await _plain_consumer(bootstrap, topic, group, fetch_max_wait_ms)
    marks = os.environ.get("BENCH_MARKS")
    assigned = False
    commit_ms: list[float] = []

    async def commit() -> None:
        t0 = time.monotonic()
        await consumer.commit()
        commit_ms.append((time.monotonic() - t0) * 1000)

    committing: asyncio.Task[None] | None = None
    try:
        last_commit = time.monotonic()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            if record and time.monotonic() - last_commit >= 1.0:
                # The latency rows: commit from a task of its own, as the service
                # does; an inline commit stops the loop for its round trip.
                if committing is None or committing.done():
                    committing = asyncio.ensure_future(commit())
                last_commit = time.monotonic()
            if record:
                # The recording handler needs the few fields it reads of a Message.
                for tp, records in batches.items():
                    for r in records:
                        value = json.loads(r.value)
                        await handle(
                            _PlainMessage(tp.topic, tp.partition, r.offset, r.key, value)  # type: ignore[arg-type]
                        )
                if not assigned and marks and consumer.assignment():
                    assigned = True  # the bench starts its producer after this mark
                    fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.write(fd, f"assigned {time.monotonic_ns()}\n".encode())
                    os.close(fd)
            else:
                for records in batches.values():
                    for r in records:
                        await count(json.loads(r.value))
            if time.monotonic() - last_commit >= 1.0:
                await commit()
                last_commit = time.monotonic()
        if committing is not None:
            await committing
        await consumer.commit()
        if marks and commit_ms:
            fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, ("commits " + " ".join(f"{ms:.2f}" for ms in commit_ms) + "\n").encode())
            os.close(fd)
    finally:
        await consumer.stop()


def plain_loop_main(args: argparse.Namespace) -> None:
    run_loop(
        plain_loop(
            args.brokers,
            args.topic,
            args.group_id,
            record=args.plain_record,
            fetch_max_wait_ms=args.plain_fetch_wait_ms,
        )
    )


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


@dataclass(frozen=True)
class LatencyVariant:
    """One configuration of the latency rows: the consumers' fetch wait (the
    service's ``kafka.consumer.fetchMaxWaitMs`` and the plain loop's
    ``fetch_max_wait_ms``), the load generator's ``linger_ms`` and other
    service settings. ``None``: as shipped (fetch 20 ms, linger 5 ms)."""

    fetch_wait_ms: int | None = None
    linger_ms: int | None = None
    settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> LatencyVariant:
        """``fetch=MS``, ``linger=MS`` and service ``KEY=VALUE`` settings, comma-separated."""
        fetch = linger = None
        settings = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"{part!r}: expected KEY=VALUE")
            if key == "fetch":
                fetch = int(value)
            elif key == "linger":
                linger = int(value)
            else:
                settings.append((key, value))
        return cls(fetch, linger, tuple(settings))

    @property
    def name(self) -> str:
        parts = [] if self.fetch_wait_ms is None else [f"fetch={self.fetch_wait_ms}"]
        parts += [] if self.linger_ms is None else [f"linger={self.linger_ms}"]
        parts += [f"{k}={v}" for k, v in self.settings]
        return ",".join(parts) or "default"

    def service_settings(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.settings)
        if self.fetch_wait_ms is not None:
            out["kafka.consumer.fetchMaxWaitMs"] = self.fetch_wait_ms
        return out


@contextlib.contextmanager
def producer_linger(linger_ms: int | None) -> Iterator[None]:
    """The load generator (``SteadyProducer``, ``linger_ms=5``) with another linger."""
    if linger_ms is None:
        yield
        return
    from tests.support import harness

    original = harness.AIOKafkaProducer  # type: ignore[attr-defined]

    def make(**kwargs: Any) -> Any:
        return original(**{**kwargs, "linger_ms": linger_ms})

    setattr(harness, "AIOKafkaProducer", make)  # noqa: B010 - the module's global, for run()
    try:
        yield
    finally:
        setattr(harness, "AIOKafkaProducer", original)  # noqa: B010


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

    async def latency(
        self, consumer: str, variant: LatencyVariant | None = None, rnd: int = 1
    ) -> dict[str, Any]:
        """Produce -> handled at a steady rate (no-op handler that records), for
        the service (``consumer`` ``keyed``/``actor``) or the plain loop
        (``plain``: the floor, the same producer, broker and fetch wait)."""
        a = self.args
        variant = variant or LatencyVariant()
        self.n += 1
        topic = f"svc-steady-{self.n}"
        await self.broker.create_topics({topic: a.partitions})
        record = self.workdir / f"{topic}.records"
        marks = self.workdir / f"{topic}.marks"
        plain: PlainLoop | None = None
        svc: ShippedService | None = None
        try:
            if consumer == "plain":
                env = {"RECORD_FILE": str(record), "BENCH_MARKS": str(marks)}
                plain = PlainLoop(
                    self.broker.bootstrap, topic, f"g-{topic}", env, record=True,
                    fetch_max_wait_ms=variant.fetch_wait_ms or 20,
                )  # fmt: skip
                proc = plain.proc
                await wait_for(
                    lambda: marks.exists() and b"assigned" in marks.read_bytes(),
                    60,
                    f"{topic} plain loop assigned",
                )
            else:
                svc = ShippedService(
                    self.broker.bootstrap, topic, self.workdir, group=f"g-{topic}",
                    mode=consumer, handler=RECORD_HANDLER, latency_ms=0.0, name=topic,
                    overrides=variant.service_settings(),
                )  # fmt: skip
                await svc.start(timeout=60)
                assert svc.proc is not None
                record, proc = svc.record, svc.proc
            producer = SteadyProducer(
                self.broker.bootstrap, topic, partitions=a.partitions, aggregates=a.aggregates
            )
            cpu0 = (cpu_seconds(proc.pid), cpu_seconds(self.broker.pid))
            begun = time.monotonic_ns()
            with producer_linger(variant.linger_ms):
                stats = await producer.run(a.rate, a.duration)
            await wait_for(lambda: count_handled(record) >= stats.acked, 60, f"{topic} handled")
            cpu1 = (cpu_seconds(proc.pid), cpu_seconds(self.broker.pid))
            if svc is not None:
                await svc.stop()
        finally:
            if plain is not None:
                plain.stop()
            if svc is not None:
                svc.cleanup()
        skip = begun + 1_000_000_000
        handled = [r for r in read_records(record) if r.sent_ns >= skip]
        lat = [(r.end_ns - r.sent_ns) / 1e6 for r in handled]
        # The handler's start: for the service, what came before the handler
        # (producer, broker, fetch, intake, dispatch, the executor's queue); for
        # the plain loop, the same up to its turn in its batch.
        to_start = [(r.start_ns - r.sent_ns) / 1e6 for r in handled]
        events = max(1, stats.acked)
        row = {
            "consumer": consumer,
            "mode": consumer,
            "variant": variant.name,
            "round": rnd,
            "rate": a.rate,
            "seconds": a.duration,
            "produced_per_s": round(stats.rate),
            "events": len(lat),
            **_percentiles(lat),
            "to_handler_start": _percentiles(to_start),
            # Whole process (and broker) over the run, idle time after it included.
            "cpu_us_per_event": round((cpu1[0] - cpu0[0]) * 1e6 / events, 2),
            "broker_cpu_us_per_event": round((cpu1[1] - cpu0[1]) * 1e6 / events, 2),
            # The machine's 1-minute load average at the row's end: the other jobs'
            # load moves the tail far more than any setting does.
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        if consumer == "plain":
            commits = [
                float(x)
                for line in marks.read_text().splitlines()
                if line.startswith("commits ")
                for x in line.split()[1:]
            ]
            row["commit_ms"] = _percentiles(commits)
        print(f"latency {consumer} {variant.name} r{rnd}: {row}", file=sys.stderr)
        return row

    async def idle(self, variant: LatencyVariant, seconds: float) -> dict[str, Any]:
        """Cores the KEYED service and the broker take with nothing to consume."""
        self.n += 1
        topic = f"svc-idle-{self.n}"
        await self.broker.create_topics({topic: self.args.partitions})
        svc = ShippedService(
            self.broker.bootstrap, topic, self.workdir, group=f"g-{topic}", mode="keyed",
            handler=RECORD_HANDLER, latency_ms=0.0, name=topic,
            overrides=variant.service_settings(),
        )  # fmt: skip
        try:
            await svc.start(timeout=60)
            assert svc.proc is not None
            pid = svc.proc.pid
            await asyncio.sleep(1.0)  # past the start-up's own work (not a sync point)
            c0, b0, t0 = cpu_seconds(pid), cpu_seconds(self.broker.pid), time.monotonic()
            await asyncio.sleep(seconds)
            c1, b1, t1 = cpu_seconds(pid), cpu_seconds(self.broker.pid), time.monotonic()
            await svc.stop()
        finally:
            svc.cleanup()
        row = {
            "variant": variant.name,
            "seconds": round(t1 - t0, 2),
            "service_cores": round((c1 - c0) / (t1 - t0), 4),
            "broker_cores": round((b1 - b0) / (t1 - t0), 4),
        }
        print(f"idle {variant.name}: {row}", file=sys.stderr)
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
    for s in report.get("summary", ()):
        name = LABELS[s["consumer"]] + ("" if s["variant"] == "current" else f" ({s['variant']})")
        out.append(
            f"| {name} | {s['handler']} | {rng(s['events_per_s_range'], ',.0f')} "
            f"| {rng(s['ratio_range'], '.2f')} "
            f"| {'-' if s['cpu_ratio'] is None else format(s['cpu_ratio'], '.2f')} "
            f"| {s['cpu_us_per_event']} ({s['main_thread_cpu_us_per_event']}) "
            f"| {s['broker_cpu_us_per_event']} |"
        )
    if report.get("latency_summary"):
        rate = report["latency"][0]["rate"] if report.get("latency") else 0
        out += [
            "",
            (
                f"produce->handled at a steady {rate:,.0f} events/s (medians over "
                f"{report['latency_summary'][0]['rounds']} round(s); P99 range in brackets):"
            ),
            "",
            (
                "| consumer | variant | p50 ms | p99 ms | max ms | p99 to handler start "
                "| CPU µs/event | broker |"
            ),
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for lat in report["latency_summary"]:
            out.append(
                f"| {LABELS[lat['consumer']]} | {lat['variant']} | {lat['p50_ms']} "
                f"| {lat['p99_ms']} ({rng(lat['p99_ms_range'], '.1f')}) | {lat['max_ms']} "
                f"| {lat['to_handler_start_p99_ms']} | {lat['cpu_us_per_event']} "
                f"| {lat['broker_cpu_us_per_event']} |"
            )
    sw = report.get("switch")
    if sw:
        out.append("")
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
    for idle in report.get("idle", ()):
        out.append(
            f"idle KEYED service, {idle['variant']}: {idle['service_cores']} cores, "
            f"broker {idle['broker_cores']} cores ({idle['seconds']} s)"
        )
    for lat in report.get("latency_plain", ()):
        cm = lat.get("commit_ms")
        if cm:
            out.append(
                f"plain loop's commits (latency row, round {lat['round']}): "
                f"p50 {cm['p50_ms']} ms, max {cm['max_ms']} ms"
            )
    for fl in report.get("sleep_floor", ()):
        out.append(
            f"bare uvloop, {fl['tasks']} task(s) awaiting sleep({fl['sleep_s']:g}): "
            f"{fl['sleeps_per_s']:,} sleeps/s, {fl['cpu_us_per_sleep']} CPU µs per sleep"
        )
    if report.get("profile"):
        from bench.profile_breakdown import table as breakdown_table

        for mode, prof in report["profile"].items():
            title = (
                f"profile {mode}, {prof.get('handler', 'noop')} handler: "
                f"{prof['samples']:,} samples, "
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
        skip_rows = args.profile_only or args.latency_only
        for rnd in range(1, 0 if skip_rows else args.rounds + 1):
            for consumer, handler in ROWS:
                row = await bench.throughput(consumer, handler, rnd)
                if "scrape" in row:
                    report["metrics"] = row.pop("scrape")
                rows.append(row)
                if baseline is not None and consumer != "plain":
                    rows.append(
                        await bench.throughput(consumer, handler, rnd, "baseline", baseline)
                    )
                if consumer != "plain":
                    for spec in args.service_set:
                        v = LatencyVariant.parse(spec)
                        rows.append(
                            await bench.throughput(
                                consumer, handler, rnd, v.name, overrides=v.service_settings()
                            )
                        )
                if args.ablate_timeout and consumer != "plain" and handler == "noop":
                    for variant, root in (("no-timeout", ROOT), ("baseline-no-timeout", baseline)):
                        if root is not None:
                            rows.append(
                                await bench.throughput(
                                    consumer, handler, rnd, variant, root, overrides=NO_TIMEOUT
                                )
                            )
        if rows:
            report["throughput"] = rows
            report["summary"] = summarise(rows)
        if not (args.profile_only or args.throughput_only):
            lat = await latency_rows(bench, args)
            # "latency": the service as shipped (KEYED, ACTOR); "latency_plain":
            # the plain loop beside it (the floor); "latency_variants": the rest.
            report["latency"] = [
                r for r in lat if r["consumer"] != "plain" and r["variant"] == "default"
            ]
            report["latency_plain"] = [
                r for r in lat if r["consumer"] == "plain" and r["variant"] == "default"
            ]
            report["latency_variants"] = [r for r in lat if r["variant"] != "default"]
            report["latency_summary"] = summarise_latency(lat)
            if args.idle:
                report["idle"] = [
                    await bench.idle(v, args.idle)
                    for v in [LatencyVariant()]
                    + [LatencyVariant.parse(x) for x in args.latency_variant]
                ]
            if not args.latency_only:
                report["switch"] = await bench.switch()
        if args.profile:
            report["profile"] = await profile(bench, Path(args.profile))
        if args.sleep_floor:
            report["sleep_floor"] = await asyncio.to_thread(sleep_floor)
    finally:
        await asyncio.to_thread(broker.stop)
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


async def latency_rows(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The latency rows: per round, for the shipped configuration and each
    ``--latency-variant``, the plain loop, KEYED and ACTOR (interleaved)."""
    variants = [LatencyVariant()] + [LatencyVariant.parse(v) for v in args.latency_variant]
    return [
        await bench.latency(consumer, variant, rnd)
        for rnd in range(1, args.latency_rounds + 1)
        for variant in variants
        for consumer in ("plain", "keyed", "actor")
    ]


def summarise_latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (consumer, variant): medians over the rounds, and the P99's range."""
    out = []
    for consumer, variant in dict.fromkeys((r["consumer"], r["variant"]) for r in rows):
        sel = [r for r in rows if (r["consumer"], r["variant"]) == (consumer, variant)]

        def med(key: str, sel: list[dict[str, Any]] = sel) -> float:
            return round(float(statistics.median(r[key] for r in sel)), 2)

        out.append(
            {
                "consumer": consumer,
                "variant": variant,
                "rounds": len(sel),
                "p50_ms": med("p50_ms"),
                "p99_ms": med("p99_ms"),
                "p99_ms_range": [min(r["p99_ms"] for r in sel), max(r["p99_ms"] for r in sel)],
                "max_ms": med("max_ms"),
                "to_handler_start_p99_ms": round(
                    statistics.median(r["to_handler_start"]["p99_ms"] for r in sel), 2
                ),
                "cpu_us_per_event": med("cpu_us_per_event"),
                "broker_cpu_us_per_event": med("broker_cpu_us_per_event"),
            }
        )
    return out


async def profile(bench: Bench, outdir: Path) -> dict[str, Any]:
    """KEYED and ACTOR under py-spy, per ``--profile-handler``; keyed by
    ``keyed``/``actor`` for the no-op handler, ``keyed-1ms``/``actor-1ms`` else."""
    from bench.profile_breakdown import breakdown

    os.makedirs(outdir, exist_ok=True)
    result: dict[str, Any] = {}
    for handler in bench.args.profile_handler or ["noop"]:
        for mode in ("keyed", "actor"):
            raw = outdir / f"{mode}-{handler}.txt"
            row = await bench.throughput(mode, handler, 0, "profiled", profile=raw)
            result[mode if handler == "noop" else f"{mode}-{handler}"] = {
                "handler": handler,
                "raw_file": raw.name,
                "py_spy": "blocking" if bench.args.profile_blocking else "nonblocking",
                "events_per_s": row["events_per_s"],
                "cpu_us_per_event": row["cpu_us_per_event"],
                "main_thread_cpu_us_per_event": row["main_thread_cpu_us_per_event"],
                **breakdown(raw.read_text(), row["main_thread_cpu_us_per_event"]),
            }
    return result


#: The sleep floor's program: ``tasks`` tasks, each awaiting ``asyncio.sleep(delay)``
#: in a loop (``delay`` 0: ``sleep(0)``, a bare yield), on uvloop, for ``seconds``;
#: prints the sleeps done and the process's CPU seconds over them.
_SLEEP_FLOOR = """
import asyncio, os, sys, time
import uvloop

tasks, delay, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
done = 0

async def one(stop):
    global done
    sleep = asyncio.sleep
    while not stop[0]:
        await sleep(delay)
        done += 1

async def main():
    stop = [False]
    workers = [asyncio.ensure_future(one(stop)) for _ in range(tasks)]
    await asyncio.sleep(0.5)  # warm
    n0, c0, t0 = done, time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n1, c1, t1 = done, time.process_time(), time.monotonic()
    stop[0] = True
    await asyncio.gather(*workers)
    print(n1 - n0, c1 - c0, t1 - t0)

uvloop.run(main())
"""


def sleep_floor(seconds: float = 5.0) -> list[dict[str, Any]]:
    """CPU µs per ``asyncio.sleep`` of a bare uvloop program (no Kafka, no pool):
    what the 1 ms handler's own wait costs at least, per event."""
    out = []
    for tasks, delay in ((256, 0.001), (256, 0.0), (1, 0.001)):
        proc = subprocess.run(
            [sys.executable, "-c", _SLEEP_FLOOR, str(tasks), str(delay), str(seconds)],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        )  # fmt: skip
        n, cpu, wall = proc.stdout.split()
        sleeps = int(n)
        row = {
            "tasks": tasks,
            "sleep_s": delay,
            "sleeps_per_s": round(sleeps / float(wall)),
            "cpu_cores": round(float(cpu) / float(wall), 3),
            "cpu_us_per_sleep": round(float(cpu) * 1e6 / max(1, sleeps), 2),
        }
        print(f"sleep floor: {row}", file=sys.stderr)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = " (default: %(default)s)"
    p.add_argument("--events", type=int, default=200_000, help="backlog size, events" + d)
    p.add_argument(
        "--aggregates", type=int, default=10_000, help="aggregates of the backlog and stream" + d
    )
    p.add_argument("--partitions", type=int, default=8, help="partitions of every topic" + d)
    p.add_argument(
        "--plain-1ms-events",
        type=int,
        default=2_000,
        help="events the plain loop with the 1 ms handler drains (it is slow)" + d,
    )
    p.add_argument("--rounds", type=int, default=1, help="throughput rounds, rows interleaved" + d)
    p.add_argument(
        "--rate", type=float, default=10_000, help="latency and switch rows: events/s" + d
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="latency rows: seconds of production" + d
    )
    p.add_argument(
        "--switches", type=int, default=100, help="SetPoolMode calls of the switch row" + d
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per throughput row at most" + d
    )
    p.add_argument("--json", default="bench/results/service_bench.json", help="report file" + d)
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run (~1 min)")
    p.add_argument(
        "--latency-only", action="store_true", help="only the latency rows (no throughput, switch)"
    )
    p.add_argument(
        "--throughput-only", action="store_true", help="only the throughput rows (and --profile)"
    )
    p.add_argument(
        "--latency-rounds", type=int, default=1, help="latency rounds, rows interleaved" + d
    )
    p.add_argument(
        "--latency-variant",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run the latency rows with SPEC: comma-separated fetch=MS (both consumers' "
        "fetch wait), linger=MS (the load generator's), KEY=VALUE (a service --set); repeatable",
    )
    p.add_argument(
        "--service-set",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run the KEYED and ACTOR throughput rows with SPEC (fetch=MS, "
        "KEY=VALUE service settings, comma-separated); repeatable",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="S",
        help="also measure an idle KEYED service's cores for S seconds, per latency variant",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="then drain the backlog in KEYED and ACTOR under py-spy (raw files in DIR)",
    )
    p.add_argument("--profile-only", action="store_true", help="only the --profile runs")
    p.add_argument(
        "--profile-handler",
        choices=sorted(HANDLERS),
        action="append",
        help="the handlers of the --profile runs (repeatable; default: noop)",
    )
    p.add_argument(
        "--profile-blocking",
        action="store_true",
        help="py-spy stops the process for each sample (biased to system calls)",
    )
    p.add_argument(
        "--baseline-root",
        metavar="DIR",
        help="also run every service row with the service code of the checkout in DIR",
    )
    p.add_argument(
        "--ablate-timeout",
        action="store_true",
        help="also KEYED/ACTOR no-op with pool.handlerTimeoutS=null (the timeout's own cost)",
    )
    p.add_argument(
        "--sleep-floor",
        action="store_true",
        help="also time a bare uvloop program: 256 tasks each awaiting asyncio.sleep(0.001)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    # The plain loop's child process.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain-record", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain-fetch-wait-ms", type=int, default=20, help=argparse.SUPPRESS)
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
