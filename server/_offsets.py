"""Per-partition offset arithmetic and the commit policy. Pure: no Kafka, no clock.

The consumer dispatches events without waiting for them, so they finish out of
order. Kafka only stores one number per partition ("everything below this is
done"), so the number we may commit is the highest *contiguous* finished offset
+ 1: an unfinished event anywhere below holds the commit back. That is the
at-least-once rule of docs/design.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class OffsetTracker:
    """Offsets of one partition assignment, from dispatch to finish.

    ``add(offset)`` when an event is taken from the broker (offsets strictly
    increasing; gaps, e.g. from compaction or transaction markers, are fine);
    ``done(offset)`` when it is finished (handled, or dead-lettered and the
    dead letter acknowledged). ``committable`` is the offset to commit: the
    highest offset such that every added offset below it is done, + 1. It only
    ever moves forward.

    Cost: a deque of offsets in dispatch order plus the set of unfinished
    ones. ``add`` appends to both and ``done`` only removes from the set: the
    contiguous finished prefix is popped from the deque lazily, when
    ``committable`` or ``lowest_unfinished`` is read (at commit time, about once
    a second), not per event. Every offset is appended once and popped once:
    O(1) amortised per event.
    """

    __slots__ = ("_floor", "_pending", "_unfinished", "last_added")

    def __init__(self) -> None:
        # Dispatch order; a prefix of finished offsets may not be popped yet.
        self._pending: deque[int] = deque()
        self._unfinished: set[int] = set()
        #: The highest offset added so far (``None`` before the first).
        self.last_added: int | None = None
        # Everything added below this is done (``None``: nothing finished yet);
        # valid as of the last _advance.
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
        """Pop the finished prefix of the dispatch order."""
        pending, unfinished = self._pending, self._unfinished
        while pending and pending[0] not in unfinished:
            self._floor = pending.popleft() + 1
        if pending and self._floor is not None:
            # Every added offset below pending[0] is done; with gaps (compaction,
            # transaction markers) it may be far above the last one finished, and
            # committing it is still right: the gap was never delivered.
            self._floor = pending[0]

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
        self._advance()
        return self._pending[0] if self._pending else None


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
