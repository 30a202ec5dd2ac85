"""The real service as a subprocess, a steady producer, the topic read back,
and the accounting of what was handled: shared by the process tests
(``tests/server/test_fleet_process.py``) and the reliability campaigns
(``bench/campaigns/_harness.py`` re-exports all of it).

- :class:`ServiceProcess`: ``python -m server`` with the recording handler
  :data:`HANDLER` (``bench.campaigns._handler``, run inside the service
  process: it appends a line per handled event and per failed attempt to
  ``RECORD_FILE``); :func:`read_records` and friends read that file back.
- :class:`SteadyProducer`: campaign envelopes at a steady rate.
- :func:`read_topic`: the topic's records, the ground truth; :func:`account`
  judges the handled records against it (lost, reordered, duplicated).

Everything runs on loopback; every wait has a deadline (:func:`wait_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from clients import AsyncPoolControlClient

__all__ = [
    "HANDLER",
    "ROOT",
    "Accounting",
    "Decorate",
    "Failure",
    "Handled",
    "ProduceStats",
    "ServiceProcess",
    "SteadyProducer",
    "TopicRecord",
    "account",
    "count_handled",
    "ends_of",
    "num",
    "percentile",
    "read_failures",
    "read_records",
    "read_timeline",
    "read_topic",
    "scrape_metrics",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[2]
#: The handler the service process runs (a module path, imported there, not here).
HANDLER = "bench.campaigns._handler:handle"


# ----------------------------------------------------------------- waiting


async def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> float:
    """Poll ``predicate`` (sync or async) until truthy; returns the seconds waited.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(interval)


# ------------------------------------------------------- records (handler)


@dataclass(frozen=True, slots=True)
class Handled:
    """One ``H`` line of the record file: an event the handler finished."""

    pid: int
    partition: int
    offset: int
    aggregate_id: str
    seq: int
    sent_ns: int
    start_ns: int
    end_ns: int


@dataclass(frozen=True, slots=True)
class Failure:
    """One ``F`` line: a failed attempt."""

    pid: int
    partition: int
    offset: int
    aggregate_id: str
    seq: int
    attempt: int
    reason: str
    at_ns: int


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with path.open("rb") as fh:
        data = fh.read().decode(errors="replace")
    # A line torn by kill -9 has no newline: drop whatever follows the last one.
    return [line.split(",") for line in data[: data.rfind("\n") + 1].splitlines()]


def _handled(f: list[str]) -> Handled:
    return Handled(int(f[1]), int(f[2]), int(f[3]), f[4], *(int(x) for x in f[5:9]))


def _failure(f: list[str]) -> Failure:
    return Failure(int(f[1]), int(f[2]), int(f[3]), f[4], int(f[5]), int(f[6]), f[7], int(f[8]))


def read_records(path: Path) -> list[Handled]:
    """Every handled event in the record file, in the order they finished."""
    return [_handled(f) for f in _lines(path) if len(f) == 9 and f[0] == "H"]


def read_failures(path: Path) -> list[Failure]:
    """Every failed attempt in the record file."""
    return [_failure(f) for f in _lines(path) if len(f) == 9 and f[0] == "F"]


def read_timeline(path: Path) -> list[Handled | Failure]:
    """Every handled event and failed attempt, in the order they happened
    (one process: the record file is appended from its event loop)."""
    return [
        _handled(f) if f[0] == "H" else _failure(f)
        for f in _lines(path)
        if len(f) == 9 and f[0] in ("H", "F")
    ]


