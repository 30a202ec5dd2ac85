"""Per-event cost by stage from a ``py-spy record --format raw --threads`` profile.

    .venv/bin/python bench/profile_breakdown.py PROFILE.txt [--cpu-us-per-event 16.0]

Each line of the raw format is one call stack (``;``-separated frames, root
first, each ``function (file:line)``) and its sample count; with ``--threads``
the first frame names the thread. Idle samples are not recorded (py-spy's
default), so the samples are where the process spent CPU.

Attribution, per stack:

1. From the leaf towards the root, the first frame that belongs to a stage of
   the consumer (:data:`RULES`, matched on file and function) decides: a leaf
   in ``prometheus_client`` is *metrics* wherever it was called from, a leaf in
   ``json`` called by the intake is *intake decode*, the executor loop's own
   lines are *executor*. aiokafka's frames are not in the rules: its work is
   charged to the consumer frame that called it (``_fetch_loop`` -> *fetch*,
   ``_commit`` -> *commits*). The benches' handler (``bench/campaigns/_handler.py``)
   is *handler*, except its ``asyncio.sleep`` (the simulated I/O: the future
   and the timer it creates) and that timer's callback
   (``futures._set_result_unless_cancelled``, from uvloop between callbacks),
   which are *handler's asyncio.sleep*. The task's wake-up after the timer is
   uvloop's and the C ``Task``'s (*event loop*, unseen by py-spy without
   ``--native``), and then the handler's and the executor's own lines.
2. A stack without such a frame (aiokafka's own tasks, the event loop's
   callbacks) is *commits* when it runs through the group coordinator
   (commits, heartbeats), *fetch and record parsing* when it runs through
   another part of aiokafka or asyncio's streams (the fetcher's task, the
   connection reading responses), *event loop* when only the loop's frames are
   left (uvloop's C code between callbacks: task steps, timers, I/O), *other*
   otherwise.

Only the event loop's thread (``MainThread``) is broken down: the other
threads (the metrics HTTP server, gRPC's poller) mostly wait in ``poll``,
which py-spy does not always see as idle; their CPU is measured from
``/proc/<pid>/task`` instead. µs/event of a stage is its share of the main
thread's samples times the main thread's CPU µs/event over the same drain
(``bench/service_bench.py``).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

#: (stage, file substring, function names or None for any), checked in order.
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("handler timeout", "asyncio/timeouts.py", None),
    ("handler timeout", "pool/_executor.py", frozenset({"run_async_with_timeout", "_expire"})),
    ("handler", "bench/campaigns/_handler.py", None),
    ("metrics", "prometheus_client/", None),
    ("metrics", "pool/_metrics.py", None),
    ("metrics", "server/_consumer_metrics.py", None),
    ("metrics", "server/_switch_metrics.py", None),
    ("metrics", "server/_process_metrics.py", None),
    ("logging", "structlog/", None),
    ("logging", "logging/", None),
    ("intake decode", "server/_intake.py", None),
    ("intake decode", "json/", None),
    ("finish and offset tracking", "server/_offsets.py", None),
    (
        "finish and offset tracking",
        "server/_consumer.py",
        frozenset({"_on_finished", "_finish", "_check_room"}),
    ),
    ("finish and offset tracking", "pool/_switch.py", frozenset({"finished", "_handed_over"})),
    ("commits", "server/_consumer.py", frozenset({"_commit_loop", "_commit", "commit", "_dirty"})),
    ("fetch and record parsing", "server/_records.py", None),
    ("fetch and record parsing", "server/_consumer.py", frozenset({"_fetch_loop"})),
    ("dispatch", "server/_consumer.py", frozenset({"_dispatch_batch", "_submit_backlog"})),
    ("dispatch", "pool/_switch.py", None),
    (
        "dispatch",
        "pool/_executor.py",
        frozenset({"_enqueue", "dispatch_nowait", "dispatch", "submit_nowait", "submit"}),
    ),
    ("dispatch", "pool/_routing.py", None),
    ("executor", "pool/_executor.py", None),
    ("executor", "pool/_actor.py", None),
    ("gRPC and control", "grpc/", None),
    ("gRPC and control", "server/_grpc.py", None),
    ("gRPC and control", "server/_control.py", None),
    ("gRPC and control", "server/_service.py", None),
)
STAGES = (
    "fetch and record parsing",
    "intake decode",
    "dispatch",
    "executor",
    "handler timeout",
    "handler",
    "handler's asyncio.sleep",
    "finish and offset tracking",
    "metrics",
    "commits",
    "logging",
    "gRPC and control",
    "event loop",
    "other",
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    """``[(frames root first as (function, file)), samples)]`` of a raw profile."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part)
            frames.append((m["func"], m["file"]) if m else (part, ""))
        out.append((frames, int(count)))
    return out


