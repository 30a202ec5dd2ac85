"""Which partitions the consumer must not fetch, and why. Pure: no Kafka, no I/O.

A partition is fetched only while nothing holds it. Holds are kept by reason,
so one reason never lifts another (an operator's Resume does not end a
backpressure pause, the end of a backpressure pause does not undo a Pause):

- ``backpressure``: an event of the partition found its executor's queue full.
  It and every later event of the partition fetched meanwhile wait in the
  partition's *backlog*, in offset order, while the consumer submits them one
  by one, each as soon as there is room. The hold lifts by itself when the
  backlog has been emptied that way.
- ``operator``: a ``Pause``, until a ``Resume``; with fleet control, the
  fleet's operator-paused partitions (:meth:`PauseBook.set_holds` replaces
  them with each desired state applied).
- ``drain``: a ``Drain``, until a ``Resume`` (or the drain's ``resume_after``).

Separately from the holds, once fetching stops (shutdown) every partition is
paused, whatever its holds.

:class:`PauseBook` keeps that state for the assigned partitions and says which
``pause``/``resume`` calls make the Kafka consumer match it
(:meth:`PauseBook.take_changes`); it calls nothing itself. Partitions are any
hashable value (``aiokafka.TopicPartition`` in the service), events any value.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Final, Generic, TypeVar

OPERATOR: Final = "operator"
DRAIN: Final = "drain"
BACKPRESSURE: Final = "backpressure"
#: Every reason, in the order they are reported.
REASONS: Final = (OPERATOR, DRAIN, BACKPRESSURE)
#: The reasons :meth:`PauseBook.hold` and :meth:`PauseBook.release` take (the
#: backpressure hold follows the backlog).
CONTROL_REASONS: Final = (OPERATOR, DRAIN)

P = TypeVar("P", bound=Hashable)
E = TypeVar("E")


class _Partition(Generic[E]):
    """One assigned partition's backlog and its state at the consumer."""

    __slots__ = ("backlog", "backpressure", "paused", "revoked")

    def __init__(self) -> None:
        self.backlog: deque[E] = deque()
        self.backpressure = False
        #: As last returned by ``take_changes`` (a new assignment is not paused).
        self.paused = False
        self.revoked = False