def count_handled(path: Path) -> int:
    """Cheap: number of ``H`` lines so far (for progress waits)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    return data.count(b"\nH,") + int(data.startswith(b"H,"))


# ------------------------------------------------------------ the topic


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record as stored in the topic (the ground truth)."""

    partition: int
    offset: int
    aggregate_id: str
    seq: int
    fail: str | None  # "always", "non-retryable", "transient" or None
    headers: tuple[tuple[str, bytes], ...] = ()


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 60.0,
    parse: bool = True,
    idle: float = 0.5,
) -> list[TopicRecord]:
    """Every record of ``topic`` from the beginning to its current end.

    With ``parse`` the value is read as a campaign envelope (aggregate, seq,
    failure marker); without, only partition/offset/headers/key are kept.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    out: list[TopicRecord] = []
    try:
        parts = await _partitions(consumer, topic, timeout)
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Tansu lists a partition's end as its last batch's base offset + 1 (a
        # lower bound): read at least that far, then until nothing comes for
        # ``idle`` seconds (production has finished when this is called).
        ends = await consumer.end_offsets(tps)
        reached: dict[TopicPartition, int] = dict.fromkeys(tps, 0)
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} back: {len(out)} records within {timeout}s")
            batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.monotonic()
            for tp, records in batches.items():
                out.extend(_topic_record(r, parse) for r in records)
                if records:
                    reached[tp] = records[-1].offset + 1
                    quiet_since = now
            if now - quiet_since >= idle and all(reached[tp] >= ends[tp] for tp in tps):
                break
    finally:
        await consumer.stop()
    return out


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no metadata for {topic}")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


def _topic_record(r: Any, parse: bool) -> TopicRecord:
    headers = tuple((k, bytes(v)) for k, v in (r.headers or ()))
    if not parse:
        key = r.key.decode(errors="replace") if r.key else ""
        return TopicRecord(r.partition, r.offset, key, -1, None, headers)
    try:
        body = json.loads(r.value)
        payload = body.get("payload") or {}
        fail = payload.get("fail")
        if payload.get("fail_times"):
            fail = "transient"
        return TopicRecord(
            r.partition, r.offset, str(body.get("aggregate_id")), int(payload["seq"]), fail, headers
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return TopicRecord(r.partition, r.offset, "", -1, "unparseable", headers)


def ends_of(truth: Iterable[TopicRecord], partitions: int) -> dict[int, int]:
    """End offset (last + 1) of each of the topic's ``partitions`` in the records
    read back (0 for an empty one): what a consumer that finished everything
    has committed, keyed like :func:`committed_offsets`."""
    ends = dict.fromkeys(range(partitions), 0)
    for r in truth:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


# ------------------------------------------------------------- accounting


@dataclass
class Accounting:
    """What was lost, reordered, duplicated, judged from the handler's records
    against the topic's contents.

    - ``expected``: events that must be handled (every topic record but those
      meant to fail permanently).
    - ``lost``: expected events never handled.
    - ``reordered``: events whose *first* handling came after the first
      handling of a later offset of the same aggregate (offset order broken).
    - ``overlapped``: two events of one aggregate handled at once by one
      process (start before the previous one's end).
    - ``duplicated``: handlings beyond the first (re-deliveries).
    - ``rewinds``: per process and aggregate, a handling of an offset not
      above the previous one (a re-delivery after a restart or rebalance).
    - ``unexpected``: handled events meant to fail permanently, or not in the topic.
    """

    expected: int = 0
    handled_distinct: int = 0
    handlings: int = 0
    lost: int = 0
    reordered: int = 0
    overlapped: int = 0
    duplicated: int = 0
    rewinds: int = 0
    unexpected: int = 0
    processes: int = 0
    lost_sample: list[tuple[int, int]] = field(default_factory=list)
    reordered_sample: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing lost, reordered, overlapped or unexpected."""
        return not (self.lost or self.reordered or self.overlapped or self.unexpected)

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "handled_distinct": self.handled_distinct,
            "handlings": self.handlings,
            "lost": self.lost,
            "reordered": self.reordered,
            "overlapped": self.overlapped,
            "duplicated": self.duplicated,
            "rewinds": self.rewinds,
            "unexpected": self.unexpected,
            "processes": self.processes,
            "lost_sample": [list(x) for x in self.lost_sample],
            "reordered_sample": self.reordered_sample,
        }


def account(
    truth: Sequence[TopicRecord],
    records: Sequence[Handled],
    *,
    permanent: Iterable[tuple[int, int]] | None = None,
) -> Accounting:
    """Judge ``records`` (handler lines, in file order) against ``truth``.

    ``permanent``: ``(partition, offset)`` of events that must never be handled
    (by default the topic records marked ``fail: always|non-retryable``).
    """
    if permanent is None:
        permanent = {
            (r.partition, r.offset) for r in truth if r.fail in ("always", "non-retryable")
        }
    permanent = set(permanent)
    in_topic = {(r.partition, r.offset) for r in truth}
    expected = in_topic - permanent
    acc = Accounting(expected=len(expected), handlings=len(records))
    seen: set[tuple[int, int]] = set()
    # aggregate -> highest (partition, offset) first-handled so far
    high: dict[str, tuple[int, int]] = {}
    # (pid, aggregate) -> last handling
    last: dict[tuple[int, str], Handled] = {}
    pids: set[int] = set()
    for rec in records:
        pids.add(rec.pid)
        key = (rec.partition, rec.offset)
        if key not in in_topic or key in permanent:
            acc.unexpected += 1
        if key in seen:
            acc.duplicated += 1
        else:
            seen.add(key)
            top = high.get(rec.aggregate_id)
            if top is not None and key < top:
                acc.reordered += 1
                if len(acc.reordered_sample) < 10:
                    acc.reordered_sample.append(
                        f"{rec.aggregate_id}: {key} first handled after {top}"
                    )
            else:
                high[rec.aggregate_id] = key
        prev = last.get((rec.pid, rec.aggregate_id))
        if prev is not None:
            if rec.start_ns < prev.end_ns:
                acc.overlapped += 1
            if (rec.partition, rec.offset) <= (prev.partition, prev.offset):
                acc.rewinds += 1
        last[(rec.pid, rec.aggregate_id)] = rec
    missing = sorted(expected - seen)
    acc.lost = len(missing)
    acc.lost_sample = missing[:10]
    acc.handled_distinct = len(seen & expected)
    acc.processes = len(pids)
    return acc


