"""``bench/profile_breakdown.py``: stacks of a py-spy raw profile go to the
stage their leaf-most frame of ours names; the handler's ``asyncio.sleep``
and its timer's callback are a stage of their own."""

from __future__ import annotations

from bench.profile_breakdown import breakdown, stage_of

_RUN = ("BasePool._run", "/x/pool/_executor.py")
_COUNT = ("count", "/x/bench/campaigns/_handler.py")
_LOOP = ("Runner.run", "/usr/lib/python3.11/asyncio/runners.py")


def test_the_handlers_sleep_is_its_own_stage() -> None:
    sleep = ("sleep", "/usr/lib/python3.11/asyncio/tasks.py")
    assert stage_of([_LOOP, _RUN, _COUNT, sleep]) == "handler's asyncio.sleep"
    timer = ("_set_result_unless_cancelled", "/usr/lib/python3.11/asyncio/futures.py")
    assert stage_of([_LOOP, timer]) == "handler's asyncio.sleep"


def test_a_sleep_not_called_by_the_handler_is_not_the_handlers() -> None:
    sleep = ("sleep", "/usr/lib/python3.11/asyncio/tasks.py")
    fetch = ("EventConsumer._fetch_loop", "/x/server/_consumer.py")
    assert stage_of([_LOOP, fetch, sleep]) == "fetch and record parsing"
    assert stage_of([_LOOP, _RUN, _COUNT]) == "handler"
    assert stage_of([_LOOP, _RUN]) == "executor"


def test_breakdown_shares_the_loop_threads_cpu_by_samples() -> None:
    loop = "thread (0x1): MainThread;Runner.run (/usr/lib/python3.11/asyncio/runners.py:1)"
    run = "BasePool._run (/x/pool/_executor.py:2)"
    count = "count (/x/bench/campaigns/_handler.py:3)"
    sleep = "sleep (/usr/lib/python3.11/asyncio/tasks.py:4)"
    text = f"{loop};{run};{count};{sleep} 3\n{loop};{run} 1\n"
    result = breakdown(text, cpu_us_per_event=8.0)
    stages = {s["stage"]: s["us_per_event"] for s in result["stages"]}
    assert result["samples"] == 4
    assert stages == {"executor": 2.0, "handler's asyncio.sleep": 6.0}
