"""The reliability campaign: faults, load and bad input against the real service.

    .venv/bin/python bench/reliability.py [--only NAME ...] [--quick] [--list]
        [--json bench/results/reliability.json] [--out docs/reliability.md]

Runs the campaigns of ``bench/campaigns/`` (each module: ``NAME``,
``DESCRIPTION``, ``async def run(quick) -> dict``) one after another, each in
a fresh event loop and bounded in time (``TIMEOUT_S`` of the module, default
900 s; 120 s with ``--quick``). Each campaign starts its own embedded broker
and runs the real service (``python -m server``) on loopback.

Results are merged by campaign name into the JSON file (other campaigns'
results are kept), and ``docs/reliability.md`` is regenerated from the merged
JSON: a summary table (tried, how much, lost / reordered / duplicated), then
each campaign's details, with the date and machine of its run.

``--quick`` shrinks every campaign to a few seconds (what the tests run); its
results are written only when ``--json``/``--out`` are given explicitly.
Exit code: 0 when every campaign run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.campaigns as campaigns_pkg  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "reliability.json"
DEFAULT_OUT = ROOT / "docs" / "reliability.md"
DEFAULT_TIMEOUT_S = 900.0
QUICK_TIMEOUT_S = 120.0
TABLE_HEADER = (
    "| campaign | tried | how much | lost | reordered | duplicated / redelivered | result | time |"
)
REQUIRED = (
    "campaign",
    "tried",
    "amount",
    "lost",
    "reordered",
    "duplicated_or_redelivered",
    "passed",
    "seconds",
    "details",
)


@dataclass(frozen=True)
class Campaign:
    name: str
    description: str
    module: ModuleType
    timeout_s: float
    order: int


def discover() -> list[Campaign]:
    """Every campaign module in ``bench/campaigns/``, in report order."""
    found = []
    for info in pkgutil.iter_modules(campaigns_pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{campaigns_pkg.__name__}.{info.name}")
        if not (hasattr(module, "NAME") and hasattr(module, "run")):
            continue
        found.append(
            Campaign(
                name=str(module.NAME),
                description=str(getattr(module, "DESCRIPTION", "")),
                module=module,
                timeout_s=float(getattr(module, "TIMEOUT_S", DEFAULT_TIMEOUT_S)),
                order=int(getattr(module, "ORDER", 100)),
            )
        )
    return sorted(found, key=lambda c: (c.order, c.name))


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def _check(res: object) -> None:
    if not isinstance(res, dict):
        raise TypeError(f"run() returned {type(res).__name__}, not a dict")
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        raise ValueError(f"result lacks {', '.join(missing)}")


def run_one(campaign: Campaign, quick: bool) -> dict[str, Any]:
    """Run one campaign in a fresh event loop, bounded in time; never raises."""
    timeout = QUICK_TIMEOUT_S if quick else campaign.timeout_s
    started = time.monotonic()
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        res: dict[str, Any] = asyncio.run(asyncio.wait_for(campaign.module.run(quick), timeout))
        _check(res)
        res["campaign"] = campaign.name  # the module's NAME decides the row
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        overrun = time.monotonic() - started >= timeout
        what = f"timed out after {timeout:g}s" if overrun else repr(exc)
        res = {
            "campaign": campaign.name,
            "tried": campaign.description,
            "amount": "-",
            "lost": None,
            "reordered": None,
            "duplicated_or_redelivered": None,
            "passed": False,
            "seconds": round(time.monotonic() - started, 1),
            "details": {},
            "error": what,
            "traceback": traceback.format_exc()[-4000:],
        }
    res["quick"] = quick
    res["date"] = stamp
    res["machine"] = machine()
    res.setdefault("description", campaign.description)
    return res


# ------------------------------------------------------------------ output


def merge(path: Path, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Results already in ``path`` (by campaign name), updated with ``results``."""
    merged: dict[str, dict[str, Any]] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        for item in old.get("campaigns", []) if isinstance(old, dict) else []:
            if isinstance(item, dict) and "campaign" in item:
                merged[item["campaign"]] = item
    for res in results:
        merged[res["campaign"]] = res
    return merged


def _count(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    return str(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".").replace(",", " ")
    if isinstance(value, int) and not isinstance(value, bool):
        return _count(value)
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, separators=(", ", ": "))[:300] + "`"
    return str(value)


