"""The offset tracker and the commit policy: pure arithmetic, no broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server._offsets import CommitPolicy, OffsetTracker


def test_nothing_committable_until_the_lowest_offset_is_done() -> None:
    t = OffsetTracker()
    for o in range(5):
        t.add(o)
    t.done(3)
    t.done(1)
    assert t.committable is None
    assert t.in_flight == 3
    t.done(0)
    assert t.committable == 2  # 0 and 1 done, 2 not
    t.done(2)
    assert t.committable == 4
    t.done(4)
    assert t.committable == 5
    assert t.in_flight == 0
    assert t.lowest_unfinished is None


def test_gaps_between_offsets_are_committed_over() -> None:
    t = OffsetTracker()
    for o in (10, 11, 15, 20):
        t.add(o)
    t.done(11)
    t.done(10)
    assert t.committable == 15  # 12..14 were never delivered (compacted away)
    t.done(20)
    t.done(15)
    assert t.committable == 21


def test_offsets_must_increase() -> None:
    t = OffsetTracker()
    t.add(5)
    with pytest.raises(ValueError, match="must increase"):
        t.add(5)
    with pytest.raises(ValueError, match="must increase"):
        t.add(3)


def test_done_of_an_unknown_or_repeated_offset_raises() -> None:
    t = OffsetTracker()
    t.add(1)
    t.add(3)
    with pytest.raises(ValueError, match="not in flight"):
        t.done(2)  # a gap: never dispatched
    t.done(3)
    with pytest.raises(ValueError, match="not in flight"):
        t.done(3)
    t.done(1)
    with pytest.raises(ValueError, match="not in flight"):
        t.done(1)
    assert t.committable == 4


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=60),
)
def test_committable_never_passes_an_unfinished_offset(
    data: st.DataObject, gaps: list[int]
) -> None:
    offsets = []
    o = data.draw(st.integers(min_value=0, max_value=1000))
    for g in gaps:
        offsets.append(o)
        o += g
    order = data.draw(st.permutations(offsets))
    # Interleave: add all offsets in order, finishing a random subset as we go.
    t = OffsetTracker()
    added: list[int] = []
    finished: set[int] = set()
    to_finish = list(order)
    previous = None
    for offset in offsets:
        t.add(offset)
        added.append(offset)
        while len(to_finish) > 0 and data.draw(st.booleans()):
            candidate = to_finish[0]
            if candidate not in added:
                break
            to_finish.pop(0)
            t.done(candidate)
            finished.add(candidate)
            _check(t, added, finished, previous)
            previous = t.committable
    for candidate in to_finish:
        t.done(candidate)
        finished.add(candidate)
        _check(t, added, finished, previous)
        previous = t.committable
    assert t.committable == offsets[-1] + 1
    assert t.in_flight == 0


class _CompactingSoon(OffsetTracker):
    COMPACT_AT = 2


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(min_value=1, max_value=80))
def test_the_commit_point_moves_only_when_read_and_never_past_an_unfinished_offset(
    data: st.DataObject, n: int
) -> None:
    """Finishing is a removal from the unfinished set; reading ``committable``
    moves the commit point (and drops the finished prefix, compacting often
    here): whenever it is read, it is the lowest unfinished offset."""
    t = _CompactingSoon()
    offsets = list(range(100, 100 + 2 * n, 2))  # gaps between them
    added: list[int] = []
    finished: set[int] = set()
    previous = None
    for offset in offsets:
        t.add(offset)
        added.append(offset)
        unfinished = [o for o in added if o not in finished]
        for o in data.draw(st.lists(st.sampled_from(unfinished), unique=True)):
            t.done(o)
            finished.add(o)
        if data.draw(st.booleans()):
            _check(t, added, finished, previous)
            previous = t.committable
    for o in added:
        if o not in finished:
            t.done(o)
            finished.add(o)
    _check(t, added, finished, previous)
    assert t.committable == offsets[-1] + 1
    assert t.lowest_unfinished is None


def _check(t: OffsetTracker, added: list[int], finished: set[int], previous: int | None) -> None:
    unfinished = [o for o in added if o not in finished]
    c = t.committable
    if unfinished:
        lowest = min(unfinished)
        assert t.lowest_unfinished == lowest
        assert c is None or c <= lowest
        # ... and it is the best we can do: everything below ``lowest`` is done.
        if lowest > added[0]:
            assert c == lowest
    else:
        assert c == added[-1] + 1
    if previous is not None:
        assert c is not None
        assert c >= previous
    assert t.in_flight == len(unfinished)


def test_commit_policy_needs_both_dirty_state_and_elapsed_interval() -> None:
    p = CommitPolicy(interval_s=1.0)
    assert not p.should_commit(now=10.5, last_commit_at=10.0, dirty=True)
    assert p.should_commit(now=11.0, last_commit_at=10.0, dirty=True)
    assert not p.should_commit(now=50.0, last_commit_at=10.0, dirty=False)


def test_commit_policy_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        CommitPolicy(interval_s=0)