class PauseBook(Generic[P, E]):
    """Holds by reason, backlogs, and the pause state of the assigned partitions.

    Lifecycle of a partition: :meth:`assign`, then (on a rebalance)
    :meth:`revoke` — from then on no call is asked for it, while its holds are
    still reported — and :meth:`forget`. Every method is synchronous and
    cheap; only :meth:`defer` and the reads are on the consumer's per-event
    path.
    """

    __slots__ = ("_all", "_dirty", "_parts", "_some", "_stopped")

    def __init__(self) -> None:
        self._parts: dict[P, _Partition[E]] = {}
        #: Operator / drain holds on every partition, also those assigned later.
        self._all: set[str] = set()
        #: Operator / drain holds on listed partitions (kept across reassignments).
        self._some: dict[str, set[P]] = {reason: set() for reason in CONTROL_REASONS}
        self._stopped = False
        #: Partitions whose wanted state may differ from the one at the consumer.
        self._dirty: dict[P, None] = {}

    # ----------------------------------------------------------- assignment

    def assign(self, partition: P) -> None:
        """Start keeping ``partition`` (not paused at the consumer yet). The
        holds placed on it, or on every partition, apply at once."""
        self._parts[partition] = _Partition()
        self._dirty[partition] = None

    def revoke(self, partition: P) -> None:
        """The partition is being taken away: no more calls are asked for it.
        Its holds and backlog stay until :meth:`forget` / :meth:`drop_backlog`."""
        self._parts[partition].revoked = True
        self._dirty.pop(partition, None)

    def forget(self, partition: P) -> None:
        """Stop keeping ``partition`` (its holds by name stay, for a reassignment)."""
        self._parts.pop(partition, None)
        self._dirty.pop(partition, None)

    def clear(self) -> None:
        """Forget every partition."""
        self._parts.clear()
        self._dirty.clear()

    def __contains__(self, partition: object) -> bool:
        return partition in self._parts

    def stop(self) -> None:
        """Fetching stopped for good: every partition is to be paused, whatever its holds."""
        self._stopped = True
        self._dirty.update(dict.fromkeys(self._parts))

    @property
    def stopped(self) -> bool:
        return self._stopped

    # ---------------------------------------------------- operator and drain

    def hold(self, reason: str, partitions: Iterable[P] | None) -> list[P]:
        """Hold ``partitions`` for ``reason`` (``operator`` or ``drain``); ``None``
        holds every partition, now and assigned later.

        Returns the kept partitions held for ``reason`` afterwards, in
        assignment order. ``ValueError`` for another reason.
        """
        self._check_reason(reason)
        if partitions is None:
            self._all.add(reason)
        else:
            self._some[reason].update(partitions)
        self._dirty.update(dict.fromkeys(self._parts))
        return [p for p in self._parts if self._has(reason, p)]

    def release(self, reasons: Iterable[str], partitions: Iterable[P] | None) -> list[P]:
        """Lift ``reasons`` from ``partitions``; ``None``: from every partition.

        Lifting a reason that held every partition from some of them leaves it
        on the others kept now (not on partitions assigned later). Other
        reasons are untouched: a partition still held for one stays paused.
        Returns the kept partitions that lost a hold, in assignment order.
        ``ValueError`` for a reason other than ``operator`` or ``drain``.
        """
        reasons = tuple(reasons)
        for reason in reasons:
            self._check_reason(reason)
        listed = None if partitions is None else set(partitions)
        before = {p: self._control_holds(p) for p in self._parts}
        for reason in reasons:
            some = self._some[reason]
            if listed is None:
                self._all.discard(reason)
                some.clear()
                continue
            if reason in self._all:
                # "every partition" becomes "every kept partition but these".
                self._all.discard(reason)
                some.update(self._parts)
            some.difference_update(listed)
        released = [p for p, held in before.items() if held - self._control_holds(p)]
        self._dirty.update(dict.fromkeys(released))
        return released

    def set_holds(self, reason: str, partitions: Iterable[P] | None) -> list[P]:
        """Hold exactly ``partitions`` for ``reason``, replacing what it held
        (fleet control states the whole set each time): ``None`` holds every
        partition, now and assigned later; an empty list holds none. Listed
        partitions not kept yet are held from their :meth:`assign` on.

        Returns the kept partitions held for ``reason`` afterwards, in
        assignment order. ``ValueError`` for a reason other than ``operator``
        or ``drain``.
        """
        self._check_reason(reason)
        if partitions is None:
            self._all.add(reason)
            self._some[reason].clear()
        else:
            self._all.discard(reason)
            self._some[reason] = set(partitions)
        self._dirty.update(dict.fromkeys(self._parts))
        return [p for p in self._parts if self._has(reason, p)]

    def holds_of(self, reason: str) -> tuple[bool, frozenset[P]]:
        """What ``reason`` holds: whether every partition, and the listed ones
        (kept or not). ``ValueError`` for a reason other than ``operator`` or ``drain``."""
        self._check_reason(reason)
        return reason in self._all, frozenset(self._some[reason])

    @staticmethod
    def _check_reason(reason: str) -> None:
        if reason not in CONTROL_REASONS:
            raise ValueError(f"hold reason must be one of {CONTROL_REASONS}, got {reason!r}")

    def _has(self, reason: str, partition: P) -> bool:
        return reason in self._all or partition in self._some[reason]

    def _control_holds(self, partition: P) -> set[str]:
        return {r for r in CONTROL_REASONS if self._has(r, partition)}

    # ------------------------------------------------------------- backlog

    def backlog(self, partition: P) -> Sequence[E]:
        """The events of ``partition`` held back, oldest first: a live view (for
        the per-event check "is anything waiting?"), changed only through the book."""
        return self._parts[partition].backlog

    def defer(self, partition: P, event: E) -> None:
        """Hold ``event`` back behind the partition's earlier held events: its
        queue was full, or they wait already. The partition is held for
        backpressure from the first one until the backlog is emptied by
        :meth:`dispatched`."""
        part = self._parts[partition]
        part.backlog.append(event)
        if not part.backpressure:
            part.backpressure = True
            self._dirty[partition] = None

    def dispatched(self, partition: P) -> E:
        """The oldest held event is in the pool now: remove and return it. With
        the last one the backpressure hold lifts. ``IndexError`` when none is held."""
        part = self._parts[partition]
        event = part.backlog.popleft()
        if not part.backlog:
            part.backpressure = False
            self._dirty[partition] = None
        return event

    def drop_backlog(self, partition: P) -> list[E]:
        """Drop the held events (the partition is revoked, or the pool closed:
        they will not be dispatched here) and return them. The backpressure
        hold stays: later events of the partition cannot be dispatched in order."""
        backlog = self._parts[partition].backlog
        dropped = list(backlog)
        backlog.clear()
        return dropped

    # --------------------------------------------------------------- state

    def reasons(self, partition: P) -> tuple[str, ...]:
        """Why ``partition`` is held, in :data:`REASONS` order (empty: it is not)."""
        bp = self._parts[partition].backpressure
        return tuple(r for r in REASONS if (bp if r == BACKPRESSURE else self._has(r, partition)))

    def held_by_control(self, partition: P) -> bool:
        """Whether an operator pause or a drain holds ``partition``."""
        return any(self._has(r, partition) for r in CONTROL_REASONS)

    def held(self, partition: P) -> bool:
        """Whether anything holds ``partition`` (whether fetching stopped or not)."""
        if self._parts[partition].backpressure:
            return True
        return any(self._has(r, partition) for r in CONTROL_REASONS)

    def paused_at_consumer(self) -> list[P]:
        """Kept partitions, not revoked, paused by the calls :meth:`take_changes` returned."""
        return [p for p, part in self._parts.items() if part.paused and not part.revoked]

    def take_changes(self) -> list[tuple[P, bool]]:
        """The calls that make the consumer match: ``(partition, True)`` to pause,
        ``(partition, False)`` to resume; each partition at most once, never a
        call for a revoked one. The caller must make them all: they count as made."""
        changes: list[tuple[P, bool]] = []
        parts = self._parts
        for partition in self._dirty:
            part = parts.get(partition)
            if part is None or part.revoked:
                continue
            want = self._stopped or self.held(partition)
            if want != part.paused:
                part.paused = want
                changes.append((partition, want))
        self._dirty.clear()
        return changes
