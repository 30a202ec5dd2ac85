"""The fleet's desired state, as a pure fold over the control topic.

No Kafka, no gRPC, no clock of its own: :mod:`server._fleet` reads the topic
and feeds each record here in order; the RPC layer asks here what to write.

Compare-and-set by the topic's order. The control topic has one partition, so
every replica reads the same records in the same order. A write is a
*proposal*: the full new state plus the generation it replaces
(``base_generation``). Folding the topic in order (:meth:`FleetLog.apply`):

- a proposal whose base is the current generation (and whose request ID is
  not among the recent ones) is **accepted**: it becomes the current state,
  at generation base + 1;
- any other proposal is **void**: it changes nothing. Its writer sees that
  when it reads its own record back and answers ``ABORTED`` (when the caller
  gave ``expected_generation``) or plans again on the newer state.

Two writers racing from the same base therefore never both win: whichever
record the broker appended first is accepted, the other is void, and every
replica agrees because they all read the same order.

Compaction keeps only the latest ``desired`` record. So that this is always an
accepted state (never a void proposal), a writer whose proposal was void
writes a **restatement** of the current state right away (base = generation,
change ``"restate"``), and any replica that finds the latest record void after
a heartbeat does the same. A reader that starts with no state takes the first
``desired`` record it sees as the state: after compaction, that record is the
latest restatement or accepted proposal.

Request-ID deduplication lives in the state itself (``recent``: the request IDs
of the latest accepted writes), so a retry through any replica, even after a
restart or a compaction, finds its first answer and never bumps the generation
twice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final, TypeAlias

from pool import PoolMode

Partition: TypeAlias = tuple[str, int]

#: Accepted request IDs kept in the desired state (for retries through any replica).
RECENT_REQUESTS: Final = 64
#: A replica whose report is older than this many heartbeats is stale.
STALE_HEARTBEATS: Final = 3

CHANGE_MODE: Final = "mode"
CHANGE_ROLLOUT: Final = "rollout"
CHANGE_PAUSE: Final = "pause"
CHANGE_RESUME: Final = "resume"
CHANGE_RESTATE: Final = "restate"


# ------------------------------------------------------------------ pauses


@dataclass(frozen=True, slots=True)
class Paused:
    """Operator-paused partitions: every partition (``all``) or a set."""

    all: bool = False
    partitions: frozenset[Partition] = frozenset()

    @classmethod
    def of(cls, partitions: Iterable[Partition] | None) -> Paused:
        """``None`` = every partition."""
        if partitions is None:
            return cls(all=True)
        return cls(partitions=frozenset(partitions))

    @property
    def empty(self) -> bool:
        return not self.all and not self.partitions

    def pause(self, partitions: Iterable[Partition] | None) -> Paused:
        if self.all or partitions is None:
            return Paused(all=True)
        return Paused(partitions=self.partitions | frozenset(partitions))

    def resume(self, partitions: Iterable[Partition] | None) -> Paused:
        """Lift the pause of ``partitions`` (all when ``None``).

        Resuming some partitions of an "all" pause is not representable
        without the fleet's partition list: the caller expands "all" first
        (:meth:`expand`)."""
        if partitions is None:
            return Paused()
        return Paused(partitions=self.partitions - frozenset(partitions))

    def expand(self, every: Iterable[Partition]) -> Paused:
        """ "All" as the explicit set ``every``; a set stays as it is."""
        if not self.all:
            return self
        return Paused(partitions=frozenset(every))

    def covers(self, partition: Partition) -> bool:
        return self.all or partition in self.partitions

    def sorted(self) -> list[Partition]:
        return sorted(self.partitions)


# ------------------------------------------------------------ desired state


@dataclass(frozen=True, slots=True)
class DesiredState:
    """The fleet's desired state at ``generation`` (0 = none written yet:
    the configured values)."""

    generation: int
    mode: PoolMode
    rollout: float
    paused: Paused = Paused()
    change: str = ""
    #: What a ``"resume"`` write resumed (replicas lift drain pauses there too).
    resumed: Paused = Paused()
    request_id: str = ""
    writer: str = ""
    caller_role: str = ""
    caller_peer: str = ""
    time: float = 0.0
    #: ``(request_id, generation)`` of the latest accepted writes, oldest first.
    recent: tuple[tuple[str, int], ...] = ()

    def generation_of(self, request_id: str) -> int | None:
        """The generation a recent write with ``request_id`` produced."""
        if not request_id:
            return None
        for rid, gen in self.recent:
            if rid == request_id:
                return gen
        return None


@dataclass(frozen=True, slots=True)
class Proposal:
    """One ``desired`` record of the control topic."""

    state: DesiredState
    base_generation: int
    write_id: str = ""

    @property
    def restatement(self) -> bool:
        return self.state.generation == self.base_generation


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    #: A restatement of the current state (changes nothing, repairs a void tail).
    RESTATED = "restated"
    VOID = "void"


@dataclass(frozen=True, slots=True)
class Change:
    """What a fleet call asks for; ``None`` fields stay as they are."""

    kind: str
    mode: PoolMode | None = None
    rollout: float | None = None
    #: pause/resume: the partitions (``None`` = all).
    partitions: tuple[Partition, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (CHANGE_MODE, CHANGE_ROLLOUT, CHANGE_PAUSE, CHANGE_RESUME):
            raise ValueError(f"unknown change {self.kind!r}")
        if self.rollout is not None and (
            not math.isfinite(self.rollout) or not 0.0 <= self.rollout <= 100.0
        ):
            raise ValueError(f"rollout percent must be within 0..100, got {self.rollout!r}")

    def apply(self, state: DesiredState, every: Iterable[Partition] = ()) -> DesiredState:
        """The state after this change (generation and provenance untouched).

        ``every``: the fleet's partitions, to resume some partitions of an
        "all" pause."""
        if self.kind == CHANGE_MODE:
            assert self.mode is not None
            return replace(state, mode=self.mode, change=self.kind, resumed=Paused())
        if self.kind == CHANGE_ROLLOUT:
            assert self.rollout is not None
            return replace(state, rollout=self.rollout, change=self.kind, resumed=Paused())
        if self.kind == CHANGE_PAUSE:
            return replace(
                state,
                paused=state.paused.pause(self.partitions),
                change=self.kind,
                resumed=Paused(),
            )
        paused = state.paused
        if paused.all and self.partitions is not None:
            paused = paused.expand(every)
        return replace(
            state,
            paused=paused.resume(self.partitions),
            change=self.kind,
            resumed=Paused.of(self.partitions),
        )


# ------------------------------------------------------------------ planning


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``proposal`` to the topic."""

    proposal: Proposal


