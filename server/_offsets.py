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

    Cost: a deque of offsets in dispatch order plus the set of unfinished ones;
    ``done`` pops the finished prefix from the left, so every offset is
    appended once and popped once: O(1) amortised per event.
    """

    __slots__ = ("_committable", "_last_added", "_pending", "_unfinished")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # dispatch order, finished prefix popped
        self._unfinished: set[int] = set()
        self._last_added: int | None = None
        self._committable: int | None = None

    def add(self, offset: int) -> None:
        """Record a dispatched offset; ``ValueError`` unless it is above every earlier one."""
        if self._last_added is not None and offset <= self._last_added:
            raise ValueError(
                f"offset {offset} added after {self._last_added}: offsets must increase "
                "(start a new tracker after a seek or a new assignment)"
            )
        if not self._pending and self._committable is not None:
            self._committable = offset  # all below is done: the gap before it was never delivered
        self._last_added = offset
        self._pending.append(offset)
        self._unfinished.add(offset)

    def done(self, offset: int) -> None:
        """Mark a dispatched offset finished. Unknown or repeated offsets raise ``ValueError``."""
        try:
            self._unfinished.remove(offset)
        except KeyError:
            raise ValueError(f"offset {offset} is not in flight") from None
        pending = self._pending
        if pending[0] != offset:
            return  # finished out of order: the commit waits for the lower ones
        unfinished = self._unfinished
        last = pending.popleft()
        while pending and pending[0] not in unfinished:
            last = pending.popleft()
        # Every added offset up to ``last`` is done; with gaps (compaction,
        # transaction markers) the next pending one may be far above it, and
        # committing ``pending[0]`` is then still right.
        self._committable = pending[0] if pending else last + 1

    @property
    def committable(self) -> int | None:
        """The offset to commit (next to read), or ``None`` while nothing is finished."""
        return self._committable

    @property
    def in_flight(self) -> int:
        """Dispatched offsets not yet finished."""
        return len(self._unfinished)

    @property
    def lowest_unfinished(self) -> int | None:
        """The lowest dispatched offset not finished yet, or ``None``."""
        return self._pending[0] if self._pending else None

    @property
    def last_added(self) -> int | None:
        return self._last_added


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
