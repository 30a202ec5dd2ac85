"""Intake decode per record, this checkout against another one, in one run.

    .venv/bin/python bench/intake_bench.py [--baseline-root DIR] [--rounds 5]
        [--records 2000] [--repeat 5] [--json bench/results/intake_bench.json]

``Decoder.decode`` (``server/_intake.py``) for each case below, on a pre-built
list of ``--records`` records (``--records`` distinct aggregates, so nothing
is served from one hot entry), the way the consumer calls it (seven
positional arguments). Each round runs one worker process per checkout (this
one and, with ``--baseline-root``, the other: e.g. ``git archive main | tar -x
-C DIR``), alternating which goes first; a worker imports ``server`` and
``pool`` from its checkout only, takes the cyclic-GC settings the service runs
with (``gc.freeze()``, thresholds ``(50_000, 20, 10)``) and reports, per case,
the best of ``--repeat`` passes in ns per record. The table gives the best
over the rounds and, in brackets, their median (on a loaded machine the other
jobs only ever add time, so the best is the steadier figure); ns/record
includes the loop's own cost (the ``loop only`` row, the same for both). The
ratio is of the bests.

Cases: the bench's seed envelope with the aggregate as key (what
``bench/service_bench.py`` drains); an envelope routed by an ``X-Aggregate-ID``
header among two others; a binary value routed by key; a JSON object without
envelope fields; a value with no ID at all (``route-by-offset``); two rejected
ones (an envelope with a bad field, a ``{``-value that is not JSON: the slow
paths); and building the ``Message`` alone (``make_message`` where the
checkout has it, else ``Message(...)``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

Record = tuple[str, int, int, bytes | None, bytes, tuple[tuple[str, bytes], ...], int]

CASES = (
    ("loop only", "the loop over the records, no call"),
    ("seed envelope, key", "service_bench's envelope, aggregate as the key"),
    ("envelope, ID header", "no aggregate_id: X-Aggregate-ID among 3 headers"),
    ("binary value, key", "not JSON: routed by the key"),
    ("plain JSON, key", "a JSON object without envelope fields"),
    ("no ID, by offset", "no envelope, header or key: route-by-offset"),
    ("bad envelope field", "malformed-envelope: event_version 0"),
    ("not JSON", "malformed-envelope: a truncated object"),
    ("Message only", "building the Message (make_message or Message(...))"),
)


def _envelope(aggregate_id: str | None, seq: int) -> bytes:
    body: dict[str, Any] = {
        "event_id": f"{aggregate_id}:{seq}",
        "aggregate_id": aggregate_id,
        "event_type": "BenchEvent",
        "event_version": 1,
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": {"seq": seq, "t": 0.0},
    }
    if aggregate_id is None:
        del body["aggregate_id"]
    return json.dumps(body, separators=(",", ":")).encode()


def records(case: str, n: int) -> list[Record]:
    out: list[Record] = []
    for i in range(n):
        agg = f"agg-{i}"
        key: bytes | None = agg.encode()
        headers: tuple[tuple[str, bytes], ...] = ()  # a tuple, as aiokafka gives them
        if case in ("seed envelope, key", "loop only", "Message only"):
            value = _envelope(agg, i)
        elif case == "envelope, ID header":
            value, key = _envelope(None, i), None
            headers = (("trace", b"t-1"), ("X-Aggregate-ID", agg.encode()), ("source", b"bench"))
        elif case == "binary value, key":
            value = bytes(range(i % 7, i % 7 + 40))
        elif case == "plain JSON, key":
            value = json.dumps({"amount": i, "currency": "EUR", "note": "x" * 40}).encode()
        elif case == "no ID, by offset":
            value, key = b"raw value " * 8, None
        elif case == "bad envelope field":
            value = _envelope(agg, i).replace(b'"event_version":1', b'"event_version":0')
        elif case == "not JSON":
            value = _envelope(agg, i)[:-5]
        else:
            raise ValueError(case)
        out.append(("bench", i % 8, i, key, value, headers, 1_700_000_000_000 + i))
    return out


def _best_ns(run: Callable[[], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def worker(root: Path, n: int, repeat: int) -> dict[str, float]:
    """Runs in a process of its own, with ``root``'s ``server`` and ``pool``."""
    sys.path.insert(0, str(root))
    from pool import Message
    from server._intake import Decoder

    try:
        from pool._message import make_message as build  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        build = Message

    decode = Decoder(clock=lambda: 0.0).decode
    data = {case: records(case, n) for case, _ in CASES}
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)

    def loop_only(recs: list[Record]) -> Callable[[], None]:
        def run() -> None:
            for _t, _p, _o, _k, _v, _h, _ts in recs:
                pass

        return run

    def decoding(recs: list[Record]) -> Callable[[], None]:
        def run() -> None:
            for t, p, o, k, v, h, ts in recs:
                decode(t, p, o, k, v, h, ts)

        return run

    def building(recs: list[Record]) -> Callable[[], None]:
        def run() -> None:
            for t, p, o, k, v, _h, ts in recs:
                build(t, p, o, k, v, (), "agg", ts, None)

        return run

    out = {}
    for case, _ in CASES:
        recs = data[case]
        if case == "loop only":
            run = loop_only(recs)
        elif case == "Message only":
            run = building(recs)
        else:
            run = decoding(recs)
        run()  # warm-up
        out[case] = _best_ns(run, n, repeat)
    return out


def _spawn(root: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(root),
        "--records",
        str(args.records),
        "--repeat",
        str(args.repeat),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _describe(root: Path) -> str:
    """The checkout's commit (its path stays out of the committed results)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        head = "?"
    dirty = ""
    if head != "?":
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "server", "pool"],
            capture_output=True,
            text=True,
        ).stdout
        dirty = "+changes" if status.strip() else ""
    return f"commit {head}{dirty}"


def table(report: dict[str, Any]) -> str:
    labels = [label for label in ("baseline", "this") if label in report["results"]]
    head = "| case | " + " | ".join(f"{label}, ns/record: best (median)" for label in labels)
    if len(labels) == 2:
        head += " | this / baseline"
    lines = [head + " |", "|---|" + "---:|" * (len(labels) + (len(labels) == 2))]
    for case, _ in CASES:
        cells = []
        bests = []
        for label in labels:
            values = [r[case] for r in report["results"][label]]
            bests.append(min(values))
            cells.append(f"{min(values):,.0f} ({statistics.median(values):,.0f})")
        if len(labels) == 2:
            cells.append("-" if case == "loop only" else f"{bests[1] / bests[0]:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-root", type=Path, help="another checkout to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="bench/results/intake_bench.json")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.records, args.repeat)))
        return

    roots = {"this": ROOT}
    if args.baseline_root is not None:
        roots["baseline"] = args.baseline_root.resolve()
    results: dict[str, list[dict[str, float]]] = {label: [] for label in roots}
    for rnd in range(args.rounds):
        order = list(roots) if rnd % 2 == 0 else list(reversed(roots))
        for label in order:
            results[label].append(_spawn(roots[label], args))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()),
        "records": args.records,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "roots": {label: _describe(root) for label, root in roots.items()},
        "cases": dict(CASES),
        "results": results,
    }
    print(table(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
