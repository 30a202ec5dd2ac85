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
  accepted it) and the wait until every live replica applied a generation.

Start-up (:meth:`FleetControl.start`, called before the consumer's first
fetch): read the topic to its end and apply the latest desired state (the
configured values are only the defaults of a fleet that has none). If that
does not succeed within ``startup_timeout_s``, the replica runs on its
configuration, reports itself degraded (status, metric, log) and keeps
retrying in the background; once it reads the topic it applies what it found.

Applying a desired state goes through the service's ``apply`` callback, which
uses the pool switch's atomic, order-keeping change (and the consumer's
operator pauses); applies are serialised and only ever move forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

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
from server._fleet_state import (
    ApplyWatch,
    Change,
    DesiredState,
    FleetLog,
    Mismatch,
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

log = structlog.get_logger("server.fleet")

DESIRED_KEY: Final = b"desired"
REPLICA_PREFIX: Final = b"replica/"
#: A writer replans on a fresher state this many times when its proposal lost
#: a race (no ``expected_generation``), then answers ``ABORTED``.
MAX_WRITE_ATTEMPTS: Final = 8

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


#: ``apply(state, initial)``: make this replica follow ``state``; returns what
#: the pool switch said (or ``None``). ``initial``: before the first fetch.
ApplyFn = Callable[[DesiredState, bool], Awaitable[object]]


class FleetControl:
    """One replica's side of the control topic. ``start()`` / ``stop()``."""

    def __init__(
        self,
        options: FleetOptions,
        *,
        defaults: DesiredState,
        apply: ApplyFn,
        snapshot: Callable[[], LocalSnapshot],
        partitions: Callable[[], Mapping[str, set[int] | None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.log = FleetLog(defaults)
        self._apply = apply
        self._snapshot = snapshot
        self._partitions = partitions
        self._clock = clock
        self._tp = TopicPartition(options.topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.reports: dict[str, Report] = {}
        self.report_records: dict[str, pb.ReplicaReport] = {}
        self.applied_generation = 0
        self.last_error = ""
        self.failed_generation = 0
        #: Why the control topic cannot be used (``None``: it can).
        self.degraded: str | None = None
        #: What the switch said when each recent generation was applied here.
        self.outcomes: dict[int, object] = {}
        self._position = 0
        self._progress = asyncio.Event()
        self._reports_changed = asyncio.Event()
        self._apply_wake = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Verdict]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._void_since: float | None = None
        self._started = False
        self._stopped = False
        self.records_skipped = 0
        self.writes: dict[str, int] = {}

    # ----------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        return self._consumer is not None and self.degraded is None

    @property
    def desired(self) -> DesiredState:
        return self.log.effective()

    async def start(self) -> None:
        """Read the control topic to its end and apply the latest desired state
        (or run degraded on the configuration). Never raises on broker trouble."""
        if self._started:
            return
        self._started = True
        try:
            async with asyncio.timeout(self.options.startup_timeout_s):
                await self._connect()
                await self._catch_up()
        except Exception as exc:  # noqa: BLE001 - any failure: degraded, keep retrying
            await self._disconnect()
            self._set_degraded(_describe(exc))
            self._spawn(self._retry_loop(), "fleet.retry")
            self._spawn(self._heartbeat_loop(), "fleet.heartbeat")
            return
        await self._apply_latest(initial=True)
        self._run()
        log.info(
            "fleet.started",
            topic=self.options.topic,
            generation=self.log.generation,
            applied=self.applied_generation,
            replicas=len(self.reports),
        )

    def _run(self) -> None:
        self._spawn(self._follow_loop(), "fleet.follow")
        self._spawn(self._apply_loop(), "fleet.apply")
        if not any(t.get_name() == "fleet.heartbeat" for t in self._tasks):
            self._spawn(self._heartbeat_loop(), "fleet.heartbeat")
        self._spawn(self.publish_report(), "fleet.report")

    async def stop(self) -> None:
        """Stop following; publish a tombstone for this replica's report."""
        if self._stopped:
            return
        self._stopped = True
        tasks = list(self._tasks)
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
        log.info("fleet.stopped", applied=self.applied_generation)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet.task_failed", task=task.get_name(), error=repr(task.exception()))

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
        self._position = 0
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

    async def _catch_up(self) -> None:
        """Read every record up to the topic's end as it is now."""
        consumer = self._consumer
        assert consumer is not None
        end = (await consumer.end_offsets([self._tp]))[self._tp]
        while self._position < end:
            batch = await consumer.getmany(self._tp, timeout_ms=200)
            for record in batch.get(self._tp, ()):
                self._on_record(record.offset, record.key, record.value)

    async def _retry_loop(self) -> None:
        while self.degraded is not None:
            await asyncio.sleep(self.options.retry_s)
            try:
                async with asyncio.timeout(max(self.options.startup_timeout_s, 1.0)):
                    await self._connect()
                    await self._catch_up()
            except Exception as exc:  # noqa: BLE001 - still degraded
                await self._disconnect()
                reason = _describe(exc)
                if reason != self.degraded:
                    self._set_degraded(reason)
                continue
            log.info("fleet.recovered", topic=self.options.topic, generation=self.log.generation)
            self.degraded = None
            await self._apply_latest(initial=False)
            self._run()
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
            for record in batch.get(self._tp, ()):
                self._on_record(record.offset, record.key, record.value)

    def _on_record(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        self._position = offset + 1
        self._progress.set()
        self._progress = asyncio.Event()
        if key == DESIRED_KEY:
            if value is None:
                return
            try:
                proposal = proposal_from_pb(pb.FleetDesiredState.FromString(value))
            except (DecodeError, ValueError) as exc:
                self._skip(offset, exc)
                return
            before = self.log.generation
            verdict = self.log.apply(proposal)
            if verdict is Verdict.VOID:
                if self._void_since is None:
                    self._void_since = time.monotonic()
            else:
                self._void_since = None
            waiting = self._waiting.pop(proposal.write_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(verdict)
            if self.log.generation != before:
                self._apply_wake.set()
                self._reports_pulse()
            return
        if key is not None and key.startswith(REPLICA_PREFIX):
            instance = key[len(REPLICA_PREFIX) :].decode("utf-8", "replace")
            if value is None:
                self.reports.pop(instance, None)
                self.report_records.pop(instance, None)
            else:
                try:
                    record = pb.ReplicaReport.FromString(value)
                    self.reports[instance] = report_from_pb(record)
                except (DecodeError, ValueError) as exc:
                    self._skip(offset, exc)
                    return
                self.report_records[instance] = record
            self._reports_pulse()
            return
        self._skip(offset, ValueError(f"unknown key {key!r}"))

    def _reports_pulse(self) -> None:
        """Wake every waiter on reports (each waits on the event it saw)."""
        self._reports_changed.set()
        self._reports_changed = asyncio.Event()

    def _skip(self, offset: int, exc: Exception) -> None:
        self.records_skipped += 1
        log.warning("fleet.record_skipped", offset=offset, error=repr(exc))

    # -------------------------------------------------------------- apply

    async def _apply_latest(self, *, initial: bool) -> None:
        async with self._apply_lock:
            target = self.log.effective()
            if target.generation <= self.applied_generation or self.log.current is None:
                return
            try:
                self.outcomes[target.generation] = await self._apply(target, initial)
            except Exception as exc:
                self.failed_generation = target.generation
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("fleet.apply_failed", generation=target.generation, error=repr(exc))
            else:
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
            for old in [g for g in self.outcomes if g < target.generation - 16]:
                del self.outcomes[old]

    async def _apply_loop(self) -> None:
        while True:
            await self._apply_wake.wait()
            self._apply_wake.clear()
            await self._apply_latest(initial=False)
            await self.publish_report()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            if self.degraded is None:
                await self.publish_report()
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
        )

    async def publish_report(self) -> None:
        producer = self._producer
        if producer is None or self.degraded is not None:
            return
        try:
            value = self.report_record().SerializeToString()
            async with asyncio.timeout(self.options.write_timeout_s):
                await producer.send_and_wait(
                    self.options.topic, value, key=self._report_key(), partition=0
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
            log.warning("fleet.report_failed", error=repr(exc))

    # -------------------------------------------------------------- write

    async def sync(self, timeout: float | None = None) -> None:
        """Wait until every record appended before this call has been read."""
        consumer = self._require()
        async with asyncio.timeout(timeout or self.options.write_timeout_s):
            end = (await consumer.end_offsets([self._tp]))[self._tp]
            while self._position < end:
                await self._progress.wait()

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
        every = tuple(every)
        async with self._write_lock:
            if expected_generation is not None:
                await self.sync()
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
        self.writes[outcome] = self.writes.get(outcome, 0) + 1

    async def _propose(self, proposal: Proposal) -> Verdict:
        producer = self._producer
        if producer is None:
            raise NotReadyError("fleet control is not connected")
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._waiting[proposal.write_id] = future
        try:
            async with asyncio.timeout(self.options.write_timeout_s):
                await producer.send_and_wait(
                    self.options.topic,
                    proposal_to_pb(proposal).SerializeToString(),
                    key=DESIRED_KEY,
                    partition=0,
                )
                return await future
        except TimeoutError as exc:
            raise NotReadyError(
                f"the control topic did not confirm the write within "
                f"{self.options.write_timeout_s:g}s (it may still take effect)"
            ) from exc
        finally:
            self._waiting.pop(proposal.write_id, None)

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
        failed), up to ``timeout``; return one outcome per live replica and
        whether all are in."""
        watch = ApplyWatch(generation, self._clock() if started is None else started)
        deadline = time.monotonic() + timeout
        while True:
            now = self._clock()
            for report in self.reports.values():
                watch.observe(report, now)
            if watch.done(self.reports, now):
                return watch.outcomes(self.reports, now), True
            left = deadline - time.monotonic()
            if left <= 0:
                return watch.outcomes(self.reports, now), False
            changed = self._reports_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 0.5))

    # ------------------------------------------------------------- status

    def topic_partitions(self) -> Mapping[str, set[int] | None]:
        """The consumed topics and their partitions (``None``: not known yet)."""
        return self._partitions() if self._partitions is not None else {}

    def live_reports(self) -> dict[str, Report]:
        now = self._clock()
        return {k: r for k, r in self.reports.items() if not is_stale(r, now)}


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
    )
