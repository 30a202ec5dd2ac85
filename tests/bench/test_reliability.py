"""The reliability campaign's accounting, its runner, and two campaigns run
quickly against the real service (``bench/reliability.py --quick`` does the
same for every campaign)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bench import reliability
from bench.campaigns import poison_storm, poison_storm_actor, switch_storm
from bench.campaigns._harness import Failure, Handled, TopicRecord, account, read_records


def _truth(*events: tuple[int, int, str, str | None]) -> list[TopicRecord]:
    return [TopicRecord(p, o, agg, o, fail) for p, o, agg, fail in events]


def _h(pid: int, p: int, o: int, agg: str, start: int, end: int) -> Handled:
    return Handled(pid, p, o, agg, o, 0, start, end)


TRUTH = _truth((0, 0, "a", None), (0, 1, "a", None), (0, 2, "a", None), (1, 0, "b", None))


def test_accounting_in_order_run_is_clean() -> None:
    acc = account(
        TRUTH,
        [
            _h(1, 0, 0, "a", 0, 1),
            _h(1, 1, 0, "b", 0, 5),
            _h(1, 0, 1, "a", 1, 2),
            _h(1, 0, 2, "a", 2, 3),
        ],
    )
    assert acc.clean
    assert (acc.lost, acc.reordered, acc.overlapped, acc.duplicated) == (0, 0, 0, 0)
    assert acc.expected == acc.handled_distinct == 4


def test_accounting_counts_a_lost_event() -> None:
    acc = account(TRUTH, [_h(1, 0, 0, "a", 0, 1), _h(1, 0, 1, "a", 1, 2), _h(1, 1, 0, "b", 0, 1)])
    assert acc.lost == 1
    assert acc.lost_sample == [(0, 2)]
    assert not acc.clean


def test_accounting_counts_an_event_first_handled_after_a_later_one() -> None:
    acc = account(
        TRUTH,
        [
            _h(1, 0, 0, "a", 0, 1),
            _h(1, 0, 2, "a", 1, 2),
            _h(1, 0, 1, "a", 2, 3),
            _h(1, 1, 0, "b", 0, 1),
        ],
    )
    assert acc.reordered == 1
    assert acc.lost == 0


def test_accounting_counts_two_events_of_one_aggregate_at_once() -> None:
    acc = account(
        TRUTH,
        [
            _h(1, 0, 0, "a", 0, 10),
            _h(1, 0, 1, "a", 5, 12),
            _h(1, 0, 2, "a", 12, 13),
            _h(1, 1, 0, "b", 0, 1),
        ],
    )
    assert acc.overlapped == 1
    assert acc.reordered == 0


def test_accounting_counts_redeliveries_after_a_restart_not_as_reorders() -> None:
    # Process 1 handled offsets 0 and 1 and died before committing 1; process 2
    # starts again from the committed offset 1.
    records = [
        _h(1, 0, 0, "a", 0, 1),
        _h(1, 0, 1, "a", 1, 2),
        _h(2, 0, 1, "a", 10, 11),
        _h(2, 0, 2, "a", 11, 12),
        _h(2, 1, 0, "b", 10, 11),
    ]
    acc = account(TRUTH, records)
    assert acc.clean
    assert acc.duplicated == 1
    assert acc.processes == 2


def test_accounting_flags_a_permanent_failure_that_was_handled() -> None:
    truth = _truth((0, 0, "a", None), (0, 1, "a", "always"))
    acc = account(truth, [_h(1, 0, 0, "a", 0, 1), _h(1, 0, 1, "a", 1, 2)])
    assert acc.expected == 1
    assert acc.unexpected == 1
    assert not acc.clean


def test_record_file_skips_a_line_torn_by_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "records"
    path.write_text("H,1,0,0,a,0,5,6,7\nF,1,0,1,a,1,1,transient\nH,1,0,1,a,1,5,8,")
    assert read_records(path) == [Handled(1, 0, 0, "a", 0, 5, 6, 7)]


def _result(name: str, lost: int) -> dict[str, object]:
    return {
        "campaign": name,
        "tried": f"tried {name}",
        "amount": "1 event",
        "lost": lost,
        "reordered": 0,
        "duplicated_or_redelivered": 0,
        "passed": lost == 0,
        "seconds": 1.0,
        "details": {"x": 1, "sub": {"y": 2.5}},
    }


def test_runner_merges_results_by_campaign_name(tmp_path: Path) -> None:
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    reliability.write(js, md, [_result("one", 0), _result("two", 0)], ["one", "two"])
    reliability.write(js, md, [_result("two", 3)], ["one", "two"])
    doc = json.loads(js.read_text())
    assert [(c["campaign"], c["lost"]) for c in doc["campaigns"]] == [("one", 0), ("two", 3)]
    text = md.read_text()
    assert "| `one` | tried one | 1 event | 0 | 0 | 0 | pass |" in text
    assert "| `two` | tried two | 1 event | 3 | 0 | 0 | **FAIL** |" in text
    assert "| sub.y | 2.5 |" in text


def test_runner_discovers_the_campaigns_in_report_order() -> None:
    names = [c.name for c in reliability.discover()]
    assert names[:4] == ["switch_storm", "crash_loop", "broker_stall", "poison_storm"]


async def test_switch_storm_quick_loses_reorders_and_duplicates_nothing() -> None:
    async with asyncio.timeout(60):
        res = await switch_storm.run(quick=True)
    assert res["passed"], res.get("failures")
    assert (res["lost"], res["reordered"], res["duplicated_or_redelivered"]) == (0, 0, 0)
    assert res["details"]["accounting"]["handled_distinct"] > 1000
    switches = res["details"]["switches"]
    assert switches["mode"] + switches["rollout"] == 20


async def test_poison_storm_quick_transients_succeed_and_permanents_are_dead_letters() -> None:
    async with asyncio.timeout(90):
        res = await poison_storm.run(quick=True)
    d = res["details"]
    assert res["campaign"] == "poison_storm"
    assert (res["lost"], res["reordered"], res["duplicated_or_redelivered"]) == (0, 0, 0), res
    assert d["permanent_events"] > 100
    assert d["transient_events"] > 100
    assert d["transient_handled"] == d["transient_seen_failing"] == d["transient_events"]
    assert d["dead_letters_on_topic"] == d["permanent_events"]
    assert d["dead_letter_reasons"] == {"retries-exhausted": d["permanent_events"]}
    assert d["exit_code"] == 0


def _f(o: int, agg: str, attempt: int, at_s: float) -> Failure:
    return Failure(1, 0, o, agg, o, attempt, "always", int(at_s * 1e9))


def test_the_restart_budget_model_escalates_crash_streaks_only() -> None:
    timeline: list[Handled | Failure] = [
        # Three events in a row crash the actor (their retries are not charged) ...
        _f(0, "a", 1, 0.0),
        _f(0, "a", 2, 0.1),
        _f(1, "b", 1, 0.2),
        _f(2, "c", 1, 0.3),
        _f(2, "c", 3, 0.4),
        # ... so the fourth escalates, and the fifth.
        _f(3, "d", 1, 0.5),
        _f(4, "a", 1, 0.6),
        # A handled event clears the charges: the next three are charged again.
        _h(1, 0, 5, "b", 0, 1),
        _f(6, "a", 1, 1.0),
        _f(7, "b", 1, 1.1),
        _f(8, "c", 1, 1.2),
        _f(9, "d", 1, 1.3),
        # The window slides: charges older than 10 s stop counting.
        _f(10, "a", 1, 11.15),
        _f(11, "a", 1, 11.16),
    ]
    got = poison_storm.expected_escalations(timeline, actors=1, max_restarts=3, window_s=10.0)
    assert got == {(0, 3), (0, 4), (0, 9)}
    # Without the window sliding, the last two would escalate as well.
    longer = poison_storm.expected_escalations(timeline, actors=1, max_restarts=3, window_s=60.0)
    assert longer == got | {(0, 10), (0, 11)}


async def test_poison_storm_actor_quick_escalates_exactly_what_the_budget_model_predicts() -> None:
    async with asyncio.timeout(90):
        res = await poison_storm_actor.run(quick=True)
    d = res["details"]
    assert (res["lost"], res["reordered"], res["duplicated_or_redelivered"]) == (0, 0, 0), res
    assert d["mode"] == "actor"
    assert d["permanent_events"] > 100
    assert d["transient_events"] > 100
    # Whatever the budget escalated is exactly what the model says it must.
    assert not [f for f in res.get("failures", []) if "escalation" in f], res["failures"]
    escalated = d["dead_letter_reasons"].get("restart-budget-exhausted", 0)
    assert escalated == d["escalations_predicted_by_model"]
    assert d["transient_handled"] + d["transient_escalated"] == d["transient_events"]
    assert d["dead_letters_on_topic"] == d["permanent_events"] + d["transient_escalated"]
    assert d["exit_code"] == 0
