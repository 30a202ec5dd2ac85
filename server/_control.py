"""What the gRPC control plane needs from the running service.

The servicer in :mod:`server._grpc` talks only to a :class:`ControlTarget`;
the service (:mod:`server._service`) implements it, and tests can implement
it over a bare :class:`pool.PoolSwitch`. Everything crossing this boundary is
a plain frozen dataclass or a tuple: no protobuf, no Kafka types.

Partitions are ``(topic, partition)`` tuples; ``aiokafka.TopicPartition`` is a
``NamedTuple`` of exactly that shape, so it can be passed and returned as is.

Errors raised across the boundary derive from :class:`ControlError`; the
servicer maps each type to one gRPC status code in one place. Any other
exception becomes ``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from pool import DeadLetter, Pool, PoolMode
from server._errors import ServiceError

#: ``(topic, partition)``; ``aiokafka.TopicPartition`` fits.
Partition: TypeAlias = tuple[str, int]


# --------------------------------------------------------------------- errors


class ControlError(ServiceError):
    """Root of the errors a :class:`ControlTarget` raises to the control plane."""


class NotReadyError(ControlError):
    """The service is starting or stopping and cannot do this now (``UNAVAILABLE``)."""

    retriable = True


class UnknownPartitionError(ControlError):
    """A listed partition is not assigned to this replica (``NOT_FOUND``)."""

    def __init__(self, partitions: Sequence[Partition]) -> None:
        names = ", ".join(f"{t}[{p}]" for t, p in partitions)
        super().__init__(f"partitions not assigned to this replica: {names}")
        self.partitions = tuple(partitions)


class PreconditionError(ControlError):
    """The call is valid but the service's state forbids it (``FAILED_PRECONDITION``).

    Examples: a second ``drain`` while one runs; ``redrive`` with no producer.
    """


class ConflictError(ControlError):
    """A concurrent change won the race (``ABORTED``): a fleet write whose
    generation another write took first, by the control topic's order.

    Not retriable as it stands: with its ``expected_generation`` the same call
    now finds the fleet at another generation. The caller reads the fleet's
    state again and decides afresh (gRPC's "retry at a higher level")."""


class DrainIncompleteError(ControlError):
    """``drain`` ran out of time (``DEADLINE_EXCEEDED``).

    ``result`` says what was finished and committed before the deadline and
    what remained (``result.remaining > 0``). Retriable: a later drain may
    finish once the handlers caught up.
    """

    retriable = True

    def __init__(self, result: DrainResult, timeout: float) -> None:
        super().__init__(
            f"drain timed out after {timeout:.3f}s: {result.remaining} events still in flight"
        )
        self.result = result
        self.timeout = timeout


# ----------------------------------------------------------- the mode switch


class SwitchOutcome(Protocol):
    """What ``set_mode``/``set_rollout`` return (``pool.SwitchResult`` fits)."""

    @property
    def previous_mode(self) -> PoolMode: ...
    @property
    def mode(self) -> PoolMode: ...
    @property
    def previous_rollout(self) -> float: ...
    @property
    def rollout(self) -> float: ...
    @property
    def generation(self) -> int: ...
    @property
    def took_s(self) -> float: ...
    @property
    def waited_aggregates(self) -> int: ...
    @property
    def pending_aggregates(self) -> int: ...


class ModeSwitch(Protocol):
    """The part of ``pool.PoolSwitch`` the control plane uses (``PoolSwitch`` fits)."""

    @property
    def mode(self) -> PoolMode: ...
    @property
    def rollout_percent(self) -> float: ...
    @property
    def generation(self) -> int: ...
    @property
    def since(self) -> float:
        """Wall clock (epoch seconds) of the last mode or rollout change."""

    @property
    def pools(self) -> Mapping[PoolMode, Pool]: ...
    @property
    def in_flight(self) -> int: ...

    def route(self, aggregate_id: str) -> PoolMode:
        """Which pool new events of ``aggregate_id`` go to now. Never blocks."""

    def where(self, aggregate_id: str) -> tuple[PoolMode, int]:
        """(pool, executor index) that handles ``aggregate_id``'s next event. Never blocks."""

    async def set_mode(self, mode: PoolMode, *, wait_timeout: float | None = ...) -> SwitchOutcome:
        """Switch; returns once the new mode is in force. Calls are serialised."""

    async def set_rollout(
        self, percent: float, *, wait_timeout: float | None = ...
    ) -> SwitchOutcome:
        """Set the actor share; ``ValueError`` when outside 0..100."""


# -------------------------------------------------------------- status types


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One assigned partition as the consumer sees it.

    Offsets are Kafka "next offset" positions; ``None`` when unknown (nothing
    committed yet, or the high watermark not fetched yet).
    ``paused_reasons`` is a subset of ``"operator"`` (Pause RPC), ``"drain"``
    (Drain RPC) and ``"backpressure"`` (a full executor queue).
    """

    topic: str
    partition: int
    committed: int | None
    position: int | None
    high_watermark: int | None
    lag: int | None
    paused: bool
    paused_reasons: tuple[str, ...] = ()
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """One of the two pools."""

    mode: PoolMode
    size: int
    capacity: int
    in_flight: int
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A snapshot of the service for ``GetStatus``."""

    mode: PoolMode
    rollout_percent: float
    generation: int
    since: float
    partitions: tuple[PartitionStatus, ...]
    in_flight: int
    pools: tuple[PoolStatus, ...]
    restarts: int
    dead_letters: int
    uptime_s: float
    version: str
    ready: bool = True
    draining: bool = False
    group_id: str = ""
    instance: str = ""


# --------------------------------------------------------------- drain types


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    topic: str
    partition: int
    offset: int  # the next offset to consume, as committed to Kafka


@dataclass(frozen=True, slots=True)
class DrainProgress:
    """Reported while a drain runs (roughly every 100 ms, and on each commit)."""

    finished: int
    remaining: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain did: events finished after it began, time, offsets committed."""

    finished: int
    took_s: float
    committed: tuple[CommittedOffset, ...]
    remaining: int = 0
    partitions: tuple[Partition, ...] = ()
    resumed: bool = False


# --------------------------------------------------------- dead-letter types


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Selects dead letters; an empty field matches everything.

    ``since`` is a wall-clock lower bound (epoch seconds, inclusive);
    ``ids`` (when non-empty) restricts to those dead-letter IDs.
    """

    topic: str = ""
    aggregate_id: str = ""
    error_type: str = ""
    reason: str = ""
    since: float = 0.0
    ids: tuple[str, ...] = ()

    def matches(self, dead: DeadLetter) -> bool:
        msg = dead.message
        return (
            (not self.topic or msg.topic == self.topic)
            and (not self.aggregate_id or msg.aggregate_id == self.aggregate_id)
            and (not self.error_type or dead.error_type == self.error_type)
            and (not self.reason or str(dead.reason) == self.reason)
            and dead.time >= self.since
            and (not self.ids or dead.id in self.ids)
        )


@dataclass(frozen=True, slots=True)
class RedriveResult:
    """``matched`` dead letters found, ``republished`` to their original topic,
    ``failed`` could not be published (``errors`` says why, per ID)."""

    matched: int
    republished: int
    failed: int
    errors: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------- the protocol


class ControlTarget(Protocol):
    """The running service as the control plane sees it.

    Every method is called on the event loop. "Never blocks" means it returns
    without awaiting anything slow; ``async`` methods may wait as documented.
    """

    @property
    def switch(self) -> ModeSwitch:
        """The live mode switch (``pool.PoolSwitch``). Never blocks."""

    def status(self) -> ServiceStatus:
        """A consistent snapshot of mode, partitions, pools and counters.

        Never blocks (uses offsets and watermarks already known). Never raises.
        """

    async def pause(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        """Stop fetching from ``partitions`` (all assigned when ``None``).

        Marks them paused for reason ``"operator"`` until :meth:`resume`; events
        already fetched keep being handled. Returns the partitions now paused by
        the operator. Idempotent. Returns once the consumer stopped fetching
        them (no waiting on handlers). Raises :class:`UnknownPartitionError` if
        a listed partition is not assigned, :class:`NotReadyError` while
        starting or stopping.
        """

    async def resume(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        """Undo :meth:`pause` and drain-pauses for ``partitions`` (all when ``None``).

        Backpressure pauses stay until their queue has room. Returns the
        partitions that were resumed. Idempotent. Raises as :meth:`pause`.
        """

    async def drain(
        self,
        *,
        timeout: float,
        partitions: Sequence[Partition] | None = None,
        resume_after: bool = False,
        progress: Callable[[DrainProgress], None] | None = None,
    ) -> DrainResult:
        """Pause intake of ``partitions`` (all when ``None``), wait until every
        fetched event of them is finished, commit their offsets, and return.

        Blocks up to ``timeout`` seconds. ``progress`` is called (synchronously,
        must not block) as events finish. Intake stays paused (reason
        ``"drain"``) until :meth:`resume`, unless ``resume_after`` — which is
        honoured on timeout as well. Raises :class:`DrainIncompleteError` on
        timeout (offsets finished so far are committed),
        :class:`UnknownPartitionError`, :class:`PreconditionError` if a drain is
        already running, :class:`NotReadyError`.
        """

    def select_dead_letters(
        self, filter: DeadLetterFilter, limit: int | None = None
    ) -> list[DeadLetter]:
        """Dead letters still held in memory that match, oldest first, at most
        ``limit`` (the newest ``limit`` when more match). Never blocks."""

    def subscribe_dead_letters(self, callback: Callable[[DeadLetter], None]) -> Callable[[], None]:
        """Call ``callback`` for every dead letter recorded from now on.

        The callback runs synchronously on the event loop right after the dead
        letter is recorded (so it has its ``id``); it must not block or raise.
        Returns an idempotent unsubscribe function. Never blocks.
        """

    async def redrive(
        self, *, ids: Sequence[str] = (), filter: DeadLetterFilter | None = None
    ) -> RedriveResult:
        """Republish dead letters (by ``ids``, else by ``filter``) to their
        original topic, with their original key, value and headers. The
        servicer always passes non-empty ``ids`` or a ``filter`` (it refuses a
        request with neither), so "redrive everything" needs an explicit filter.

        Blocks until the broker acknowledged them. A republished dead letter is
        removed from memory. Raises :class:`PreconditionError` when there is no
        producer, :class:`NotReadyError`.
        """
