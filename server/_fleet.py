"""Fleet control over Kafka: the compacted control topic, followed by every replica.

:class:`FleetControl` owns, for one replica:

- the control topic ``<groupId>.control`` (created at start-up when missing:
  1 partition, ``cleanup.policy=compact``), read by a group-less consumer from
  the beginning and followed to the end of time;
- the fold of its ``desired`` records (:class:`server._fleet_state.FleetLog`)
  and the latest report of every replica (``replica/<instance>``);
- this replica's report, published on each apply, on a heartbeat, and as a
  tombstone on a clean stop;
- fleet writes (a proposal, read back to learn whether the topic's order
  accepted it) and the wait until every live replica applied a generation,
  which stops waiting for a replica whose process is provably gone
  (:mod:`server._fleet_probe`).

**Two event loops.** The control topic's Kafka clients run on an event loop
of their own, in a daemon thread (:class:`IoLoop`): reading desired states
and reports, publishing reports and heartbeats, writing and waiting. The
service's loop dispatches every event; under a backlog it runs thousands of
handler steps per turn, and a follower on that loop would read a desired
state, or publish a report, only hundreds of milliseconds late (or miss
heartbeats until its live replica looked stale). What touches the service
stays on the service's loop: applying a state (the pool switch, the
consumer's pauses) and the snapshot a report is made of; the I/O loop asks
for an apply with one plain callback (``call_soon_threadsafe``: the switch's
synchronous change, in the service loop's next turn; a task only while an
awaited switch change holds the switch) and publishes the report the apply
hands back. A heartbeat carries the latest snapshot (taken
on the service's loop every heartbeat and at each apply) with the time it is
sent. Values the other loop reads are replaced, never mutated in place.

Start-up (:meth:`FleetControl.start`, called before the consumer's first
fetch): read the topic to its end and apply the latest desired state (the
configured values are only the defaults of a fleet that has none). If that
does not succeed within ``startup_timeout_s``, the replica runs on its
configuration, reports itself degraded (status, metric, log) and keeps
retrying in the background; once it reads the topic it applies what it found.

Following is supervised: a follower that fails on anything but a Kafka error
(which it retries in place) reports the replica degraded, reconnects after a
backoff (0.2 s, doubling, up to 5 s), reads the topic again from the start
into a fresh fold, and applies what it found.

Applying a desired state goes through the service's ``apply`` callback, which
uses the pool switch's atomic, order-keeping change (and the consumer's
operator pauses); applies are serialised and only ever move forward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import structlog
from actorpool.control.v1 import control_pb2 as pb
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from pool import PoolMode
from server._control import ConflictError, NotReadyError, Partition, PreconditionError
from server._errors import ServiceError
from server._fleet_probe import probe_gone
from server._fleet_state import (
    ApplyWatch,
    Change,
    DesiredState,
    FleetLog,
    Mismatch,
    Outcome,
    Paused,
    Proposal,
    Replay,
    ReplicaOutcome,
    Report,
    Verdict,
    Write,
    differences,
    is_stale,
    plan,
    restatement,
)
from server._loops import IoLoop

log = structlog.get_logger("server.fleet")

T = TypeVar("T")

DESIRED_KEY: Final = b"desired"
REPLICA_PREFIX: Final = b"replica/"
#: A writer replans on a fresher state this many times when its proposal lost
#: a race (no ``expected_generation``), then answers ``ABORTED``.
MAX_WRITE_ATTEMPTS: Final = 8
#: A follower that ran this long before failing restarts with the first backoff again.
_BACKOFF_RESET_S: Final = 30.0

_MODE_TO_PB: Final = {PoolMode.KEYED: pb.POOL_MODE_KEYED, PoolMode.ACTOR: pb.POOL_MODE_ACTOR}
_MODE_FROM_PB: Final = {v: k for k, v in _MODE_TO_PB.items()}


@dataclass(frozen=True, slots=True)
class FleetOptions:
    bootstrap_servers: str
    topic: str
    instance: str
    group_id: str = ""
    heartbeat_s: float = 5.0
    #: Start-up: how long to try to read the control topic before running degraded.
    startup_timeout_s: float = 10.0
    #: How long a write waits to read its own record back.
    write_timeout_s: float = 10.0
    #: Degraded: how often to try the control topic again.
    retry_s: float = 2.0
    fetch_max_wait_ms: int = 20
    kafka: dict[str, Any] = field(default_factory=dict)
    #: This process's host name, in its report (a loopback address means it).
    host: str = field(default_factory=socket.gethostname)
    #: The control plane uses TLS: probes only connect (no identity check).
    grpc_tls: bool = False
    #: A replica that has not applied after this long into a wait is probed
    #: (``None``: half a heartbeat, at most 100 ms); again every
    #: ``max(probe_after_s, 0.25)`` while it has not.
    probe_after_s: float | None = None
    #: Deadline of a probe's connect and of its identity check.
    probe_timeout_s: float = 0.5
    #: A failed follower restarts after this, doubling up to ``restart_max_s``.
    restart_backoff_s: float = 0.2
    restart_max_s: float = 5.0

    @property
    def probe_after(self) -> float:
        if self.probe_after_s is not None:
            return self.probe_after_s
        return min(0.1, self.heartbeat_s / 2)


@dataclass(frozen=True, slots=True)
class LocalSnapshot:
    """What this replica reports about itself."""

    mode: PoolMode
    rollout: float
    paused: Paused
    grpc_address: str = ""
    version: str = ""
    assigned: tuple[Partition, ...] = ()
    lag: int = 0
    in_flight: int = 0
    draining: bool = False


@dataclass(frozen=True, slots=True)
class WriteResult:
    """An accepted (or replayed) fleet write."""

    generation: int
    previous_generation: int
    state: DesiredState
    replayed: bool = False


@dataclass(slots=True)
class _Fold:
    """What the control topic says, read up to ``position``: the desired
    state's fold and the latest report of every replica. ``reports`` and
    ``records`` are replaced on each change (the service's loop reads them)."""

    log: FleetLog
    reports: dict[str, Report] = field(default_factory=dict)
    records: dict[str, pb.ReplicaReport] = field(default_factory=dict)
    position: int = 0


#: ``apply(state, initial)``: make this replica follow ``state``; returns what
#: the pool switch said (or ``None``). ``initial``: before the first fetch.
ApplyFn = Callable[[DesiredState, bool], Awaitable[object]]
#: ``apply_now(state)``: the same, after the start, without awaiting anything
#: (a plain callback of the service's loop); :data:`APPLY_LATER` when it cannot
#: now (an awaited change is in progress): then ``apply`` is awaited instead.
ApplyNowFn = Callable[[DesiredState], object]
APPLY_LATER: Final = object()


class FleetControl:
    """One replica's side of the control topic. ``start()`` / ``stop()``, on
    the service's event loop; the Kafka I/O runs on :attr:`io`."""

    def __init__(
        self,
        options: FleetOptions,
        *,
        defaults: DesiredState,
        apply: ApplyFn,
        snapshot: Callable[[], LocalSnapshot],
        apply_now: ApplyNowFn | None = None,
        partitions: Callable[[], Mapping[str, set[int] | None]] | None = None,
        announce: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self._defaults = defaults
        self._fold = _Fold(FleetLog(defaults))
        self._apply = apply
        self._apply_now = apply_now
        self._snapshot = snapshot
        self._partitions = partitions
        self._announce = announce
        self._clock = clock
        self.io = IoLoop(f"fleet-io-{options.instance}")
        self._main: asyncio.AbstractEventLoop | None = None
        self._tp = TopicPartition(options.topic, 0)
        # I/O loop: the Kafka clients, the writers waiting, the tasks.
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._progress: asyncio.Event | None = None
        self._reports_changed: asyncio.Event | None = None
        self._write_lock: asyncio.Lock | None = None
        self._waiting: dict[str, asyncio.Future[Verdict]] = {}
        self._io_tasks: set[asyncio.Task[Any]] = set()
        self._void_since: float | None = None
        #: Instances found gone: instance -> (the report's time, why).
        self._down: dict[str, tuple[float, str]] = {}
        self._probing: set[str] = set()
        # Service loop: applying, the snapshot reports are made of.
        self._apply_lock = asyncio.Lock()
        self._apply_pending = False
        self._main_tasks: set[asyncio.Task[Any]] = set()
        self._report_base: pb.ReplicaReport | None = None
        # Read by both loops (and the /metrics thread).
        self.applied_generation = 0
        self.last_error = ""
        self.failed_generation = 0
        #: Why the control topic cannot be used (``None``: it can).
        self.degraded: str | None = None
        #: What the switch said when each recent generation was applied here.
        self.outcomes: dict[int, object] = {}
        self._started = False
        self._stopped = False
        self.records_skipped = 0
        self.writes: dict[str, int] = {}
        self.follow_restarts = 0

    # ------------------------------------------------------------- views

    @property
    def log(self) -> FleetLog:
        return self._fold.log

    @property
    def reports(self) -> dict[str, Report]:
        return self._fold.reports

    @property
    def report_records(self) -> dict[str, pb.ReplicaReport]:
        return self._fold.records

    @property
    def connected(self) -> bool:
        return self._consumer is not None and self.degraded is None

    @property
    def desired(self) -> DesiredState:
        return self.log.effective()

    def down_reason(self, instance: str) -> str | None:
        """Why ``instance`` was found gone, while its latest report is the one probed."""
        mark = self._down.get(instance)
        report = self.reports.get(instance)
        if mark is None or report is None or report.time != mark[0]:
            return None
        return mark[1]

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Read the control topic to its end and apply the latest desired state
        (or run degraded on the configuration). Never raises on broker trouble."""
        if self._started:
            return
        self._started = True
        self._main = asyncio.get_running_loop()
        if self._announce is not None:
            await self._announce()
        self.io.start()
        connected = await self.io.call(self._io_start())
        if connected:
            await self._apply_latest(initial=True)
        self._report_base = self.report_record()
        self._spawn_main(self._refresh_loop(), "fleet.refresh")
        self.io.submit(self._io_run(connected))
        if connected:
            log.info(
                "fleet.started",
                topic=self.options.topic,
                generation=self.log.generation,
                applied=self.applied_generation,
                replicas=len(self.reports),
            )

    async def stop(self) -> None:
        """Stop following; publish a tombstone for this replica's report."""
        if self._stopped:
            return
        self._stopped = True
        tasks = list(self._main_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._started:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self.io.call(self._io_stop())
            await self.io.stop()
        log.info("fleet.stopped", applied=self.applied_generation)

    def _spawn_main(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._main_tasks.add(task)
        task.add_done_callback(self._main_tasks.discard)

    # ------------------------------------------------------- the I/O loop

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._io_tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._io_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet.task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _io_start(self) -> bool:
        """On the I/O loop: connect and read to the end within the start-up
        deadline; ``False`` (degraded) if that fails."""
        self._progress = asyncio.Event()
        self._reports_changed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        try:
            async with asyncio.timeout(self.options.startup_timeout_s):
                await self._connect_and_read()
        except Exception as exc:  # noqa: BLE001 - any failure: degraded, keep retrying
            await self._disconnect()
            self._set_degraded(_describe(exc))
            return False
        return True

    async def _io_run(self, connected: bool) -> None:
        self._spawn(self._supervise(self._heartbeat_loop, "fleet.heartbeat"), "fleet.heartbeat")
        if connected:
            self._spawn(self._publish(self._report_base), "fleet.report")
        self._spawn(self._follow_supervised(connected), "fleet.follow")

    async def _io_stop(self) -> None:
        tasks = list(self._io_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        producer = self._producer
        if producer is not None and self.degraded is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await producer.send_and_wait(
                        self.options.topic, None, key=self._report_key(), partition=0
                    )
        await self._disconnect()
        for future in self._waiting.values():
            if not future.done():
                future.cancel()

    async def _supervise(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``loop`` forever: restart it (after a second) if it fails."""
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged, restarted
                log.exception("fleet.task_failed", task=name, error=repr(exc), restart_in_s=1.0)
                await asyncio.sleep(1.0)
            else:
                return

    # ------------------------------------------------------------ connect

    async def _connect(self) -> None:
        o = self.options
        await ensure_control_topic(o.bootstrap_servers, o.topic, o.kafka)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=o.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=o.fetch_max_wait_ms,
            client_id=f"{o.instance}-fleet",
            **o.kafka,
        )
        self._consumer = consumer
        await consumer.start()
        consumer.assign([self._tp])
        await consumer.seek_to_beginning(self._tp)
        producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers,
            enable_idempotence=False,  # not supported by the embedded broker
            acks="all",
            linger_ms=0,
            client_id=f"{o.instance}-fleet",
            **o.kafka,
        )
        self._producer = producer
        await producer.start()

    async def _disconnect(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _connect_and_read(self) -> None:
        """Connect, read every record up to the topic's end as it is now into a
        fresh fold, and make it the current one."""
        await self._connect()
        consumer = self._consumer
        assert consumer is not None
        fold = _Fold(FleetLog(self._defaults))
        end = (await consumer.end_offsets([self._tp]))[self._tp]
        while fold.position < end:
            batch = await consumer.getmany(self._tp, timeout_ms=200)
            for record in batch.get(self._tp, ()):
                self._on_record(fold, record.offset, record.key, record.value)
        self._fold = fold
        self._pulse_progress()
        self._reports_pulse()

    async def _follow_supervised(self, connected: bool) -> None:
        """Follow the topic; reconnect when the topic cannot be read (degraded,
        every ``retry_s``) or the follower failed (after a growing backoff)."""
        o = self.options
        delay = o.retry_s
        backoff = o.restart_backoff_s
        while True:
            if not connected:
                await asyncio.sleep(delay)
                try:
                    async with asyncio.timeout(max(o.startup_timeout_s, 1.0)):
                        await self._connect_and_read()
                except Exception as exc:  # noqa: BLE001 - still degraded
                    await self._disconnect()
                    reason = _describe(exc)
                    if reason != self.degraded:
                        self._set_degraded(reason)
                    delay = o.retry_s
                    continue
                connected = True
                self.degraded = None
                log.info("fleet.recovered", topic=o.topic, generation=self.log.generation)
                self._schedule_apply()
            started = time.monotonic()
            try:
                await self._follow_loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Anything but a Kafka error (retried in place): a bug, a broken
                # client. Degraded, reconnect, read the topic again from the start.
                if time.monotonic() - started > _BACKOFF_RESET_S:
                    backoff = o.restart_backoff_s
                self.follow_restarts += 1
                log.exception("fleet.follow_failed", error=repr(exc), restart_in_s=backoff)
                self._set_degraded(f"following the control topic failed: {exc!r}")
                await self._disconnect()
                connected = False
                delay, backoff = backoff, min(backoff * 2, o.restart_max_s)
            else:
                return

    def _set_degraded(self, reason: str) -> None:
        self.degraded = reason
        log.warning(
            "fleet.degraded",
            topic=self.options.topic,
            reason=reason,
            detail="running on the configuration (or the last state read); retrying",
        )

    # ------------------------------------------------------------- follow

    async def _follow_loop(self) -> None:
        while True:
            consumer = self._consumer
            if consumer is None:
                return
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=1000)
            except KafkaError as exc:
                log.warning("fleet.read_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            fold = self._fold
            for record in batch.get(self._tp, ()):
                if self._on_record(fold, record.offset, record.key, record.value):
                    self._schedule_apply()

    def _on_record(self, fold: _Fold, offset: int, key: bytes | None, value: bytes | None) -> bool:
        """Fold one record into ``fold``; whether the desired generation changed."""
        fold.position = offset + 1
        if fold is self._fold:
            self._pulse_progress()
        if key == DESIRED_KEY:
            if value is None:
                return False
            try:
                proposal = proposal_from_pb(pb.FleetDesiredState.FromString(value))
            except (DecodeError, ValueError) as exc:
                self._skip(offset, exc)
                return False
            before = fold.log.generation
            verdict = fold.log.apply(proposal)
            if verdict is Verdict.VOID:
                if self._void_since is None:
                    self._void_since = time.monotonic()
            else:
                self._void_since = None
            waiting = self._waiting.pop(proposal.write_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(verdict)
            changed = fold.log.generation != before
            if changed:
                self._reports_pulse()
            return changed
        if key is not None and key.startswith(REPLICA_PREFIX):
            instance = key[len(REPLICA_PREFIX) :].decode("utf-8", "replace")
            if value is None:
                fold.reports = {k: v for k, v in fold.reports.items() if k != instance}
                fold.records = {k: v for k, v in fold.records.items() if k != instance}
            else:
                try:
                    record = pb.ReplicaReport.FromString(value)
                    report = report_from_pb(record)
                except (DecodeError, ValueError) as exc:
                    self._skip(offset, exc)
                    return False
                fold.reports = {**fold.reports, instance: report}
                fold.records = {**fold.records, instance: record}
            self._reports_pulse()
            return False
        self._skip(offset, ValueError(f"unknown key {key!r}"))
        return False

    def _pulse_progress(self) -> None:
        progress = self._progress
        if progress is not None:
            progress.set()
            self._progress = asyncio.Event()

    def _reports_pulse(self) -> None:
        """Wake every waiter on reports (each waits on the event it saw)."""
        changed = self._reports_changed
        if changed is not None:
            changed.set()
            self._reports_changed = asyncio.Event()

    def _skip(self, offset: int, exc: Exception) -> None:
        self.records_skipped += 1
        log.warning("fleet.record_skipped", offset=offset, error=repr(exc))

    # -------------------------------------------------------------- apply

    def _schedule_apply(self) -> None:
        """From the I/O loop: have the service's loop apply the latest state
        (one apply pending at a time; it applies whatever is latest then)."""
        main = self._main
        if self._apply_pending or main is None or main.is_closed():
            return
        self._apply_pending = True
        try:
            main.call_soon_threadsafe(self._apply_soon, time.time())
        except RuntimeError:  # the service's loop closed meanwhile
            self._apply_pending = False

    def _apply_soon(self, seen: float) -> None:
        """On the service's loop, a plain callback (its next turn after the
        follower read the state): apply the latest state there and then, and
        hand the report to the I/O loop. Only while an apply or an awaited
        switch change is in progress does it wait for them, in a task."""
        if self._stopped:
            return
        # Before reading the state: a record folded from now on asks again.
        self._apply_pending = False
        if self._apply_now is None or self._apply_lock.locked():
            self._spawn_apply(seen)
            return
        begun = time.time()
        target = self._target_state()
        applied = None
        if target is not None:
            try:
                result = self._apply_now(target)
            except Exception as exc:
                self._apply_failed(target, exc)
                log.exception("fleet.apply_failed", generation=target.generation, error=repr(exc))
            else:
                if result is APPLY_LATER:
                    self._spawn_apply(seen)
                    return
                applied = self._apply_done(target, result, initial=False)
        try:
            self._report_applied(applied, seen, begun)
        except Exception as exc:  # the next heartbeat's snapshot tries again
            log.exception("fleet.apply_task_failed", error=repr(exc))

    def _spawn_apply(self, seen: float) -> None:
        task = asyncio.get_running_loop().create_task(
            self._apply_and_report(seen), name="fleet.apply"
        )
        self._main_tasks.add(task)
        task.add_done_callback(self._main_tasks.discard)
        task.add_done_callback(_log_failure)

    async def _apply_and_report(self, seen: float) -> None:
        """On the service's loop: apply the latest state, then report it."""
        begun = time.time()
        applied = await self._apply_latest(initial=False)
        self._report_applied(applied, seen, begun)

    def _report_applied(self, applied: int | None, seen: float, begun: float) -> None:
        """On the service's loop: the report after an apply, published from the I/O loop."""
        done = time.time()
        self._report_base = self.report_record()
        timing = None
        if applied is not None:
            timing = _ApplyTiming(applied, seen, begun, done, time.time())
        with contextlib.suppress(NotReadyError):
            self.io.submit(self._publish(self._report_base, timing))

    def _target_state(self) -> DesiredState | None:
        """The desired state to apply (``None``: nothing newer than what is applied)."""
        target = self.log.effective()
        if target.generation <= self.applied_generation or self.log.current is None:
            return None
        return target

    async def _apply_latest(self, *, initial: bool) -> int | None:
        """Apply the latest desired state; the generation applied (``None``:
        nothing new, or the apply failed)."""
        async with self._apply_lock:
            target = self._target_state()
            if target is None:
                return None
            try:
                result = await self._apply(target, initial)
            except Exception as exc:
                self._apply_failed(target, exc)
                log.exception("fleet.apply_failed", generation=target.generation, error=repr(exc))
                return None
            return self._apply_done(target, result, initial=initial)

    def _apply_failed(self, target: DesiredState, exc: Exception) -> None:
        self.failed_generation = target.generation
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _apply_done(self, target: DesiredState, result: object, *, initial: bool) -> int:
        recent = {g: o for g, o in self.outcomes.items() if g >= target.generation - 16}
        self.outcomes = {**recent, target.generation: result}
        self.applied_generation = target.generation
        self.last_error = ""
        log.info(
            "fleet.applied",
            generation=target.generation,
            mode=target.mode.value,
            rollout=target.rollout,
            paused="all" if target.paused.all else len(target.paused.partitions),
            initial=initial,
        )
        return target.generation

    async def _refresh_loop(self) -> None:
        """On the service's loop: the snapshot heartbeats carry, every heartbeat."""
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            try:
                self._report_base = self.report_record()
            except Exception as exc:  # noqa: BLE001 - stopping; the next one tries again
                log.debug("fleet.snapshot_failed", error=repr(exc))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            base = self._report_base
            if self.degraded is None and base is not None:
                record = pb.ReplicaReport()
                record.CopyFrom(base)
                record.time.CopyFrom(_timestamp(self._clock()))
                await self._publish(record)
                void_since = self._void_since
                if (
                    void_since is not None
                    and self.log.tail_void
                    and time.monotonic() - void_since >= self.options.heartbeat_s
                ):
                    await self._restate()
            self._reports_pulse()

    def _report_key(self) -> bytes:
        return REPLICA_PREFIX + self.options.instance.encode()

    def own_differences(self) -> list[str]:
        snap = self._snapshot()
        return differences(
            self.log.effective(),
            applied_generation=self.applied_generation,
            mode=snap.mode,
            rollout=snap.rollout,
            paused=snap.paused,
        )

    def report_record(self) -> pb.ReplicaReport:
        """This replica's report now (on the service's loop: it reads the service)."""
        snap = self._snapshot()
        return pb.ReplicaReport(
            instance=self.options.instance,
            grpc_address=snap.grpc_address,
            version=snap.version,
            applied_generation=self.applied_generation,
            mode=_MODE_TO_PB[snap.mode],
            rollout_percent=snap.rollout,
            assigned=partitions_to_pb(snap.assigned),
            lag=snap.lag,
            in_flight=snap.in_flight,
            draining=snap.draining,
            last_error=self.last_error,
            failed_generation=self.failed_generation,
            time=_timestamp(self._clock()),
            paused_all=snap.paused.all,
            paused=partitions_to_pb(snap.paused.sorted()),
            heartbeat_seconds=self.options.heartbeat_s,
            degraded=self.degraded is not None,
            group_id=self.options.group_id,
            host=self.options.host,
        )

    async def publish_report(self) -> None:
        """Publish this replica's report now (from the service's loop)."""
        self._report_base = self.report_record()
        await self.io.call(self._publish(self._report_base))

    async def _publish(
        self, record: pb.ReplicaReport | None, timing: _ApplyTiming | None = None
    ) -> None:
        producer = self._producer
        if producer is None or record is None or self.degraded is not None:
            return
        try:
            value = record.SerializeToString()
            sending = time.time()
            async with asyncio.timeout(self.options.write_timeout_s):
                await producer.send_and_wait(
                    self.options.topic, value, key=self._report_key(), partition=0
                )
            if timing is not None:
                acked = time.time()
                log.info(
                    "fleet.reported",
                    generation=timing.generation,
                    took_ms=_ms(acked - timing.seen),
                    # The hop from this loop to the service's, the apply there,
                    # the report's snapshot, the hop back, the producer's ack.
                    to_service_loop_ms=_ms(timing.begun - timing.seen),
                    apply_ms=_ms(timing.applied - timing.begun),
                    snapshot_ms=_ms(timing.snapshot - timing.applied),
                    to_io_loop_ms=_ms(sending - timing.snapshot),
                    publish_ms=_ms(acked - sending),
                    seen_at=round(timing.seen, 6),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
            log.warning("fleet.report_failed", error=repr(exc))

    # -------------------------------------------------------------- write

    async def sync(self, timeout: float | None = None) -> None:
        """Wait until every record appended before this call has been read."""
        self._require()
        await self.io.call(self._sync(timeout))

    async def _sync(self, timeout: float | None = None) -> None:
        consumer = self._require()
        async with asyncio.timeout(timeout or self.options.write_timeout_s):
            end = (await consumer.end_offsets([self._tp]))[self._tp]
            while self._fold.position < end:
                progress = self._progress
                assert progress is not None
                await progress.wait()

    def _require(self) -> AIOKafkaConsumer:
        consumer = self._consumer
        if consumer is None or self.degraded is not None or self._producer is None:
            raise NotReadyError(
                f"fleet control unavailable: the control topic {self.options.topic} "
                f"cannot be read ({self.degraded or 'not started'})"
            )
        return consumer

    async def write(
        self,
        change: Change,
        *,
        request_id: str = "",
        expected_generation: int | None = None,
        caller_role: str = "",
        caller_peer: str = "",
        every: Iterable[Partition] = (),
    ) -> WriteResult:
        """Write ``change`` as the fleet's next desired state.

        Raises :class:`PreconditionError` when ``expected_generation`` is not
        the current generation, :class:`ConflictError` when a concurrent write
        took it first (by the topic's order), :class:`NotReadyError` when the
        control topic cannot be used."""
        self._require()
        return await self.io.call(
            self._write(
                change,
                request_id=request_id,
                expected_generation=expected_generation,
                caller_role=caller_role,
                caller_peer=caller_peer,
                every=tuple(every),
            )
        )

    async def write_and_wait(
        self,
        change: Change,
        *,
        wait: float,
        started: float | None = None,
        request_id: str = "",
        expected_generation: int | None = None,
        caller_role: str = "",
        caller_peer: str = "",
        every: Iterable[Partition] = (),
    ) -> tuple[WriteResult, list[ReplicaOutcome], bool]:
        """:meth:`write`, then :meth:`wait_applied` for its generation, in one
        trip to the I/O loop."""
        self._require()

        async def both() -> tuple[WriteResult, list[ReplicaOutcome], bool]:
            begun = time.time()
            result = await self._write(
                change,
                request_id=request_id,
                expected_generation=expected_generation,
                caller_role=caller_role,
                caller_peer=caller_peer,
                every=tuple(every),
            )
            written = time.time()
            outcomes, complete = await self._wait_applied(
                result.generation, timeout=wait, started=started
            )
            log.info(
                "fleet.waited",
                generation=result.generation,
                complete=complete,
                # From the call to the I/O loop, the write read back, the wait.
                to_io_loop_ms=_ms(begun - started) if started is not None else None,
                write_ms=_ms(written - begun),
                wait_ms=_ms(time.time() - written),
                written_at=round(written, 6),
                replicas={
                    o.instance: None if o.took_s is None else _ms(o.took_s) for o in outcomes
                },
            )
            return result, outcomes, complete

        return await self.io.call(both())

    async def _write(
        self,
        change: Change,
        *,
        request_id: str,
        expected_generation: int | None,
        caller_role: str,
        caller_peer: str,
        every: tuple[Partition, ...],
    ) -> WriteResult:
        self._require()
        lock = self._write_lock
        assert lock is not None
        async with lock:
            if expected_generation is not None:
                await self._sync()
            for _attempt in range(MAX_WRITE_ATTEMPTS):
                current = self.log.effective()
                write_id = uuid.uuid4().hex
                planned = plan(
                    current,
                    change,
                    write_id=write_id,
                    request_id=request_id,
                    expected_generation=expected_generation,
                    writer=self.options.instance,
                    caller_role=caller_role,
                    caller_peer=caller_peer,
                    now=self._clock(),
                    every=every,
                )
                if isinstance(planned, Replay):
                    self._count("replayed")
                    return WriteResult(
                        planned.generation, planned.generation - 1, current, replayed=True
                    )
                if isinstance(planned, Mismatch):
                    self._count("precondition")
                    raise PreconditionError(
                        f"expected generation {planned.expected}, the fleet is at "
                        f"generation {planned.current}"
                    )
                assert isinstance(planned, Write)
                verdict = await self._propose(planned.proposal)
                if verdict is Verdict.ACCEPTED:
                    self._count("accepted")
                    return WriteResult(
                        planned.proposal.state.generation,
                        planned.proposal.base_generation,
                        planned.proposal.state,
                    )
                # Lost the race: repair the tail, then replan (or give up on CAS).
                await self._restate()
                seen = self.log.effective().generation_of(request_id)
                if seen is not None:
                    self._count("replayed")
                    return WriteResult(seen, seen - 1, self.log.effective(), replayed=True)
                if expected_generation is not None:
                    self._count("conflict")
                    raise ConflictError(
                        f"a concurrent write took generation {expected_generation + 1} first; "
                        f"the fleet is at generation {self.log.generation}"
                    )
            self._count("conflict")
            raise ConflictError(
                f"gave up after {MAX_WRITE_ATTEMPTS} concurrent writes took the generation first"
            )

    def _count(self, outcome: str) -> None:
        self.writes = {**self.writes, outcome: self.writes.get(outcome, 0) + 1}

    async def _propose(self, proposal: Proposal) -> Verdict:
        producer = self._producer
        if producer is None:
            raise NotReadyError("fleet control is not connected")
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._waiting[proposal.write_id] = future
        # The verdict is what counts: reading the record back (up to the high
        # watermark, so acknowledged by every in-sync copy) answers the write
        # even when the producer's acknowledgement comes later.
        send = asyncio.ensure_future(
            producer.send_and_wait(
                self.options.topic,
                proposal_to_pb(proposal).SerializeToString(),
                key=DESIRED_KEY,
                partition=0,
            )
        )
        try:
            async with asyncio.timeout(self.options.write_timeout_s):
                await asyncio.wait((send, future), return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    send.result()  # the send failed: raise its error
                return await future
        except TimeoutError as exc:
            raise NotReadyError(
                f"the control topic did not confirm the write within "
                f"{self.options.write_timeout_s:g}s (it may still take effect)"
            ) from exc
        finally:
            self._waiting.pop(proposal.write_id, None)
            send.add_done_callback(_consume_send)

    async def _restate(self) -> None:
        """Append the current state again, so the latest record is not void."""
        producer = self._producer
        if producer is None or not self.log.tail_void or self.log.current is None:
            return
        proposal = restatement(
            self.log.current,
            write_id=uuid.uuid4().hex,
            writer=self.options.instance,
            now=self._clock(),
        )
        try:
            await self._propose(proposal)
        except Exception as exc:  # noqa: BLE001 - the heartbeat tries again
            log.warning("fleet.restate_failed", error=repr(exc))

    # --------------------------------------------------------------- wait

    async def wait_applied(
        self, generation: int, *, timeout: float, started: float | None = None
    ) -> tuple[list[ReplicaOutcome], bool]:
        """Wait until every live replica reported ``generation`` applied (or
        failed, or is provably gone), up to ``timeout``; return one outcome
        per live replica and whether none is pending."""
        return await self.io.call(self._wait_applied(generation, timeout=timeout, started=started))

    async def _wait_applied(
        self, generation: int, *, timeout: float, started: float | None = None
    ) -> tuple[list[ReplicaOutcome], bool]:
        watch = ApplyWatch(generation, self._clock() if started is None else started)
        began = time.monotonic()
        deadline = began + timeout
        probe_at = began + self.options.probe_after
        probe_every = max(self.options.probe_after, 0.25)
        next_probe: dict[str, float] = {}
        while True:
            now = self._clock()
            reports = self.reports
            for report in reports.values():
                watch.observe(report, now)
            down = self._down_marks(reports)
            outcomes = watch.outcomes(reports, now, down)
            pending = [o for o in outcomes if o.outcome is Outcome.PENDING]
            if not pending:
                return outcomes, True
            mono = time.monotonic()
            left = deadline - mono
            if left <= 0:
                return outcomes, False
            wake = left
            if mono >= probe_at:
                for o in pending:
                    report = reports[o.instance]
                    due = next_probe.get(o.instance, mono)
                    if mono >= due:
                        next_probe[o.instance] = mono + probe_every
                        self._probe(report)
                    wake = min(wake, next_probe[o.instance] - mono)
            else:
                wake = min(wake, probe_at - mono)
            changed = self._reports_changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.001, min(wake, 0.5)))

    def _down_marks(self, reports: Mapping[str, Report]) -> dict[str, str]:
        """Instances found gone whose latest report is the one probed."""
        marks = {}
        for instance, (at, why) in self._down.items():
            report = reports.get(instance)
            if report is not None and report.time == at:
                marks[instance] = why
        return marks

    def _probe(self, report: Report) -> None:
        """Probe the process of ``report`` (in the background); a proof that it
        is gone marks it down and wakes the waiters."""
        instance = report.instance
        if (
            instance == self.options.instance
            or instance in self._probing
            or not report.grpc_address
        ):
            return
        self._probing.add(instance)

        async def run() -> None:
            try:
                why = await probe_gone(
                    report.grpc_address,
                    instance,
                    same_host=bool(report.host) and report.host == self.options.host,
                    tls=self.options.grpc_tls,
                    timeout=self.options.probe_timeout_s,
                )
            finally:
                self._probing.discard(instance)
            if why is None:
                return
            current = self.reports.get(instance)
            if current is None or current.time != report.time:
                return  # it reported since: alive after all, or a new process
            kept = {k: v for k, v in self._down.items() if k in self.reports and k != instance}
            self._down = {**kept, instance: (report.time, why)}
            log.info("fleet.replica_down", instance=instance, reason=why)
            self._reports_pulse()

        self._spawn(run(), f"fleet.probe.{instance}")

    # ------------------------------------------------------------- status

    def topic_partitions(self) -> Mapping[str, set[int] | None]:
        """The consumed topics and their partitions (``None``: not known yet)."""
        return self._partitions() if self._partitions is not None else {}

    def live_reports(self) -> dict[str, Report]:
        now = self._clock()
        return {k: r for k, r in self.reports.items() if not is_stale(r, now)}


@dataclass(frozen=True, slots=True)
class _ApplyTiming:
    """When an apply's steps happened (wall clock): the record read, the
    apply begun and done on the service's loop, the report's snapshot."""

    generation: int
    seen: float
    begun: float
    applied: float
    snapshot: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _consume_send(send: asyncio.Future[Any]) -> None:
    if not send.cancelled() and send.exception() is not None:
        log.warning("fleet.send_failed", error=repr(send.exception()))


def _log_failure(future: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.error("fleet.apply_task_failed", error=repr(exc))


# ------------------------------------------------------------------ topic


async def ensure_control_topic(
    bootstrap: str, topic: str, kafka: dict[str, Any] | None = None, timeout: float = 10.0
) -> None:
    """Create ``topic`` (1 partition, compacted) unless it exists; refuse one
    with more than one partition (the topic's order is the fleet's order)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **(kafka or {})
    )
    try:
        # Inside the try: a start that fails or times out still closes the client.
        await admin.start()
        try:
            cluster = await admin.describe_cluster()
            brokers = len(cluster.get("brokers") or ()) or 1
        except KafkaError:
            brokers = 1
        try:
            resp = await admin.create_topics(
                [
                    NewTopic(
                        name=topic,
                        num_partitions=1,
                        # Up to 3 copies: the fleet's state must survive a broker.
                        replication_factor=min(3, brokers),
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ],
                timeout_ms=int(timeout * 1000),
            )
        except TopicAlreadyExistsError:
            resp = None
        for item in getattr(resp, "topic_errors", []) or []:
            code = item[1]
            if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS
                raise FleetTopicError(f"cannot create control topic {topic}: error code {code}")
        described = await admin.describe_topics([topic])
        for entry in described:
            if entry.get("error_code"):
                raise FleetTopicError(
                    f"cannot describe control topic {topic}: error code {entry['error_code']}"
                )
            partitions = len(entry.get("partitions") or ())
            if partitions != 1:
                raise FleetTopicError(
                    f"control topic {topic} has {partitions} partitions; it needs exactly 1"
                )
    finally:
        await admin.close()


class FleetTopicError(ServiceError, RuntimeError):
    """The control topic is missing, unreadable or misconfigured. Not
    retriable (a topic with several partitions stays so); the replica runs
    degraded and tries the topic again anyway, in case an operator fixes it."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out reading the control topic"
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------ conversions


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(epoch * 1e9))
    return ts


def partitions_to_pb(items: Iterable[Partition]) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in items]


def _partitions(items: Sequence[pb.TopicPartition]) -> frozenset[Partition]:
    return frozenset((i.topic, i.partition) for i in items)


def _mode(value: int) -> PoolMode:
    mode: PoolMode | None = _MODE_FROM_PB.get(value)  # type: ignore[call-overload]
    if mode is None:
        raise ValueError(f"unknown pool mode {value}")
    return mode


def state_to_pb(state: DesiredState, base_generation: int, write_id: str) -> pb.FleetDesiredState:
    return pb.FleetDesiredState(
        generation=state.generation,
        base_generation=base_generation,
        mode=_MODE_TO_PB[state.mode],
        rollout_percent=state.rollout,
        paused_all=state.paused.all,
        paused=partitions_to_pb(state.paused.sorted()),
        change=state.change,
        resumed_all=state.resumed.all,
        resumed=partitions_to_pb(state.resumed.sorted()),
        request_id=state.request_id,
        write_id=write_id,
        writer=state.writer,
        caller_role=state.caller_role,
        caller_peer=state.caller_peer,
        time=_timestamp(state.time),
        recent_requests=[pb.RecentRequest(request_id=r, generation=g) for r, g in state.recent],
    )


def proposal_to_pb(proposal: Proposal) -> pb.FleetDesiredState:
    return state_to_pb(proposal.state, proposal.base_generation, proposal.write_id)


def proposal_from_pb(record: pb.FleetDesiredState) -> Proposal:
    state = DesiredState(
        generation=record.generation,
        mode=_mode(record.mode),
        rollout=record.rollout_percent,
        paused=Paused(all=record.paused_all, partitions=_partitions(record.paused)),
        change=record.change,
        resumed=Paused(all=record.resumed_all, partitions=_partitions(record.resumed)),
        request_id=record.request_id,
        writer=record.writer,
        caller_role=record.caller_role,
        caller_peer=record.caller_peer,
        time=record.time.ToNanoseconds() / 1e9,
        recent=tuple((r.request_id, r.generation) for r in record.recent_requests),
    )
    return Proposal(state, base_generation=record.base_generation, write_id=record.write_id)


def report_from_pb(record: pb.ReplicaReport) -> Report:
    return Report(
        instance=record.instance,
        applied_generation=record.applied_generation,
        mode=_mode(record.mode),
        rollout=record.rollout_percent,
        paused=Paused(all=record.paused_all, partitions=_partitions(record.paused)),
        time=record.time.ToNanoseconds() / 1e9,
        heartbeat_s=record.heartbeat_seconds or 5.0,
        grpc_address=record.grpc_address,
        failed_generation=record.failed_generation,
        last_error=record.last_error,
        host=record.host,
    )
