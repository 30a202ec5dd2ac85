"""The pure fleet state: compare-and-set by topic order, dedup, compaction, staleness."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import PoolMode
from server._fleet_state import (
    CHANGE_RESTATE,
    RECENT_REQUESTS,
    ApplyWatch,
    Change,
    DesiredState,
    FleetLog,
    Mismatch,
    Outcome,
    Paused,
    Proposal,
    Replay,
    Report,
    Verdict,
    Write,
    differences,
    is_stale,
    plan,
    restatement,
)

DEFAULTS = DesiredState(generation=0, mode=PoolMode.KEYED, rollout=100.0)
_ids = itertools.count()


def write(current: DesiredState, change: Change, **kw: object) -> Proposal:
    p = plan(current, change, write_id=f"w{next(_ids)}", **kw)  # type: ignore[arg-type]
    assert isinstance(p, Write), p
    return p.proposal


def test_first_write_goes_from_the_defaults_to_generation_1() -> None:
    log = FleetLog(DEFAULTS)
    assert log.generation == 0
    prop = write(log.effective(), Change("mode", mode=PoolMode.ACTOR), request_id="r1")
    assert (prop.base_generation, prop.state.generation) == (0, 1)
    assert log.apply(prop) is Verdict.ACCEPTED
    assert log.effective().mode is PoolMode.ACTOR
    assert log.effective().recent == (("r1", 1),)
    assert log.verdict(prop.write_id) is Verdict.ACCEPTED


def test_two_writers_from_the_same_base_the_first_record_wins() -> None:
    log = FleetLog(DEFAULTS)
    base = log.effective()
    a = write(base, Change("mode", mode=PoolMode.ACTOR), expected_generation=0)
    b = write(base, Change("rollout", rollout=10.0), expected_generation=0)
    assert log.apply(a) is Verdict.ACCEPTED
    assert log.apply(b) is Verdict.VOID
    assert log.tail_void
    assert log.effective() == a.state
    # The loser repairs the tail: the latest record is the accepted state again.
    fix = restatement(log.effective(), write_id="fix", writer="b", now=1.0)
    assert log.apply(fix) is Verdict.RESTATED
    assert not log.tail_void
    assert log.effective().generation == 1
    assert log.effective().change == CHANGE_RESTATE


def test_expected_generation_mismatch_is_known_before_writing() -> None:
    log = FleetLog(DEFAULTS)
    log.apply(write(log.effective(), Change("mode", mode=PoolMode.ACTOR)))
    p = plan(log.effective(), Change("rollout", rollout=5.0), write_id="x", expected_generation=0)
    assert p == Mismatch(current=1, expected=0)


def test_a_retried_request_id_is_replayed_and_never_bumps_twice() -> None:
    log = FleetLog(DEFAULTS)
    first = write(log.effective(), Change("mode", mode=PoolMode.ACTOR), request_id="same")
    log.apply(first)
    assert plan(
        log.effective(), Change("mode", mode=PoolMode.ACTOR), write_id="y", request_id="same"
    ) == Replay(1)
    # A retry written concurrently from a stale view (same base) is void.
    stale_retry = write(DEFAULTS, Change("mode", mode=PoolMode.ACTOR), request_id="same")
    assert log.apply(stale_retry) is Verdict.VOID
    assert log.generation == 1


def test_recent_request_ids_are_bounded() -> None:
    log = FleetLog(DEFAULTS)
    for i in range(RECENT_REQUESTS + 5):
        log.apply(
            write(log.effective(), Change("rollout", rollout=float(i % 100)), request_id=f"r{i}")
        )
    recent = log.effective().recent
    assert len(recent) == RECENT_REQUESTS
    assert recent[-1] == (f"r{RECENT_REQUESTS + 4}", RECENT_REQUESTS + 5)


def test_pause_and_resume_of_partitions_and_of_all() -> None:
    every = [("t", 0), ("t", 1), ("t", 2)]
    s = Change("pause", partitions=(("t", 1),)).apply(DEFAULTS)
    assert s.paused == Paused(partitions=frozenset({("t", 1)}))
    s = Change("pause", partitions=None).apply(s)
    assert s.paused.all
    s = Change("resume", partitions=(("t", 0),)).apply(s, every)
    assert s.paused == Paused(partitions=frozenset({("t", 1), ("t", 2)}))
    assert s.resumed == Paused(partitions=frozenset({("t", 0)}))
    s = Change("resume", partitions=None).apply(s, every)
    assert s.paused.empty
    assert s.resumed.all
    # The next non-resume change clears "resumed" (drain pauses are lifted once).
    assert Change("mode", mode=PoolMode.ACTOR).apply(s).resumed.empty


def test_bad_rollout_is_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        Change("rollout", rollout=101.0)
    with pytest.raises(ValueError, match="unknown change"):
        Change("turbo")


def test_a_reader_starting_on_a_compacted_log_takes_the_first_record() -> None:
    log = FleetLog(DEFAULTS)
    state = DesiredState(generation=7, mode=PoolMode.ACTOR, rollout=30.0)
    assert log.apply(Proposal(state, base_generation=7, write_id="r")) is Verdict.RESTATED
    assert log.effective() == state
    nxt = write(log.effective(), Change("rollout", rollout=40.0))
    assert log.apply(nxt) is Verdict.ACCEPTED
    assert log.generation == 8


def test_a_stale_restatement_is_void() -> None:
    log = FleetLog(DEFAULTS)
    log.apply(write(log.effective(), Change("mode", mode=PoolMode.ACTOR)))
    old = restatement(DEFAULTS, write_id="old", writer="x", now=0)
    assert log.apply(old) is Verdict.VOID
    assert log.generation == 1
    assert log.tail_void


def test_staleness_is_three_heartbeats() -> None:
    r = Report("a", 1, PoolMode.KEYED, 100.0, Paused(), time=100.0, heartbeat_s=5.0)
    assert not is_stale(r, 115.0)
    assert is_stale(r, 115.1)


def test_differences_name_what_diverges() -> None:
    desired = DesiredState(generation=3, mode=PoolMode.ACTOR, rollout=50.0)
    assert (
        differences(
            desired, applied_generation=3, mode=PoolMode.ACTOR, rollout=50.0, paused=Paused()
        )
        == []
    )
    diff = differences(
        desired,
        applied_generation=2,
        mode=PoolMode.KEYED,
        rollout=50.0,
        paused=Paused(partitions=frozenset({("t", 1)})),
    )
    assert diff == ["generation 2, fleet 3", "mode keyed, fleet actor", "paused t:1, fleet none"]
    # No desired state yet: nothing to diverge from.
    assert (
        differences(
            DEFAULTS, applied_generation=0, mode=PoolMode.ACTOR, rollout=1.0, paused=Paused()
        )
        == []
    )


def test_apply_watch_reports_applied_pending_failed_and_skips_stale() -> None:
    def rep(name: str, gen: int, t: float, failed: int = 0) -> Report:
        return Report(
            name, gen, PoolMode.ACTOR, 100.0, Paused(), time=t, heartbeat_s=1.0,
            failed_generation=failed, last_error="boom" if failed else "",
        )  # fmt: skip

    watch = ApplyWatch(generation=5, started=10.0)
    reports = {"a": rep("a", 4, 10.0), "b": rep("b", 4, 10.0), "dead": rep("dead", 4, 1.0)}
    assert not watch.done(reports, 10.0)
    reports["a"] = rep("a", 5, 10.05)
    watch.observe(reports["a"], 10.05)
    reports["b"] = rep("b", 4, 10.06, failed=5)
    watch.observe(reports["b"], 10.06)
    assert watch.done(reports, 10.1)
    got = {o.instance: o for o in watch.outcomes(reports, 10.1)}
    assert set(got) == {"a", "b"}  # "dead" is stale
    assert got["a"].outcome is Outcome.APPLIED
    assert got["a"].took_s == pytest.approx(0.05)
    assert got["b"].outcome is Outcome.FAILED
    assert got["b"].error == "boom"


def test_apply_watch_answers_a_gone_replica_down_and_stops_waiting_for_it() -> None:
    def rep(name: str, gen: int, t: float) -> Report:
        return Report(name, gen, PoolMode.ACTOR, 100.0, Paused(), time=t, heartbeat_s=5.0)

    watch = ApplyWatch(generation=3, started=10.0)
    reports = {
        "a": rep("a", 3, 10.02),
        "killed": rep("killed", 2, 9.0),
        "slow": rep("slow", 2, 9.5),
    }
    watch.observe(reports["a"], 10.02)
    down = {"killed": "nothing listens at 127.0.0.1:1 (connection refused)"}
    # "slow" is not known to be gone: still waited for.
    assert not watch.done(reports, 10.2, down)
    got = {o.instance: o for o in watch.outcomes(reports, 10.2, down)}
    assert got["killed"].outcome is Outcome.DOWN
    assert got["killed"].error == down["killed"]
    assert got["killed"].took_s is None
    assert got["slow"].outcome is Outcome.PENDING
    reports["slow"] = rep("slow", 3, 10.3)
    watch.observe(reports["slow"], 10.3)
    assert watch.done(reports, 10.3, down)
    # A replica that applied is answered applied, whatever a probe said.
    assert watch.outcomes(reports, 10.3, {"a": "gone"})[0].outcome is Outcome.APPLIED


# ------------------------------------------------------------- properties

_parts = st.one_of(
    st.none(),
    st.lists(st.tuples(st.just("t"), st.integers(0, 3)), max_size=3).map(tuple),
)
changes = st.one_of(
    st.builds(Change, st.just("mode"), mode=st.sampled_from(list(PoolMode))),
    st.builds(Change, st.just("rollout"), rollout=st.integers(0, 100).map(float)),
    st.builds(Change, st.just("pause"), partitions=_parts),
    st.builds(Change, st.just("resume"), partitions=_parts),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # writer
            changes,
            st.booleans(),  # compare-and-set
            st.integers(0, 5),  # request id (0 = none)
            st.integers(0, 3),  # how many records behind the writer's view is
        ),
        min_size=1,
        max_size=25,
    )
)
def test_racing_writers_never_both_win_and_compaction_keeps_the_state(
    steps: list[tuple[int, Change, bool, int, int]],
) -> None:
    """Writers plan on views lagging the topic by a few records; the topic
    appends their proposals in some order; losers restate. Every reader agrees,
    one winner per generation, a request ID is accepted at most once, and
    reading only the latest record (what compaction keeps) gives the same state."""
    log = FleetLog(DEFAULTS)
    topic: list[Proposal] = []
    views: list[DesiredState] = [DEFAULTS]  # the state after each record
    accepted: dict[int, str] = {}
    for n, (writer, change, cas, rid, lag) in enumerate(steps):
        view = views[max(0, len(views) - 1 - lag)]
        expected = view.generation if cas else None
        request_id = f"r{rid}" if rid else ""
        p = plan(
            view, change, write_id=f"{writer}-{n}", request_id=request_id,
            expected_generation=expected, writer=str(writer), every=[("t", i) for i in range(4)],
        )  # fmt: skip
        if not isinstance(p, Write):
            continue
        topic.append(p.proposal)
        verdict = log.apply(p.proposal)
        views.append(log.effective())
        if verdict is Verdict.ACCEPTED:
            gen = p.proposal.state.generation
            assert gen not in accepted, "two winners for one generation"
            accepted[gen] = p.proposal.write_id
        else:
            # The loser (who reads its own record back) restates the current state.
            fix = restatement(log.effective(), write_id=f"fix-{n}", writer=str(writer), now=0)
            topic.append(fix)
            assert log.apply(fix) is Verdict.RESTATED
            views.append(log.effective())
    # Generations are 1..N without a gap.
    assert sorted(accepted) == list(range(1, len(accepted) + 1))
    assert log.generation == len(accepted)
    # A second reader of the whole topic agrees.
    other = FleetLog(DEFAULTS)
    for rec in topic:
        other.apply(rec)
    assert other.effective() == log.effective()
    # A reader of the compacted topic (the latest record only) agrees too.
    if topic:
        compacted = FleetLog(DEFAULTS)
        compacted.apply(topic[-1])
        assert compacted.effective().generation == log.effective().generation
        assert compacted.effective().mode is log.effective().mode
        assert compacted.effective().paused == log.effective().paused
    # No request ID was accepted twice.
    rids = [rid for rid, _ in log.effective().recent]
    assert len(rids) == len(set(rids))