def num(value: float) -> str:
    """``12345`` -> ``"12 345"`` (thin grouping for the report)."""
    return f"{value:,.0f}".replace(",", " ")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank); 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -------------------------------------------------------------- producing


@dataclass
class ProduceStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "rate_per_s": round(self.rate),
            "errors": self.errors[:5],
        }


#: ``decorate(aggregate_id, seq) -> extra payload fields`` (e.g. failure markers).
Decorate = Callable[[str, int], Mapping[str, Any] | None]


class SteadyProducer:
    """Produces campaign envelopes at a steady rate, in 10 ms ticks.

    Aggregate ``i`` is ``f"{prefix}-{i}"`` and lives on partition
    ``i % partitions`` (as a keyed producer would place it); each aggregate's
    events carry ``seq`` 0, 1, 2, ... and ``t`` (``time.monotonic_ns()`` at
    send; the clock is shared by the processes of one machine). Aggregates are
    picked round-robin. ``decorate`` may add payload fields per event.
    Production is bounded by ``seconds`` and ``max_events``.
    """

    TICK = 0.01

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        partitions: int,
        aggregates: int,
        prefix: str = "agg",
        decorate: Decorate | None = None,
        aggregate_ids: Sequence[str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.ids = list(aggregate_ids or [f"{prefix}-{i}" for i in range(aggregates)])
        self.decorate = decorate
        self.seqs: dict[str, int] = defaultdict(int)
        self._cursor = itertools.cycle(range(len(self.ids)))

    def _value(self, agg: str, seq: int) -> bytes:
        payload: dict[str, Any] = {"seq": seq, "t": time.monotonic_ns()}
        if self.decorate is not None:
            extra = self.decorate(agg, seq)
            if extra:
                payload.update(extra)
        return json.dumps(
            {
                "event_id": f"{agg}:{seq}",
                "aggregate_id": agg,
                "event_type": "CampaignEvent",
                "event_version": 1,
                "timestamp": "2026-01-01T00:00:00Z",
                "payload": payload,
            },
            separators=(",", ":"),
        ).encode()

    async def run(
        self,
        rate: float,
        seconds: float,
        *,
        max_events: int | None = None,
        stop: asyncio.Event | None = None,
        paused: Callable[[], bool] | None = None,
    ) -> ProduceStats:
        """Send ``rate`` events/s for ``seconds`` (or until ``stop``/``max_events``).

        Returns when every send is acknowledged or failed. ``paused()`` true
        skips ticks (nothing is sent while it holds).
        """
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=False,
            linger_ms=5,
            max_batch_size=512 * 1024,
            request_timeout_ms=40_000,
            acks=1,
        )
        await producer.start()
        stats = ProduceStats()
        pending: list[tuple[asyncio.Future[Any], int]] = []
        started = time.monotonic()
        limit = max_events if max_events is not None else int(rate * seconds) + 1
        try:
            tick = 0
            while stats.sent < limit:
                now = time.monotonic()
                if now - started >= seconds or (stop is not None and stop.is_set()):
                    break
                if paused is None or not paused():
                    due = min(limit, int((now - started) * rate)) - stats.sent
                    pending.extend(await self._send_tick(producer, due))
                    stats.sent += max(0, due)
                tick += 1
                await asyncio.sleep(max(0.0, started + tick * self.TICK - time.monotonic()))
                if len(pending) > 256:
                    pending = await self._reap(pending, stats, wait=False)
            await self._reap(pending, stats, wait=True)
        finally:
            stats.seconds = time.monotonic() - started
            await producer.stop()
        return stats

    async def _send_tick(
        self, producer: AIOKafkaProducer, due: int
    ) -> list[tuple[asyncio.Future[Any], int]]:
        if due <= 0:
            return []
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for _ in range(due):
            i = next(self._cursor)
            agg = self.ids[i]
            seq = self.seqs[agg]
            self.seqs[agg] = seq + 1
            by_partition[i % self.partitions].append((agg.encode(), self._value(agg, seq)))
        futures = []
        for p, items in by_partition.items():
            batch = producer.create_batch()
            n = 0
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append((await producer.send_batch(batch, self.topic, partition=p), n))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                    n = 0
                n += 1
            futures.append((await producer.send_batch(batch, self.topic, partition=p), n))
        return futures

    @staticmethod
    async def _reap(
        pending: list[tuple[asyncio.Future[Any], int]], stats: ProduceStats, *, wait: bool
    ) -> list[tuple[asyncio.Future[Any], int]]:
        keep = []
        for fut, n in pending:
            if not wait and not fut.done():
                keep.append((fut, n))
                continue
            try:
                await fut
            except Exception as exc:
                stats.failed += n
                stats.errors.append(repr(exc))
            else:
                stats.acked += n
        return keep


