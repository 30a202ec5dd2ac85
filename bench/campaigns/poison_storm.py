"""Campaign 4: a storm of failing events; healthy aggregates keep flowing."""

from __future__ import annotations

import functools
import statistics
import time
import zlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from bench.campaigns._harness import (
    Failure,
    Handled,
    SteadyProducer,
    TopicRecord,
    account,
    campaign_env,
    committed_offsets,
    count_handled,
    ends_of,
    num,
    percentile,
    read_failures,
    read_records,
    read_timeline,
    read_topic,
    result,
    wait_for,
)
from pool import executor_index
from server._config import Settings

NAME = "poison_storm"
DESCRIPTION = (
    "5 % of events always fail, 5 % fail once or twice then succeed (all on a "
    "fifth of the aggregates, the 'sick' ones); every transient one is handled, "
    "every permanent one is a dead letter with its reason on the DLQ topic, and "
    "the healthy aggregates' throughput is compared with a no-failure phase of "
    "the same run."
)
ORDER = 4
TIMEOUT_S = 600

NOTES = [
    (
        "Healthy throughput is measured two ways, each against a no-failure phase of the "
        "same run: *steady* - healthy events handled per second while the stream flows at "
        "the steady rate (from 1 s into the phase to its end); *backlog* - a backlog "
        "produced while intake is paused (gRPC Pause), then drained at full speed (gRPC "
        "Resume): healthy events over the time from Resume to the last one handled. A "
        "drain lasts about a second, so it runs in rounds (no-failure, then storm) and "
        "the median of the rounds' ratios is the figure. Both must reach 80 %."
    ),
    (
        "A failing event waits out its retry backoff (100 ms, then 200 ms) parked: its "
        "executor serves the other aggregates meanwhile, and only the failing "
        "aggregate's later events wait behind it. Before that fix the event was retried "
        "in place and the healthy aggregates of its executor kept 6 % of their backlog "
        "throughput, with a p99 of 9.5 s."
    ),
]
ACTOR_NOTES = [
    (
        "ACTOR mode, default supervision: the restart budget (3 per 60 s) detects a crash "
        "loop. Each event's first crash is charged (its retries belong to the retry "
        "policy) and a handled event makes the budget whole, so only an actor on which "
        "four events in a row crash, with none handled between, escalates: those events "
        "are dead-lettered restart-budget-exhausted at once. Here that happens on actors "
        "that serve only sick aggregates (half their events fail). An independent model "
        "of the budget, run over the handler's record of every attempt in order, must "
        "predict exactly the escalated events; every other transient event must be "
        "handled. Before the budget was made a crash-loop detector it counted every "
        "failure, and 5 164 of 5 248 transient events were dead-lettered."
    ),
]
#: Backlog drains (no-failure then storm) per full run; the median ratio counts.
BACKLOG_ROUNDS = 3

#: One aggregate in SICK_EVERY is sick; a quarter of its events fail for good,
#: a quarter fail 1 or 2 times then succeed: 5 % + 5 % of all events.
SICK_EVERY = 5