@dataclass(frozen=True, slots=True)
class Replay:
    """The request ID was already accepted at ``generation``: answer from there."""

    generation: int


@dataclass(frozen=True, slots=True)
class Mismatch:
    """``expected_generation`` is not the current generation (``FAILED_PRECONDITION``)."""

    current: int
    expected: int


Plan: TypeAlias = Write | Replay | Mismatch


def plan(
    current: DesiredState,
    change: Change,
    *,
    write_id: str,
    request_id: str = "",
    expected_generation: int | None = None,
    writer: str = "",
    caller_role: str = "",
    caller_peer: str = "",
    now: float = 0.0,
    every: Iterable[Partition] = (),
) -> Plan:
    """What to do for ``change`` given the ``current`` desired state."""
    seen = current.generation_of(request_id)
    if seen is not None:
        return Replay(seen)
    if expected_generation is not None and expected_generation != current.generation:
        return Mismatch(current=current.generation, expected=expected_generation)
    generation = current.generation + 1
    recent = current.recent
    if request_id:
        recent = (*recent, (request_id, generation))[-RECENT_REQUESTS:]
    state = replace(
        change.apply(current, every),
        generation=generation,
        request_id=request_id,
        writer=writer,
        caller_role=caller_role,
        caller_peer=caller_peer,
        time=now,
        recent=recent,
    )
    return Write(Proposal(state, base_generation=current.generation, write_id=write_id))


def restatement(current: DesiredState, *, write_id: str, writer: str, now: float) -> Proposal:
    """A record repeating ``current`` (after a void record at the topic's tail)."""
    state = replace(current, change=CHANGE_RESTATE, resumed=Paused(), writer=writer, time=now)
    return Proposal(state, base_generation=current.generation, write_id=write_id)


# --------------------------------------------------------------------- fold


class FleetLog:
    """The fold of the control topic's ``desired`` records, in topic order.

    ``current`` is ``None`` until the first record; :meth:`effective` falls
    back to the configured defaults. ``tail_void`` says whether the latest
    record was void (a restatement is due). Verdicts of recent writes are kept
    by ``write_id`` (bounded) for the writers waiting on them.
    """

    def __init__(self, defaults: DesiredState, *, remember: int = 1024) -> None:
        if defaults.generation != 0:
            raise ValueError("defaults must be at generation 0")
        self.defaults = defaults
        self.current: DesiredState | None = None
        self.tail_void = False
        self.records = 0
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()
        self._remember = remember

    def effective(self) -> DesiredState:
        return self.current if self.current is not None else self.defaults

    @property
    def generation(self) -> int:
        return self.effective().generation

    def apply(self, proposal: Proposal) -> Verdict:
        """Fold one record; return its verdict."""
        self.records += 1
        verdict = self._judge(proposal)
        if verdict is not Verdict.VOID:
            self.current = proposal.state
        self.tail_void = verdict is Verdict.VOID
        if proposal.write_id:
            self._verdicts[proposal.write_id] = verdict
            while len(self._verdicts) > self._remember:
                self._verdicts.popitem(last=False)
        return verdict

    def _judge(self, proposal: Proposal) -> Verdict:
        state = proposal.state
        current = self.current
        if current is None:
            # Nothing read yet: after compaction the first record is the
            # latest kept, an accepted state or a restatement of one. An
            # uncompacted log starts with generation 1 from base 0.
            if proposal.restatement:
                return Verdict.RESTATED
            return Verdict.ACCEPTED
        if proposal.restatement:
            return Verdict.RESTATED if state.generation == current.generation else Verdict.VOID
        if (
            proposal.base_generation == current.generation
            and state.generation == current.generation + 1
            and current.generation_of(state.request_id) is None
        ):
            return Verdict.ACCEPTED
        return Verdict.VOID

    def verdict(self, write_id: str) -> Verdict | None:
        return self._verdicts.get(write_id)