# --------------------------------------------------------------- service


class ServiceProcess:
    """``python -m server`` pointed at the campaign broker, recording to ``record``.

    ``start()`` waits for the banner and reads the gRPC and metrics addresses
    from it; ``kill()`` sends SIGKILL; ``stop()`` SIGTERM and waits for exit
    code 0. Restart by calling ``start()`` again (a new process, same files).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        workdir: Path,
        *,
        group: str | None = None,
        mode: str = "keyed",
        latency_ms: float = 0.0,
        settings: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "service",
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.workdir = workdir
        self.group = group or f"{topic}-g"
        self.mode = mode
        self.latency_ms = latency_ms
        self.record = workdir / f"{name}.records"
        self.settings: dict[str, object] = {
            "log.format": "json",
            "log.level": "warning",
            "kafka.consumer.sessionTimeoutMs": 2000,
            "kafka.consumer.heartbeatIntervalMs": 500,
            "kafka.consumer.commitIntervalMs": 200,
            "kafka.consumer.revokeTimeoutMs": 10000,
            "pool.drainTimeoutS": 20,
            **(settings or {}),
        }
        self.env = dict(env or {})
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.grpc_address = ""
        self.metrics_address = ""
        self.pids: list[int] = []

    @property
    def out(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.out"

    @property
    def err(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.err"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "server",
            "--brokers", self.bootstrap,
            "--topic", self.topic,
            "--group-id", self.group,
            "--mode", self.mode,
            "--handler", HANDLER,
            "--grpc-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
        ]  # fmt: skip
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    async def start(self, timeout: float = 30.0, *, wait_assigned: bool = True) -> None:
        """Start a new process; wait for its banner (and partitions, by default)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RECORD_FILE": str(self.record),
            "HANDLER_LATENCY_MS": str(self.latency_ms),
            **self.env,
        }
        with self.out.open("wb") as o, self.err.open("wb") as e:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                self.command(), env=env, stdout=o, stderr=e, cwd=ROOT
            )
        self.pids.append(self.proc.pid)

        def banner() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.stderr_tail()}")
            text = self.out.read_text(errors="replace")
            if "look at it:" not in text:
                return False
            grpc = re.search(r"gRPC\s+(\S+)", text)
            metrics = re.search(r"metrics\s+http://(\S+)/metrics", text)
            self.grpc_address = grpc.group(1) if grpc else ""
            self.metrics_address = metrics.group(1) if metrics else ""
            return True

        await wait_for(banner, timeout, f"{self.name} banner")
        if wait_assigned:
            await wait_for(self.assigned, timeout, f"{self.name} partition assignment", 0.1)

    async def assigned(self) -> bool:
        """True when the service reports at least one assigned partition."""
        try:
            async with self.client(timeout=2.0) as client:
                status = await client.status()
        except Exception:
            return False
        return len(status.partitions) > 0

    def client(self, timeout: float = 10.0) -> AsyncPoolControlClient:
        """A gRPC control client to this process (``async with``)."""
        if not self.grpc_address:
            raise RuntimeError(f"{self.name}: no gRPC address (not started?)")
        return AsyncPoolControlClient(self.grpc_address, timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) and, for SIGKILL, reap the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await wait_for(lambda: self.proc.poll() is not None, timeout, f"{self.name} exit")  # type: ignore[union-attr]
            except TimeoutError:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.err.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_address)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def scrape_metrics(address: str, timeout: float = 5.0) -> dict[str, float]:
    """``/metrics`` of ``address`` as ``{metric name: sum over its series}``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] += float(value)
    return dict(out)