def render(merged: dict[str, dict[str, Any]], order: list[str]) -> str:
    """``docs/reliability.md`` from the merged results."""
    names = [n for n in order if n in merged] + sorted(n for n in merged if n not in order)
    lines = [
        "# Reliability campaign",
        "",
        "Faults, load and bad input against the real service (`python -m server`",
        "as a subprocess) and the embedded broker, on loopback. Generated by",
        "`bench/reliability.py` from `bench/results/reliability.json`; each",
        "campaign's row comes from its latest run (date and machine below).",
        "",
        "Rerun: `.venv/bin/python bench/reliability.py` (all),",
        "`--only NAME` (one; merged into this file), `--quick` (a few seconds each,",
        "as the tests run them; not written here unless `--out` is given).",
        "",
        "The goal: nothing lost, nothing reordered. *Duplicated / redelivered*",
        "counts handlings beyond the first: at-least-once allows them after a",
        "crash or a rebalance, never otherwise.",
        "",
        TABLE_HEADER,
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = merged[name]
        verdict = "pass" if r.get("passed") else "**FAIL**"
        if r.get("quick"):
            verdict += " (quick)"
        lines.append(
            f"| `{_cell(name)}` | {_cell(r.get('tried', ''))} | {_cell(r.get('amount', ''))} "
            f"| {_count(r.get('lost'))} | {_count(r.get('reordered'))} "
            f"| {_count(r.get('duplicated_or_redelivered'))} | {verdict} "
            f"| {r.get('seconds', 0):g} s |"
        )
    for name in names:
        r = merged[name]
        lines += ["", f"## `{name}`", ""]
        if r.get("description"):
            lines += [str(r["description"]), ""]
        m = r.get("machine") or {}
        lines.append(
            f"Run {r.get('date', '?')}{' (quick)' if r.get('quick') else ''} on "
            f"{m.get('cpus', '?')} CPUs, {m.get('platform', '?')}, Python {m.get('python', '?')}."
        )
        if r.get("error"):
            lines += ["", f"**Error:** `{_cell(r['error'])}`"]
        for failure in r.get("failures") or []:
            lines.append(f"- **failed:** {failure}")
        details = r.get("details") or {}
        if details:
            lines += ["", "| figure | value |", "|---|---|"]
            for key, value in details.items():
                if key == "notes":
                    continue
                if isinstance(value, dict) and key != "accounting":
                    for sub, v in value.items():
                        lines.append(f"| {_cell(key)}.{_cell(sub)} | {_cell(_fmt(v))} |")
                elif key == "accounting":
                    for sub, v in value.items():
                        if sub.endswith("_sample") and not v:
                            continue
                        lines.append(f"| accounting.{_cell(sub)} | {_cell(_fmt(v))} |")
                else:
                    lines.append(f"| {_cell(key)} | {_cell(_fmt(value))} |")
            notes = details.get("notes")
            for note in notes if isinstance(notes, list) else [notes] if notes else []:
                lines += ["", str(note)]
    return "\n".join(lines) + "\n"


def write(json_path: Path, out_path: Path, results: list[dict[str, Any]], order: list[str]) -> None:
    """Merge ``results`` into ``json_path`` and regenerate ``out_path``, under a
    lock file (two runners started with different ``--only`` may finish together)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = merge(json_path, results)
        rank = {n: i for i, n in enumerate(order)}
        doc = {
            "generated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "campaigns": [merged[n] for n in sorted(merged, key=lambda n: (rank.get(n, 99), n))],
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        out_path.write_text(render(merged, order))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="campaigns to run")
    parser.add_argument("--quick", action="store_true", help="a few seconds per campaign")
    parser.add_argument("--list", action="store_true", help="list the campaigns and exit")
    parser.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    args = parser.parse_args(argv)

    found = discover()
    order = [c.name for c in found]
    if args.list:
        for c in found:
            print(f"{c.name:16} {c.description}")
        return 0
    selected = found
    if args.only:
        unknown = sorted(set(args.only) - set(order))
        if unknown:
            parser.error(f"unknown campaign(s): {', '.join(unknown)} (known: {', '.join(order)})")
        selected = [c for c in found if c.name in args.only]

    results = []
    for campaign in selected:
        print(f"== {campaign.name}: {campaign.description}", flush=True)
        res = run_one(campaign, args.quick)
        results.append(res)
        verdict = "PASS" if res["passed"] else "FAIL"
        print(
            f"   {verdict} in {res['seconds']} s: {res['amount']}; lost {res['lost']}, "
            f"reordered {res['reordered']}, duplicated/redelivered "
            f"{res['duplicated_or_redelivered']}"
            + (f"; error {res['error']}" if res.get("error") else ""),
            flush=True,
        )
        for failure in res.get("failures") or []:
            print(f"   - {failure}", flush=True)

    if not args.quick or args.json or args.out:
        json_path = args.json or DEFAULT_JSON
        out_path = args.out or DEFAULT_OUT
        write(json_path, out_path, results, order)
        print(f"wrote {out_path} and {json_path}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