def _marker(agg: str, seq: int) -> dict[str, Any] | None:
    h = zlib.crc32(f"{agg}:{seq}".encode())
    if h % 4 == 1:
        return {"fail": "always"}
    if h % 4 == 3:
        return {"fail_times": 1 + (h // 4) % 2}
    return None


class _Phases:
    """Failure markers on the sick aggregates only while ``storm`` is set."""

    def __init__(self, sick: set[str]) -> None:
        self.sick = sick
        self.storm = False

    def __call__(self, agg: str, seq: int) -> dict[str, Any] | None:
        if self.storm and agg in self.sick:
            return _marker(agg, seq)
        return None


def _healthy_figures(
    records: Sequence[Handled], sick: set[str], start_ns: int, end_ns: int, from_ns: int
) -> dict[str, float]:
    """The healthy aggregates' events sent within [start, end): how many, their
    throughput (count over ``from_ns`` to the last one handled) and latency."""
    mine = [
        r
        for r in records
        if r.aggregate_id not in sick and start_ns <= r.sent_ns < end_ns and r.sent_ns
    ]
    if not mine:
        return {"events": 0, "throughput_per_s": 0.0, "latency_ms_p50": 0.0, "latency_ms_p99": 0.0}
    last = max(r.end_ns for r in mine)
    latencies = [(r.end_ns - r.sent_ns) / 1e6 for r in mine]
    return {
        "events": len(mine),
        "throughput_per_s": round(len(mine) / ((last - from_ns) / 1e9), 1),
        "latency_ms_p50": round(percentile(latencies, 0.5), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
        "latency_ms_max": round(max(latencies), 1),
    }


def _windowed(records: Sequence[Handled], sick: set[str], start_ns: int, end_ns: int) -> float:
    """Healthy events handled per second within [start, end) (steady throughput)."""
    n = sum(1 for r in records if r.aggregate_id not in sick and start_ns <= r.end_ns < end_ns)
    return round(n / ((end_ns - start_ns) / 1e9), 1)


def _dead_letters(dlq: Sequence[TopicRecord]) -> dict[tuple[int, int], dict[str, str]]:
    out = {}
    for r in dlq:
        h = {k: v.decode(errors="replace") for k, v in r.headers}
        key = (int(h.get("dlq-original-partition", -1)), int(h.get("dlq-original-offset", -1)))
        out[key] = h
    return out


def expected_escalations(
    timeline: Sequence[Handled | Failure], actors: int, max_restarts: int, window_s: float
) -> set[tuple[int, int]]:
    """An independent model of the actor pool's restart budget: the events
    (partition, offset) it must dead-letter ``restart-budget-exhausted``.

    Per actor (FNV-1a routing), each event's first crash is charged at its
    time; a handled event clears the charges; charges older than the window
    stop counting; a first crash with ``max_restarts`` charges counting
    escalates (and is not charged).
    """
    charges: dict[int, deque[int]] = {}
    window_ns = int(window_s * 1e9)
    out: set[tuple[int, int]] = set()
    for item in timeline:
        actor = executor_index(item.aggregate_id, actors)
        times = charges.setdefault(actor, deque())
        if isinstance(item, Handled):
            times.clear()
            continue
        if item.attempt != 1:
            continue
        while times and times[0] <= item.at_ns - window_ns:
            times.popleft()
        if len(times) >= max_restarts:
            out.add((item.partition, item.offset))
        else:
            times.append(item.at_ns)
    return out


async def _status_dead_letters(svc: Any) -> int:
    try:
        async with svc.client(timeout=3.0) as client:
            return int((await client.status()).dead_letters)
    except Exception:
        return -1


async def _settled(svc: Any, total: int) -> bool:
    """Every one of the ``total`` events produced so far is handled or dead-lettered
    (no event is handled twice in this campaign, so counting lines is exact)."""
    dead = await _status_dead_letters(svc)
    return dead >= 0 and count_handled(svc.record) + dead >= total


async def run(quick: bool) -> dict[str, Any]:
    return await run_mode(quick, "keyed", NAME)


async def run_mode(
    quick: bool, mode: str, name: str, settings: dict[str, object] | None = None
) -> dict[str, Any]:
    """The campaign with the service in ``mode`` (reported as campaign ``name``);
    ``settings`` are extra ``--set`` overrides for the service (experiments)."""
    started = time.monotonic()
    rate = 2_000 if quick else 5_000
    phase_s = 2.0 if quick else 15.0
    backlog_n = 4_000 if quick else 30_000
    rounds = 1 if quick else BACKLOG_ROUNDS
    partitions, aggregates = 8, 1_000
    ids = [f"agg-{i}" for i in range(aggregates)]
    sick = {a for i, a in enumerate(ids) if i % SICK_EVERY == 0}
    phases = _Phases(sick)
    steady: dict[bool, tuple[int, int]] = {}
    backlog: dict[tuple[int, bool], tuple[int, int, int]] = {}
    produced: dict[str, Any] = {}
    total = 0
    async with campaign_env(name) as env:
        topic = await env.topic(partitions)
        svc = env.service(topic, latency_ms=1.0, mode=mode, settings=settings)
        await svc.start()
        producer = SteadyProducer(
            env.bootstrap, topic, partitions=partitions, aggregates=aggregates, decorate=phases
        )
        # 1. steady rate, without then with failures
        for storm in (False, True):
            phases.storm = storm
            p_start = time.monotonic_ns()
            stats = await producer.run(rate, seconds=phase_s)
            steady[storm] = (p_start, time.monotonic_ns())
            produced[f"steady_{'storm' if storm else 'no_failure'}"] = stats.as_dict()
            total += stats.acked
        # 2. a backlog produced while intake is paused, then drained at full speed
        async with svc.client(timeout=30) as client:
            for r in range(rounds):
                for storm in (False, True):
                    phases.storm = storm
                    await wait_for(
                        functools.partial(_settled, svc, total), 120, "all handled so far", 0.1
                    )
                    await client.pause()
                    p_start = time.monotonic_ns()
                    stats = await producer.run(50_000, seconds=60, max_events=backlog_n)
                    p_end = time.monotonic_ns()
                    await client.resume()
                    backlog[r, storm] = (p_start, p_end, time.monotonic_ns())
                    phase = f"backlog_{'storm' if storm else 'no_failure'}_{r + 1}"
                    produced[phase] = stats.as_dict()
                    total += stats.acked
        truth = await read_topic(env.bootstrap, topic)
        permanent = {(r.partition, r.offset) for r in truth if r.fail == "always"}
        transient = {(r.partition, r.offset) for r in truth if r.fail == "transient"}
        # Everything handled or dead-lettered (whatever the outcome), then committed.
        caught_up = await wait_for(
            functools.partial(_settled, svc, len(truth)), 120, "every event finished", 0.2
        )
        ends = ends_of(truth, partitions)
        await wait_for(
            lambda: _committed_all(env.bootstrap, svc.group, topic, partitions, ends),
            60,
            "everything committed",
            0.3,
        )
        rc = await svc.stop()
        dlq = await read_topic(env.bootstrap, f"{topic}.dlq", parse=False)
        records = read_records(svc.record)
        attempts = read_failures(svc.record)
        timeline = read_timeline(svc.record)
        acc = account(truth, records)
        committed = await committed_offsets(env.bootstrap, svc.group, topic, partitions)
    figures: dict[str, Any] = {}
    for storm in (False, True):
        phase = "storm" if storm else "no_failure"
        a, b = steady[storm]
        figures[f"steady_{phase}"] = {
            "healthy_handled_per_s_in_window": _windowed(records, sick, a + 10**9, b),
            **_healthy_figures(records, sick, a, b, from_ns=a),
        }
        for r in range(rounds):
            a, b, resumed = backlog[r, storm]
            figures[f"backlog_{phase}_{r + 1}"] = _healthy_figures(
                records, sick, a, b, from_ns=resumed
            )
    steady_ratio = (
        figures["steady_storm"]["healthy_handled_per_s_in_window"]
        / figures["steady_no_failure"]["healthy_handled_per_s_in_window"]
    )
    # Each round's storm backlog against the no-failure backlog just before it;
    # the median of the rounds is the figure (a drain lasts about a second).
    backlog_ratios = [
        figures[f"backlog_storm_{r + 1}"]["throughput_per_s"]
        / figures[f"backlog_no_failure_{r + 1}"]["throughput_per_s"]
        for r in range(rounds)
    ]
    backlog_ratio = statistics.median(backlog_ratios)
    dead = _dead_letters(dlq)
    reasons: dict[str, int] = {}
    for h in dead.values():
        reasons[h.get("dlq-reason", "?")] = reasons.get(h.get("dlq-reason", "?"), 0) + 1
    handled = {(r.partition, r.offset) for r in records}
    transient_failed = {(f.partition, f.offset) for f in attempts if f.reason == "transient"}
    failures = []
    # Not handled and not dead-lettered either: lost for good.
    lost = acc.lost - len((transient - handled) & set(dead))
    if lost or acc.reordered or acc.overlapped or acc.unexpected or acc.duplicated:
        failures.append(f"accounting: {acc.as_dict()}")
    # ACTOR mode: the events the restart budget escalates, by an independent
    # model of it, must be exactly those dead-lettered restart-budget-exhausted.
    escalated = {k for k, h in dead.items() if h.get("dlq-reason") == "restart-budget-exhausted"}
    predicted: set[tuple[int, int]] = set()
    if mode == "actor":
        actor = Settings().pool.actor
        predicted = expected_escalations(
            timeline, actor.actors, actor.max_restarts, actor.restart_window_s
        )
        if escalated != predicted:
            failures.append(
                f"restart-budget escalations: {len(escalated - predicted)} not predicted by "
                f"the model, {len(predicted - escalated)} predicted but not done"
            )
    missing_dead = permanent - set(dead)
    if missing_dead:
        failures.append(f"{len(missing_dead)} permanent events without a dead letter")
    wrong_reason = [
        k
        for k in permanent & set(dead)
        if dead[k].get("dlq-reason") != "retries-exhausted" and k not in predicted
    ]
    if wrong_reason:
        failures.append(f"{len(wrong_reason)} dead letters without reason retries-exhausted")
    no_message = [k for k in dead if not dead[k].get("dlq-error-message")]
    if no_message:
        failures.append(f"{len(no_message)} dead letters without an error message")
    extra_dead = set(dead) - permanent - predicted
    if extra_dead:
        failures.append(f"{len(extra_dead)} dead letters of events that should succeed")
    if transient - handled - predicted:
        unhandled = transient - handled - predicted
        why = sorted({dead[k].get("dlq-reason", "?") for k in unhandled & set(dead)})
        failures.append(
            f"{len(unhandled)} transient events never handled "
            f"(dead-lettered: {', '.join(why) or 'no'})"
        )
    if steady_ratio < 0.8:
        failures.append(f"steady: healthy throughput {steady_ratio:.0%} of no-failure (< 80 %)")
    if backlog_ratio < 0.8:
        failures.append(f"backlog: healthy throughput {backlog_ratio:.0%} of no-failure (< 80 %)")
    if committed != ends:
        failures.append(f"committed {committed} != ends {ends}")
    if rc != 0:
        failures.append(f"service exit code {rc}")
    storm_events = sum(v["acked"] for k, v in produced.items() if "storm" in k)
    return result(
        name,
        tried=(
            f"5 % permanent + 5 % transient failures ({mode} pool, default retry policy"
            + (", restart budget 3 per 60 s)" if mode == "actor" else ")")
        ),
        amount=(
            f"{num(len(truth))} events ({num(rate)}/s steady + {num(backlog_n)} backlog per "
            f"phase, {rounds} backlog round(s)): {num(len(permanent))} permanent, "
            f"{num(len(transient))} transient; healthy throughput {steady_ratio:.0%} (steady) / "
            f"{backlog_ratio:.0%} (backlog, median) of no-failure; "
            "healthy p99 latency at the steady rate "
            f"{figures['steady_no_failure']['latency_ms_p99']:g} ms -> "
            f"{figures['steady_storm']['latency_ms_p99']:g} ms"
            + (
                f"; {num(len(escalated))} escalated by the restart budget "
                f"({num(len(transient & escalated))} of them transient), "
                f"{num(len(predicted))} predicted by the model"
                if mode == "actor"
                else ""
            )
        ),
        accounting=acc,
        lost=lost,
        passed=not failures,
        seconds=time.monotonic() - started,
        failures=failures,
        details={
            "steady_rate_per_s": rate,
            "steady_phase_s": phase_s,
            "backlog_events_per_phase": backlog_n,
            "backlog_rounds": rounds,
            "produced": produced,
            "storm_events": storm_events,
            "permanent_events": len(permanent),
            "permanent_share_of_storm": round(len(permanent) / max(1, storm_events), 4),
            "transient_events": len(transient),
            "transient_share_of_storm": round(len(transient) / max(1, storm_events), 4),
            "transient_handled": len(transient & handled),
            "transient_escalated": len(transient & escalated),
            "permanent_escalated": len(permanent & escalated),
            "escalations_predicted_by_model": len(predicted),
            "transient_seen_failing": len(transient_failed & transient),
            "failed_attempts": len(attempts),
            "dead_letters_on_topic": len(dead),
            "dead_letter_reasons": reasons,
            **{f"healthy_{k}": v for k, v in figures.items()},
            "healthy_throughput_ratio_steady": round(steady_ratio, 3),
            "healthy_throughput_ratio_backlog": round(backlog_ratio, 3),
            "healthy_throughput_ratio_backlog_rounds": [round(x, 3) for x in backlog_ratios],
            "all_handled_after_production_s": round(caught_up, 2),
            "aggregates": aggregates,
            "sick_aggregates": len(sick),
            "partitions": partitions,
            "handler_latency_ms": 1.0,
            "retry_policy": "3 attempts, backoff 100 ms x2, jitter 0.2 (defaults)",
            "mode": mode,
            "exit_code": rc,
            "notes": NOTES + (ACTOR_NOTES if mode == "actor" else []),
        },
    )


async def _committed_all(
    bootstrap: str, group: str, topic: str, partitions: int, ends: dict[int, int]
) -> bool:
    committed = await committed_offsets(bootstrap, group, topic, partitions)
    return committed == ends
