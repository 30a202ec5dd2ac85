"""The pause book: holds by reason, backlogs, the pause/resume calls. Pure, no broker."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server._consumer_metrics import PAUSE_REASONS
from server._pauses import BACKPRESSURE, DRAIN, OPERATOR, REASONS, PauseBook

Book = PauseBook[str, int]


def book(*partitions: str) -> Book:
    b: Book = PauseBook()
    for p in partitions:
        b.assign(p)
    assert b.take_changes() == []  # a new assignment is not paused
    return b


def test_the_reasons_are_the_metric_labels_in_the_same_order() -> None:
    assert REASONS == PAUSE_REASONS


def test_an_operator_pause_holds_only_its_partitions_until_resumed() -> None:
    b = book("a", "b")
    assert b.hold(OPERATOR, ["a"]) == ["a"]
    assert b.take_changes() == [("a", True)]
    assert (b.reasons("a"), b.reasons("b")) == ((OPERATOR,), ())
    assert b.held("a")
    assert not b.held("b")
    assert b.paused_at_consumer() == ["a"]
    assert b.hold(OPERATOR, ["a"]) == ["a"]
    assert b.take_changes() == []  # already paused: no second call
    assert b.release([OPERATOR], ["b"]) == []
    assert b.release([OPERATOR], ["a"]) == ["a"]
    assert b.take_changes() == [("a", False)]
    assert b.paused_at_consumer() == []


def test_reasons_never_lift_each_other() -> None:
    b = book("a")
    b.hold(DRAIN, ["a"])
    b.hold(OPERATOR, None)
    b.defer("a", 1)
    assert b.reasons("a") == (OPERATOR, DRAIN, BACKPRESSURE)
    assert b.take_changes() == [("a", True)]
    assert b.release([OPERATOR], None) == ["a"]
    assert b.dispatched("a") == 1  # the backlog is empty: backpressure lifts
    assert b.reasons("a") == (DRAIN,)
    assert b.take_changes() == []  # still held for the drain
    assert b.release([DRAIN], ["a"]) == ["a"]
    assert b.take_changes() == [("a", False)]


def test_a_hold_on_every_partition_also_holds_those_assigned_later() -> None:
    b = book("a")
    assert b.hold(DRAIN, None) == ["a"]
    b.assign("b")
    assert b.reasons("b") == (DRAIN,)
    assert b.take_changes() == [("a", True), ("b", True)]
    # Lifted from one of them, it stays on the others kept now, not on later ones.
    assert b.release([DRAIN], ["a"]) == ["a"]
    b.assign("c")
    assert (b.reasons("a"), b.reasons("b"), b.reasons("c")) == ((), (DRAIN,), ())
    assert b.take_changes() == [("a", False)]
    assert b.release([DRAIN], None) == ["b"]
    assert b.take_changes() == [("b", False)]


def test_a_hold_on_a_partition_survives_its_reassignment() -> None:
    b = book("a")
    b.hold(OPERATOR, ["a", "later"])
    b.revoke("a")
    b.forget("a")
    assert "a" not in b
    b.assign("a")
    b.assign("later")
    assert b.reasons("a") == b.reasons("later") == (OPERATOR,)
    assert b.take_changes() == [("a", True), ("later", True)]


def test_backpressure_holds_until_the_backlog_is_dispatched_in_order() -> None:
    b = book("a", "b")
    backlog = b.backlog("a")
    assert not backlog
    for event in (1, 2, 3):
        b.defer("a", event)
    assert list(backlog) == [1, 2, 3]  # the live view
    assert b.reasons("a") == (BACKPRESSURE,)
    assert b.take_changes() == [("a", True)]
    assert [b.dispatched("a"), b.dispatched("a")] == [1, 2]
    assert b.held("a")
    assert b.take_changes() == []
    assert b.dispatched("a") == 3
    assert not backlog
    assert not b.held("a")
    assert b.take_changes() == [("a", False)]
    with pytest.raises(IndexError):
        b.dispatched("a")


def test_a_dropped_backlog_keeps_the_partition_held() -> None:
    b = book("a")
    b.defer("a", 1)
    b.defer("a", 2)
    b.take_changes()
    assert b.drop_backlog("a") == [1, 2]
    assert not b.backlog("a")
    assert b.reasons("a") == (BACKPRESSURE,)
    assert b.take_changes() == []
    assert b.paused_at_consumer() == ["a"]


def test_held_by_control_counts_operator_and_drain_not_backpressure() -> None:
    b = book("a", "b")
    b.defer("a", 1)
    assert b.held("a")
    assert not b.held_by_control("a")
    b.hold(DRAIN, None)
    assert b.held_by_control("a")
    assert b.held_by_control("b")
    b.release([DRAIN], ["a"])
    assert (b.held_by_control("a"), b.held_by_control("b")) == (False, True)
    b.hold(OPERATOR, ["a"])
    assert b.held_by_control("a")


def test_stopping_pauses_every_partition_whatever_its_holds() -> None:
    b = book("a", "b")
    b.hold(OPERATOR, ["a"])
    assert b.take_changes() == [("a", True)]
    b.stop()
    assert b.stopped
    assert b.take_changes() == [("b", True)]
    b.assign("c")
    assert b.take_changes() == [("c", True)]
    assert b.release([OPERATOR], None) == ["a"]
    assert b.take_changes() == []  # released, but fetching stopped
    assert (b.held("a"), b.held("b")) == (False, False)  # the holds are what is reported


def test_a_revoked_partition_gets_no_calls_but_keeps_reporting_its_holds() -> None:
    b = book("a", "b")
    b.defer("a", 1)
    b.hold(OPERATOR, None)
    b.revoke("a")
    assert b.take_changes() == [("b", True)]
    assert b.reasons("a") == (OPERATOR, BACKPRESSURE)
    assert b.paused_at_consumer() == ["b"]
    assert b.release([OPERATOR], None) == ["a", "b"]
    assert b.take_changes() == [("b", False)]
    b.forget("a")
    with pytest.raises(KeyError):
        b.reasons("a")
    b.clear()
    assert "b" not in b


def test_set_holds_replaces_what_a_reason_held_and_leaves_the_others() -> None:
    b = book("a", "b", "c")
    b.hold(OPERATOR, ["a", "b"])
    b.hold(DRAIN, ["b"])
    assert b.take_changes() == [("a", True), ("b", True)]
    # The fleet's paused set is now {c, later}: a resumes, b stays (drained), c pauses.
    assert b.set_holds(OPERATOR, ["c", "later"]) == ["c"]
    assert b.holds_of(OPERATOR) == (False, frozenset({"c", "later"}))
    assert (b.reasons("a"), b.reasons("b"), b.reasons("c")) == ((), (DRAIN,), (OPERATOR,))
    assert sorted(b.take_changes()) == [("a", False), ("c", True)]
    b.assign("later")  # held from its assignment on, before any fetch
    assert b.reasons("later") == (OPERATOR,)
    assert b.take_changes() == [("later", True)]
    # Every partition, now and later; then none.
    assert b.set_holds(OPERATOR, None) == ["a", "b", "c", "later"]
    assert b.holds_of(OPERATOR) == (True, frozenset())
    b.assign("d")
    assert b.reasons("d") == (OPERATOR,)
    assert sorted(b.take_changes()) == [("a", True), ("d", True)]
    assert b.set_holds(OPERATOR, []) == []
    assert b.holds_of(OPERATOR) == (False, frozenset())
    assert sorted(b.take_changes()) == [("a", False), ("c", False), ("d", False), ("later", False)]
    assert b.reasons("b") == (DRAIN,)  # the drain's hold was never touched


def test_set_holds_leaves_the_backlog_and_its_hold_alone() -> None:
    b = book("a")
    b.defer("a", 1)
    assert b.take_changes() == [("a", True)]
    b.set_holds(OPERATOR, None)
    b.set_holds(OPERATOR, [])
    assert b.reasons("a") == (BACKPRESSURE,)
    assert list(b.backlog("a")) == [1]
    assert b.take_changes() == []  # still held for backpressure throughout


@pytest.mark.parametrize("reason", [BACKPRESSURE, "other"])
def test_only_operator_and_drain_are_held_and_released_by_name(reason: str) -> None:
    b = book("a")
    with pytest.raises(ValueError, match="hold reason"):
        b.hold(reason, None)
    with pytest.raises(ValueError, match="hold reason"):
        b.release([OPERATOR, reason], None)
    with pytest.raises(ValueError, match="hold reason"):
        b.set_holds(reason, None)
    with pytest.raises(ValueError, match="hold reason"):
        b.holds_of(reason)
    assert b.reasons("a") == ()


PARTITIONS = ("p0", "p1", "p2", "p3")
partitions = st.sampled_from(PARTITIONS)
subsets = st.none() | st.lists(partitions, max_size=3)
control = st.sampled_from((OPERATOR, DRAIN))


class PauseBookMachine(RuleBasedStateMachine):
    """Random operations (fleet control's ``set_holds`` among them); after each,
    the consumer's state (built only from the calls the book returned) matches
    what the holds want, every call changes something, backlogs keep their
    order, and no reason moves another."""

    @initialize()
    def setup(self) -> None:
        self.book: Book = PauseBook()
        self.kept: dict[str, bool] = {}  # partition -> revoked
        self.at_consumer: set[str] = set()  # paused there, by the calls made
        self.backlogs: dict[str, list[int]] = {}
        self.backpressured: set[str] = set()
        self.stopped = False
        self.next_event = 0
        #: Reasons placed on every partition and not lifted since (later ones get them too).
        self.on_all: set[str] = set()

    def _snapshot(self) -> dict[str, tuple[str, ...]]:
        return {p: self.book.reasons(p) for p in self.kept}

    def _apply(self) -> None:
        seen = set()
        for p, pause in self.book.take_changes():
            assert p not in seen, "one call per partition"
            seen.add(p)
            assert not self.kept[p], "no call for a revoked partition"
            assert (p in self.at_consumer) != pause, "a call that changes nothing"
            (self.at_consumer.add if pause else self.at_consumer.discard)(p)

    @rule(p=partitions)
    def assign(self, p: str) -> None:
        if p in self.kept:
            return
        self.book.assign(p)
        self.kept[p] = False
        self.backlogs[p] = []
        self.backpressured.discard(p)
        self.at_consumer.discard(p)  # a new assignment is not paused at the consumer
        self._apply()
        for reason in self.on_all:
            assert reason in self.book.reasons(p)

    @precondition(lambda self: any(not r for r in self.kept.values()))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(p for p, r in self.kept.items() if not r)))
        self.book.revoke(p)
        self.kept[p] = True
        self._apply()

    @precondition(lambda self: any(self.kept.values()))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(p for p, r in self.kept.items() if r)))
        self.book.forget(p)
        del self.kept[p]
        self.at_consumer.discard(p)
        self._apply()

    @rule()
    def stop(self) -> None:
        self.book.stop()
        self.stopped = True
        self._apply()

    @rule(reason=control, which=subsets)
    def hold(self, reason: str, which: list[str] | None) -> None:
        before = self._snapshot()
        held = self.book.hold(reason, which)
        self._apply()
        after = self._snapshot()
        if which is None:
            self.on_all.add(reason)
        for p in self.kept:
            if which is None or p in which:
                assert reason in after[p]
            else:
                assert (reason in after[p]) == (reason in before[p])
            assert _without(after[p], reason) == _without(before[p], reason)
        assert held == [p for p in self.kept if reason in after[p]]

    @rule(reasons=st.lists(control, min_size=1, max_size=2), which=subsets)
    def release(self, reasons: list[str], which: list[str] | None) -> None:
        before = self._snapshot()
        released = self.book.release(reasons, which)
        self._apply()
        after = self._snapshot()
        self.on_all.difference_update(reasons)
        for p in self.kept:
            lifted = which is None or p in which
            for reason in REASONS:
                if reason in reasons and lifted:
                    assert reason not in after[p]
                else:
                    assert (reason in after[p]) == (reason in before[p]), (p, reason)
        assert released == [p for p in self.kept if set(before[p]) - set(after[p])]

    @rule(reason=control, which=subsets)
    def set_holds(self, reason: str, which: list[str] | None) -> None:
        before = self._snapshot()
        held = self.book.set_holds(reason, which)
        self._apply()
        after = self._snapshot()
        if which is None:
            self.on_all.add(reason)
        else:
            self.on_all.discard(reason)
        for p in self.kept:
            assert (reason in after[p]) == (which is None or p in which), (p, reason)
            assert _without(after[p], reason) == _without(before[p], reason)
        assert held == [p for p in self.kept if reason in after[p]]
        assert self.book.holds_of(reason) == (
            which is None,
            frozenset(which or ()),
        )

    @precondition(lambda self: any(not r for r in self.kept.values()))
    @rule(data=st.data())
    def defer(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(p for p, r in self.kept.items() if not r)))
        self.book.defer(p, self.next_event)
        self.backlogs[p].append(self.next_event)
        self.backpressured.add(p)
        self.next_event += 1
        self._apply()

    @precondition(lambda self: any(self.backlogs.get(p) for p in self.kept))
    @rule(data=st.data())
    def dispatched(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(p for p in self.kept if self.backlogs[p])))
        assert self.book.dispatched(p) == self.backlogs[p].pop(0)
        if not self.backlogs[p]:
            self.backpressured.discard(p)
        self._apply()

    @precondition(lambda self: bool(self.kept))
    @rule(data=st.data())
    def drop_backlog(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(self.kept)))
        assert self.book.drop_backlog(p) == self.backlogs[p]
        self.backlogs[p] = []  # the backpressure hold stays
        self._apply()

    @invariant()
    def consumer_matches_the_holds(self) -> None:
        if not hasattr(self, "book"):
            return
        for p, revoked in self.kept.items():
            reasons = self.book.reasons(p)
            assert (BACKPRESSURE in reasons) == (p in self.backpressured)
            assert list(self.book.backlog(p)) == self.backlogs[p]
            assert self.book.held(p) == bool(reasons)
            if not revoked:
                assert (p in self.at_consumer) == (self.stopped or bool(reasons)), p
        assert sorted(self.book.paused_at_consumer()) == sorted(
            p for p in self.at_consumer if not self.kept.get(p, True)
        )


def _without(reasons: tuple[str, ...], reason: str) -> tuple[str, ...]:
    return tuple(r for r in reasons if r != reason)


TestPauseBookMachine = PauseBookMachine.TestCase
TestPauseBookMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
