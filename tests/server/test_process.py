"""``python -m server`` as real processes: kill -9 and restart, a second
instance joining and leaving, SIGTERM. The handler
(``tests/server/recording_handler.py``) appends a line per handled event, so
the tests judge from what was actually handled.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from server._broker import EmbeddedBroker
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, committed_offsets, envelope, produce
from tests.server.recording_handler import Record, read_records

#: Every test here starts the service as a process.
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc = proc
        self.out = out
        self.err = err

    def started(self) -> bool:
        assert self.proc.poll() is None, f"server exited early:\n{self.err.read_text()[-3000:]}"
        return "pool-server is running" in self.out.read_text()

    def stderr_tail(self) -> str:
        return self.err.read_text()[-3000:]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    procs: list[ServerProcess] = []

    def _spawn(
        bootstrap: str, topic: str, group: str, record: Path, latency_ms: float
    ) -> ServerProcess:
        n = len(procs)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RECORD_FILE": str(record),
            "RECORD_LATENCY_MS": str(latency_ms),
        }
        cmd = [
            sys.executable, "-m", "server",
            "--brokers", bootstrap,
            "--topic", topic,
            "--group-id", group,
            "--handler", "tests.server.recording_handler:handle",
            "--grpc-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
            "--set", "log.format=json",
            "--set", "kafka.consumer.sessionTimeoutMs=2000",
            "--set", "kafka.consumer.heartbeatIntervalMs=500",
            "--set", "kafka.consumer.commitIntervalMs=100",
            "--set", "kafka.consumer.revokeTimeoutMs=10000",
            "--set", "pool.drainTimeoutS=10",
        ]  # fmt: skip
        out, err = tmp_path / f"server{n}.out", tmp_path / f"server{n}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(cmd, env=env, stdout=o, stderr=e, cwd=ROOT)
        sp = ServerProcess(proc, out, err)
        procs.append(sp)
        return sp

    yield _spawn
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(10)


def _handled(records: list[Record]) -> set[tuple[int, int]]:
    return {(r.partition, r.offset) for r in records}


def _check_order_across_owners(records: list[Record], per_aggregate: int) -> None:
    """Per aggregate, in handling order across every process: never two at once,
    never a skip forward (a restart after a rebalance or a crash may go back)."""
    by_agg: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_agg[r.aggregate_id].append(r)
    for agg, recs in by_agg.items():
        recs.sort(key=lambda r: r.start_ns)
        assert recs[0].seq == 0, agg
        for prev, cur in itertools.pairwise(recs):
            assert cur.seq <= prev.seq + 1, f"{agg}: {prev.seq} then {cur.seq} (skipped ahead)"
            assert cur.start_ns >= prev.end_ns, f"{agg}: two events handled at once"
        assert {r.seq for r in recs} == set(range(per_aggregate)), agg


async def test_kill_9_mid_stream_then_restart_loses_nothing(
    broker: EmbeddedBroker, make_topic: MakeTopic, spawn: object, tmp_path: Path
) -> None:
    partitions, aggregates, per_aggregate = 4, 100, 30
    topic = await make_topic(partitions=partitions)
    group = f"{topic}-g"
    ends = await produce(
        broker.bootstrap, topic, aggregate_events(aggregates, per_aggregate, partitions)
    )
    everything = {(p, o) for p, end in ends.items() for o in range(end)}
    record = tmp_path / "handled.log"
    first = spawn(broker.bootstrap, topic, group, record, latency_ms=20)  # type: ignore[operator]
    await assert_eventually(first.started, timeout=20)
    await assert_eventually(lambda: len(read_records(record)) >= 500, timeout=30)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    handled_before = _handled(read_records(record))
    assert len(handled_before) < len(everything), "the kill came too late to be mid-stream"
    committed = await committed_offsets(broker.bootstrap, group, topic, partitions)
    # No committed offset is ahead of an event the dead process had not finished.
    for p, c in committed.items():
        for o in range(c or 0):
            assert (p, o) in handled_before, f"committed {c} on partition {p}, {o} unhandled"

    second = spawn(broker.bootstrap, topic, group, record, latency_ms=20)  # type: ignore[operator]
    await assert_eventually(second.started, timeout=20)
    await assert_eventually(
        lambda: _handled(read_records(record)) >= everything, timeout=60, message="all handled"
    )
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0, second.stderr_tail()
    records = read_records(record)
    assert _handled(records) == everything
    _check_order_across_owners(records, per_aggregate)
    assert await committed_offsets(broker.bootstrap, group, topic, partitions) == ends
    redelivered = len(records) - len(everything)
    print(f"\nkill -9: {len(handled_before)} handled before, {redelivered} handled twice")


async def _produce_in_waves(
    bootstrap: str, topic: str, aggregates: int, partitions: int, stop: asyncio.Event
) -> tuple[dict[int, int], int]:
    """One event per aggregate per wave, a wave every 50 ms, until ``stop`` is
    set (plus two waves): a stream that lasts while instances come and go.
    Returns the end offsets and the number of waves (events per aggregate)."""
    ends: dict[int, int] = {}
    seq = 0
    tail = 2
    while tail:
        if stop.is_set():
            tail -= 1
        wave = [
            (i % partitions, f"agg-{i}".encode(), envelope(f"agg-{i}", seq))
            for i in range(aggregates)
        ]
        for p, end in (await produce(bootstrap, topic, wave)).items():
            ends[p] = max(ends.get(p, 0), end)
        seq += 1
        await asyncio.sleep(0.05)  # pacing the load, not synchronising
    return ends, seq


async def test_second_instance_joins_and_leaves_mid_stream(
    broker: EmbeddedBroker, make_topic: MakeTopic, spawn: object, tmp_path: Path
) -> None:
    partitions, aggregates = 4, 100
    topic = await make_topic(partitions=partitions)
    group = f"{topic}-g"
    record = tmp_path / "handled.log"
    a = spawn(broker.bootstrap, topic, group, record, latency_ms=5)  # type: ignore[operator]
    await assert_eventually(a.started, timeout=20)
    stop = asyncio.Event()
    producer = asyncio.ensure_future(
        _produce_in_waves(broker.bootstrap, topic, aggregates, partitions, stop)
    )
    try:
        await assert_eventually(lambda: len(read_records(record)) >= 300, timeout=30)
        b = spawn(broker.bootstrap, topic, group, record, latency_ms=5)  # type: ignore[operator]
        await assert_eventually(b.started, timeout=20)

        def b_handled() -> int:
            return sum(1 for r in read_records(record) if r.pid == b.proc.pid)

        await assert_eventually(lambda: b_handled() >= 200, timeout=30, message="B took over")
        a_before_leave = sum(1 for r in read_records(record) if r.pid == a.proc.pid)
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(30) == 0, b.stderr_tail()
        # A takes B's partitions back while the stream goes on.
        await assert_eventually(
            lambda: (
                sum(1 for r in read_records(record) if r.pid == a.proc.pid) >= a_before_leave + 300
            ),
            timeout=30,
        )
        stop.set()
        ends, per_aggregate = await producer
    finally:
        producer.cancel()
    everything = {(p, o) for p, end in ends.items() for o in range(end)}
    await assert_eventually(
        lambda: _handled(read_records(record)) >= everything, timeout=60, message="all handled"
    )
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(30) == 0, a.stderr_tail()
    records = read_records(record)
    assert {r.pid for r in records} == {a.proc.pid, b.proc.pid}
    assert _handled(records) == everything
    _check_order_across_owners(records, per_aggregate)
    assert await committed_offsets(broker.bootstrap, group, topic, partitions) == ends
    b_partitions = {r.partition for r in records if r.pid == b.proc.pid}
    assert b_partitions, "B handled nothing"


async def test_sigterm_finishes_in_flight_events_commits_and_exits_0(
    broker: EmbeddedBroker, make_topic: MakeTopic, spawn: object, tmp_path: Path
) -> None:
    partitions, aggregates, per_aggregate = 2, 100, 4
    topic = await make_topic(partitions=partitions)
    group = f"{topic}-g"
    ends = await produce(
        broker.bootstrap, topic, aggregate_events(aggregates, per_aggregate, partitions)
    )
    record = tmp_path / "handled.log"
    server = spawn(broker.bootstrap, topic, group, record, latency_ms=300)  # type: ignore[operator]
    await assert_eventually(server.started, timeout=20)
    await assert_eventually(lambda: len(read_records(record)) >= 50, timeout=30)
    server.proc.send_signal(signal.SIGTERM)
    at_signal = len(read_records(record))
    assert server.proc.wait(30) == 0, server.stderr_tail()
    records = read_records(record)
    assert at_signal < aggregates * per_aggregate
    # Everything fetched before the signal was finished, then committed.
    assert len(records) == aggregates * per_aggregate
    assert await committed_offsets(broker.bootstrap, group, topic, partitions) == ends
    log = server.err.read_text()
    assert log.index('"service.stopping"') < log.index('"consumer.closed"')
    assert log.index('"consumer.closed"') < log.index('"control.stopped"')


def test_embedded_demo_run_prints_where_things_are_and_serves_metrics(tmp_path: Path) -> None:
    """What ``make run`` does, with free ports: embedded broker, demo traffic. A clean
    stop leaves no broker log behind in the temporary directory."""
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [
        sys.executable, "-m", "server", "--embedded", "--demo",
        "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        "--set", "kafka.consumer.sessionTimeoutMs=2000",
        "--set", "kafka.consumer.heartbeatIntervalMs=500",
        "--set", "demo.rate=500",
    ]  # fmt: skip
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            cmd, stdout=o, stderr=e, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}
        )
    try:
        asyncio.run(assert_eventually(lambda: "look at it:" in out.read_text(), timeout=20))
        assert list(tmp.glob("tansu-*.log")), "the broker writes its log there while it runs"
        banner = out.read_text()
        for needle in ("embedded Tansu", "gRPC", "poolctl", "topics     events", "demo"):
            assert needle in banner, needle
        metrics_url = next(
            word for word in banner.split() if word.startswith("http://")
        )  # e.g. http://127.0.0.1:PORT/metrics

        def consumed() -> float:
            with urllib.request.urlopen(metrics_url, timeout=5) as resp:
                text = resp.read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("kafka_eventbus_consumer_records_consumed_total{")
            )

        asyncio.run(assert_eventually(lambda: consumed() > 100, timeout=20))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert '"broker.stopped"' in err.read_text()
    assert list(tmp.glob("tansu-*.log")) == []