#: Frames of the process's start and of the event loop itself.
_LOOP_FILES = ("<frozen runpy>", "server/__main__.py", "uvloop/", "asyncio/")


#: The benches' handler (``bench.campaigns._handler``).
_HANDLER_FILE = "bench/campaigns/_handler.py"


def _is_handler_sleep(frames: list[tuple[str, str]], i: int) -> bool:
    """Frame ``i`` is ``asyncio.sleep`` called by the handler, or the callback
    of a sleep's timer (``futures._set_result_unless_cancelled``: only
    ``asyncio.sleep`` schedules it; with the 1 ms handler nearly all of them
    are the handler's)."""
    func, file = frames[i]
    if file.endswith("asyncio/futures.py") and func == "_set_result_unless_cancelled":
        return True
    return (
        file.endswith("asyncio/tasks.py")
        and func == "sleep"
        and i > 0
        and _HANDLER_FILE in frames[i - 1][1]
    )


def stage_of(frames: list[tuple[str, str]]) -> str:
    """The stage of one stack (root first); see the module docstring."""
    for i in range(len(frames) - 1, -1, -1):
        if _is_handler_sleep(frames, i):
            return "handler's asyncio.sleep"
        func, file = frames[i]
        name = func.rpartition(".")[2]  # py-spy qualifies: "EventConsumer._finish"
        for stage, where, funcs in RULES:
            if where in file and (funcs is None or name in funcs):
                return stage
    files = [file for _, file in frames]
    if any("aiokafka/consumer/group_coordinator.py" in f for f in files):
        return "commits"
    if any("aiokafka/" in f or "asyncio/streams.py" in f for f in files):
        return "fetch and record parsing"
    if all(any(m in f for m in _LOOP_FILES) for f in files):
        return "event loop"
    return "other"


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/perf/", "/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def breakdown(text: str, cpu_us_per_event: float) -> dict[str, Any]:
    """Samples, share and µs/event per stage of the main thread (whose CPU
    µs/event is ``cpu_us_per_event``); its top self-time functions."""
    stacks = parse(text)
    by_stage: Counter[str] = Counter()
    hot: Counter[str] = Counter()
    hot_stage: dict[str, Counter[str]] = {}
    threads: Counter[str] = Counter()
    for frames, n in stacks:
        thread = frames[0][0] if frames and frames[0][0].startswith("thread") else ""
        threads[thread] += n
        if thread and not thread.endswith("MainThread"):
            continue
        body = frames[1:] if thread else frames
        stage = stage_of(body)
        by_stage[stage] += n
        if body:
            func, file = body[-1]
            key = f"{func} ({_short(file)})"
            if file == "<string>" and len(body) > 1:  # generated code: a dataclass's __init__
                key += f" from {body[-2][0]}"
            hot[key] += n
            hot_stage.setdefault(key, Counter())[stage] += n
    total = sum(by_stage.values()) or 1
    stages = [
        {
            "stage": stage,
            "samples": by_stage[stage],
            "share": round(by_stage[stage] / total, 4),
            "us_per_event": round(by_stage[stage] / total * cpu_us_per_event, 2),
        }
        for stage in STAGES
        if by_stage[stage]
    ]
    all_samples = sum(threads.values()) or 1
    return {
        "samples": total,
        "threads": [
            {"thread": t, "share_of_samples": round(n / all_samples, 4)}
            for t, n in threads.most_common()
        ],
        "stages": stages,
        "hot_spots": [
            {
                "function": k,
                "stage": hot_stage[k].most_common(1)[0][0],
                "share": round(n / total, 4),
            }
            for k, n in hot.most_common(15)
        ],
    }


def table(result: dict[str, Any]) -> str:
    out = ["| stage | µs/event | % of samples |", "|---|---:|---:|"]
    out += [
        f"| {s['stage']} | {s['us_per_event']:.2f} | {s['share'] * 100:.1f} |"
        for s in result["stages"]
    ]
    out += ["", "| self time | stage | % of samples |", "|---|---|---:|"]
    out += [
        f"| `{h['function']}` | {h['stage']} | {h['share'] * 100:.1f} |"
        for h in result["hot_spots"][:10]
    ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--cpu-us-per-event", type=float, default=0.0, help="of the main thread")
    args = p.parse_args()
    print(table(breakdown(args.profile.read_text(), args.cpu_us_per_event)))


if __name__ == "__main__":
    main()
