"""Per-partition offset arithmetic and the commit policy. Pure: no Kafka, no clock.

The consumer dispatches events without waiting for them, so they finish out of
order. Kafka only stores one number per partition ("everything below this is
done"), so the number we may commit is the highest *contiguous* finished offset
+ 1: an unfinished event anywhere below holds the commit back. That is the
at-least-once rule of docs/design.md.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass


class OffsetTracker:
    """Offsets of one partition assignment, from dispatch to finish.

    ``add(offset)`` when an event is taken from the broker (offsets strictly
    increasing; gaps, e.g. from compaction or transaction markers, are fine);
    ``done(offset)`` when it is finished (handled, or dead-lettered and the
    dead letter acknowledged). ``committable`` is the offset to commit: the
    highest offset such that every added offset below it is done, + 1. It only
    ever moves forward.

    Cost: a list of the offsets in dispatch order (sorted) plus the set of
    unfinished ones. ``add`` appends to both and ``done`` only removes from the
    set: nothing per event moves the commit point. It moves when it is read
    (at commit time, about once a second): everything below the lowest
    unfinished offset (``min`` of the set, in C) is done, and a binary search
    finds it in the list, whose finished prefix is then dropped. So the
    per-event cost is two appends and a removal; the read costs a pass over
    the unfinished offsets, not over the events finished since the last one.
    """

    #: ``_pending`` and ``_unfinished`` are never rebound: the consumer's hot
    #: path binds their ``append``/``add``/``remove`` (``add`` and ``done``
    #: written out, with the same checks; an event that finishes inside its
    #: dispatch call is appended to ``_pending`` only, which is the state
    #: ``add`` then ``done`` leave).
    __slots__ = ("_floor", "_head", "_pending", "_unfinished", "last_added")

    #: The finished prefix of ``_pending`` is dropped once it is this long and
    #: more than half of the list.
    COMPACT_AT = 4096

    def __init__(self) -> None:
        # Offsets in dispatch order (increasing); those before ``_head`` are done.
        self._pending: list[int] = []
        self._head = 0
        self._unfinished: set[int] = set()
        #: The highest offset added so far (``None`` before the first).
        self.last_added: int | None = None
        # Everything added below this is done (``None``: nothing finished yet),
        # as of the last _advance.
        self._floor: int | None = None

    def add(self, offset: int) -> None:
        """Record a dispatched offset; ``ValueError`` unless it is above every earlier one."""
        last = self.last_added
        if last is not None and offset <= last:
            raise ValueError(
                f"offset {offset} added after {last}: offsets must increase "
                "(start a new tracker after a seek or a new assignment)"
            )
        self.last_added = offset
        self._pending.append(offset)
        self._unfinished.add(offset)

    def done(self, offset: int) -> None:
        """Mark a dispatched offset finished. Unknown or repeated offsets raise ``ValueError``."""
        try:
            self._unfinished.remove(offset)
        except KeyError:
            raise ValueError(f"offset {offset} is not in flight") from None

    def _advance(self) -> None:
        """Move the commit point up to the lowest unfinished offset."""
        pending, head = self._pending, self._head
        if head == len(pending):
            return  # nothing added since the last advance
        unfinished = self._unfinished
        if pending[head] in unfinished:  # the lowest one is not finished yet
            if self._floor is not None:
                self._floor = pending[head]  # everything below it is (a gap before it)
            return
        if not unfinished:
            self._floor = pending[-1] + 1
            pending.clear()
            self._head = 0
            return
        # Every added offset below the lowest unfinished one is done; with gaps
        # (compaction, transaction markers) it may be far above the last one
        # finished, and committing it is still right: the gap was never delivered.
        lowest = min(unfinished)
        self._floor = lowest
        head = bisect_left(pending, lowest, head)
        if head >= self.COMPACT_AT and head * 2 > len(pending):
            del pending[:head]
            head = 0
        self._head = head

    @property
    def committable(self) -> int | None:
        """The offset to commit (next to read), or ``None`` while nothing is finished."""
        self._advance()
        return self._floor

    @property
    def in_flight(self) -> int:
        """Dispatched offsets not yet finished."""
        return len(self._unfinished)

    @property
    def lowest_unfinished(self) -> int | None:
        """The lowest dispatched offset not finished yet, or ``None``."""
        unfinished = self._unfinished
        if not unfinished:
            return None
        self._advance()
        return self._pending[self._head]


@dataclass(frozen=True, slots=True)
class CommitPolicy:
    """When to commit on the timer: something new to commit and ``interval_s`` elapsed.

    Commits on revoke and on shutdown bypass the policy (they always happen).
    """

    interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"commit interval must be > 0, got {self.interval_s}")

    def should_commit(self, now: float, last_commit_at: float, dirty: bool) -> bool:
        """``now`` and ``last_commit_at`` come from the same monotonic clock."""
        return dirty and now - last_commit_at >= self.interval_s