# ----------------------------------------------------------- replica reports


@dataclass(frozen=True, slots=True)
class Report:
    """One replica's report, as far as the fleet logic needs it."""

    instance: str
    applied_generation: int
    mode: PoolMode
    rollout: float
    paused: Paused
    time: float
    heartbeat_s: float
    grpc_address: str = ""
    failed_generation: int = 0
    last_error: str = ""
    #: The reporting process's host name (where a loopback address means it).
    host: str = ""


def is_stale(report: Report, now: float) -> bool:
    """No report for :data:`STALE_HEARTBEATS` heartbeats."""
    return now - report.time > STALE_HEARTBEATS * report.heartbeat_s


def differences(
    desired: DesiredState,
    *,
    applied_generation: int,
    mode: PoolMode,
    rollout: float,
    paused: Paused,
) -> list[str]:
    """How a replica differs from ``desired`` (empty = in line with it).

    Only meaningful once the fleet has a desired state (generation > 0)."""
    out: list[str] = []
    if desired.generation == 0:
        return out
    if applied_generation != desired.generation:
        out.append(f"generation {applied_generation}, fleet {desired.generation}")
    if mode is not desired.mode:
        out.append(f"mode {mode.value}, fleet {desired.mode.value}")
    if not math.isclose(rollout, desired.rollout, abs_tol=0.005):
        out.append(f"rollout {rollout:g}%, fleet {desired.rollout:g}%")
    if paused != desired.paused:
        out.append(f"paused {_paused_text(paused)}, fleet {_paused_text(desired.paused)}")
    return out


def report_differences(desired: DesiredState, report: Report) -> list[str]:
    return differences(
        desired,
        applied_generation=report.applied_generation,
        mode=report.mode,
        rollout=report.rollout,
        paused=report.paused,
    )


def _paused_text(paused: Paused) -> str:
    if paused.all:
        return "all"
    if not paused.partitions:
        return "none"
    return ",".join(f"{t}:{p}" for t, p in paused.sorted())


# ------------------------------------------------------------ write results


class Outcome(StrEnum):
    APPLIED = "applied"
    PENDING = "pending"
    FAILED = "failed"
    #: Not applied, and provably gone (its report is not stale yet): not waited for.
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ReplicaOutcome:
    instance: str
    grpc_address: str
    outcome: Outcome
    applied_generation: int
    #: Seconds from the call's start until its report was read (``None``: not yet).
    took_s: float | None
    error: str = ""


@dataclass(slots=True)
class ApplyWatch:
    """Tracks which live replicas applied ``generation`` since ``started``.

    ``observe`` is fed every report read (with the reader's clock); ``done``
    when every live replica applied or failed. A replica whose report is
    stale is not waited for; a replica that stopped (tombstone) is dropped;
    a replica listed in ``down`` (instance -> why: its process is provably
    gone) is answered ``DOWN`` and not waited for, unless it applied.
    """

    generation: int
    started: float
    seen: dict[str, float] = field(default_factory=dict)

    def observe(self, report: Report, now: float) -> None:
        if report.instance in self.seen:
            return
        if report.applied_generation >= self.generation or (
            report.failed_generation == self.generation
        ):
            self.seen[report.instance] = now - self.started

    def outcomes(
        self, reports: Mapping[str, Report], now: float, down: Mapping[str, str] | None = None
    ) -> list[ReplicaOutcome]:
        down = down or {}
        out = []
        for instance, report in sorted(reports.items()):
            if is_stale(report, now) and instance not in self.seen:
                continue
            took = self.seen.get(instance)
            if report.failed_generation == self.generation and (
                report.applied_generation < self.generation
            ):
                outcome = Outcome.FAILED
            elif report.applied_generation >= self.generation and took is not None:
                outcome = Outcome.APPLIED
            elif report.applied_generation >= self.generation:
                # Applied before this watch began (a replayed call).
                outcome, took = Outcome.APPLIED, 0.0
            elif instance in down:
                outcome = Outcome.DOWN
            else:
                outcome = Outcome.PENDING
            out.append(
                ReplicaOutcome(
                    instance=instance,
                    grpc_address=report.grpc_address,
                    outcome=outcome,
                    applied_generation=report.applied_generation,
                    took_s=took,
                    error=(
                        report.last_error
                        if outcome is Outcome.FAILED
                        else down[instance]
                        if outcome is Outcome.DOWN
                        else ""
                    ),
                )
            )
        return out

    def done(
        self, reports: Mapping[str, Report], now: float, down: Mapping[str, str] | None = None
    ) -> bool:
        return all(o.outcome is not Outcome.PENDING for o in self.outcomes(reports, now, down))


def partitions_sorted(items: Sequence[Partition]) -> list[Partition]:
    return sorted(set(items))
