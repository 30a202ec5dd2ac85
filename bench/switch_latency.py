"""SetPoolMode latency of the shipped service under a steady stream.

    .venv/bin/python bench/switch_latency.py [--rate 10000] [--switches 200]
        [--handler-ms 1] [--partitions 8] [--aggregates 10000] [--runs 1]
        [--variant [NAME=]DIR ...] [--freeze-ms MS] [--no-lag-probe]
        [--read-call health|status|fleet-status] [--freeze-reads]
        [--inline-producer] [--keep-calls] [--json bench/results/switch_latency.json]

Real processes on one embedded broker: ``python -m server`` with its default
configuration (only ``--brokers``, ``--topic``, ``--group-id``, ``--handler``
and the two addresses, on free ports), a producer *process* sending a steady
``--rate`` events/s (:class:`bench.campaigns._harness.SteadyProducer`, in a
process of its own so that its work never delays this process's clock;
``--inline-producer`` runs it here instead), and this process calling
``SetPoolMode`` over gRPC, alternating ACTOR/KEYED, about every 100 ms, with a
health check half-way between two calls. The handler
(``bench/_switch_probe.py``) awaits ``--handler-ms``.

Where a call's time goes:

- **round trip**: client side, call -> answer (it comes once the new mode is
  in force and every aggregate with events in the old pool was handed over);
- **switch**: the server's own ``took`` (``PoolSwitch``: new rule -> the last
  waiting aggregate's events in the old pool finished), with what the old pool
  held when the rule changed (events, deepest executor queue);
- **rpc**: round trip minus switch (gRPC both ways, interceptor, audit log);
  the health check's round trip is the floor of any call;
- **loop stalls** of the service (its event loop late by more than 1 ms),
  split into CPU time of the loop thread, time it was runnable while another
  process had the CPU, and the rest (blocked);
- **dispatch**: each ``_dispatch_batch`` call (records, duration);
- **GC**: collections of 0.5 ms or more.

``--variant NAME=DIR`` (or ``--baseline-root DIR``; repeatable) runs the
service code of another checkout too (e.g. ``git archive <commit> | tar -x -C
DIR``), interleaved run by run with this one, and pools every call of each
variant: a before/after in one session on a loaded machine. ``--freeze-ms``
stops the service (SIGSTOP) that long before each call, so that a backlog has
built when the call comes (what a loaded machine does at random).
``--read-call`` chooses the call timed half-way between two switches
(``health``, ``status``: GetStatus, ``fleet-status``: GetFleetStatus; the
"health" columns), ``--freeze-reads`` freezes before it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.campaigns._harness import SteadyProducer, percentile, wait_for  # noqa: E402
from clients import AsyncPoolControlClient  # noqa: E402
from server._broker import EmbeddedBroker  # noqa: E402

HANDLER = "_switch_probe:handle"
PROBE_SLEEP_NS = 1_000_000
THIS = Path(__file__).resolve()


@dataclass(slots=True)
class Call:
    start_ns: int
    end_ns: int
    took_ms: float
    waited: int
    pending: int

    @property
    def round_trip_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass(slots=True)
class Probe:
    """What ``bench/_switch_probe.py`` wrote in the service."""

    #: (start_ns, busy_ns, cpu_ns, runnable_ns)
    stalls: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: (start_ns, events, deepest, aggregates, took_ns)
    switches: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    #: (start_ns, records, ns)
    dispatches: list[tuple[int, int, int]] = field(default_factory=list)
    #: (generation, start_ns, ns)
    collections: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Probe:
        probe = cls()
        if not path.exists():
            return probe
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition(",")
            if kind == "T":
                continue
            f = [int(x) for x in rest.split(",")]
            if kind == "S":
                # Busy from the due wake-up to the actual one.
                probe.stalls.append((f[0] + PROBE_SLEEP_NS, f[1] - PROBE_SLEEP_NS, f[2], f[3]))
            elif kind == "W":
                probe.switches.append((f[0], f[1], f[2], f[3], f[4]))
            elif kind == "D":
                probe.dispatches.append((f[0], f[1], f[2]))
            elif kind == "G":
                probe.collections.append((f[0], f[1], f[2]))
        return probe


def pct(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values, default=0.0), 2),
        "mean": round(statistics.fmean(values), 2) if values else 0.0,
        "n": len(values),
    }


def _overlap_ms(start: int, end: int, spans: list[tuple[int, int]]) -> float:
    total = 0
    for s, length in spans:
        e = s + length
        if e > start and s < end:
            total += min(e, end) - max(s, start)
    return total / 1e6


def _audit_took(stderr: Path) -> list[float]:
    """took_ms of the service's ``control.audit`` lines for SetPoolMode."""
    out = []
    for line in stderr.read_text(errors="replace").splitlines():
        if '"control.audit"' in line and "SetPoolMode" in line:
            try:
                out.append(float(json.loads(line)["took_ms"]))
            except (ValueError, KeyError):
                continue
    return out


def _service_env(args: argparse.Namespace, root: Path, probe: Path) -> dict[str, str]:
    return {
        **os.environ,
        # The service's code from ``root``; the handler module from this bench.
        "PYTHONPATH": os.pathsep.join([str(root), str(THIS.parent)]),
        "HANDLER_LATENCY_MS": str(args.handler_ms),
        "SWITCH_PROBE_FILE": str(probe),
        "SWITCH_PROBE_LAG": "0" if args.no_lag_probe else "1",
    }


async def one_run(
    args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path, name: str, root: Path
) -> dict[str, Any]:
    topic = f"switch-{name}"
    await broker.create_topics({topic: args.partitions})
    probe_path, out, err = (workdir / f"{name}.{x}" for x in ("probe", "out", "err"))
    cmd = [
        sys.executable, "-P", "-m", "server",
        "--brokers", broker.bootstrap, "--topic", topic, "--group-id", f"g-{topic}",
        "--handler", HANDLER,
        "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
    ]  # fmt: skip
    with out.open("wb") as o, err.open("wb") as e:
        svc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            cmd, env=_service_env(args, root, probe_path), stdout=o, stderr=e, cwd=root
        )
    producer: subprocess.Popen[bytes] | None = None
    inline: asyncio.Future[Any] | None = None
    inline_stop = asyncio.Event()
    calls: list[Call] = []
    health: list[float] = []
    try:

        def banner() -> bool:
            if svc.poll() is not None:
                raise RuntimeError(f"{name} exited: {err.read_text()[-2000:]}")
            return "look at it:" in out.read_text(errors="replace")

        await wait_for(banner, 60, f"{name} banner")
        found = re.search(r"gRPC\s+(\S+)", out.read_text())
        assert found is not None
        async with AsyncPoolControlClient(found.group(1), timeout=30) as client:

            async def assigned() -> bool:
                partitions = (await client.status()).partitions
                return bool(len(partitions) == args.partitions)

            await wait_for(assigned, 60, f"{name} assignment", interval=0.2)
            if args.inline_producer:
                steady = SteadyProducer(
                    broker.bootstrap, topic, partitions=args.partitions, aggregates=args.aggregates
                )
                inline = asyncio.ensure_future(steady.run(args.rate, 3600, stop=inline_stop))
            else:
                producer = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                    [
                        sys.executable, str(THIS), "--produce",
                        "--brokers", broker.bootstrap, "--topic", topic,
                        "--rate", str(args.rate), "--partitions", str(args.partitions),
                        "--aggregates", str(args.aggregates),
                    ],
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
            read_call = {
                "health": client.health,
                "status": client.status,
                "fleet-status": client.fleet_status,
            }[args.read_call]
            await asyncio.sleep(args.warmup)
            rng = random.Random(12)
            mode = "keyed"
            for _ in range(args.switches):
                await asyncio.sleep(rng.uniform(0.025, 0.075))
                if args.freeze_ms and args.freeze_reads:
                    svc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(args.freeze_ms / 1000)
                    svc.send_signal(signal.SIGCONT)
                t0 = time.monotonic_ns()
                await read_call()
                health.append((time.monotonic_ns() - t0) / 1e6)
                await asyncio.sleep(rng.uniform(0.025, 0.075))
                if args.freeze_ms:
                    # Held off the CPU (as by a loaded machine): a backlog builds.
                    svc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(args.freeze_ms / 1000)
                    svc.send_signal(signal.SIGCONT)
                mode = "actor" if mode == "keyed" else "keyed"
                t0 = time.monotonic_ns()
                result = (await client.set_mode(mode)).result
                t1 = time.monotonic_ns()
                took = result.took.ToTimedelta().total_seconds() * 1000
                calls.append(
                    Call(t0, t1, took, result.waited_aggregates, result.pending_aggregates)
                )
    finally:
        inline_stop.set()
        if inline is not None:
            await inline
        if producer is not None:
            producer.terminate()
            producer.wait(30)
        if svc.poll() is None:
            svc.terminate()
            try:
                svc.wait(60)
            except subprocess.TimeoutExpired:
                svc.kill()
                svc.wait(10)
    return summarise(name, root, calls, health, Probe.read(probe_path), _audit_took(err))


def summarise(
    name: str, root: Path, calls: list[Call], health: list[float], probe: Probe, audit: list[float]
) -> dict[str, Any]:
    first, last = calls[0].start_ns, calls[-1].end_ns
    seconds = (last - first) / 1e9
    stall_spans = [(s, n) for s, n, _, _ in probe.stalls]
    gc_spans = [(s, n) for _, s, n in probe.collections]
    per_call = [
        {
            "round_trip_ms": round(c.round_trip_ms, 3),
            "switch_ms": round(c.took_ms, 3),
            "rpc_ms": round(c.round_trip_ms - c.took_ms, 3),
            "stalled_ms": round(_overlap_ms(c.start_ns, c.end_ns, stall_spans), 3),
            "gc_ms": round(_overlap_ms(c.start_ns, c.end_ns, gc_spans), 3),
            "waited_aggregates": c.waited,
            "pending_aggregates": c.pending,
        }
        for c in calls
    ]
    # What the old pool held at each change, matched to the calls in order.
    for row, (_, events, deepest, _, _) in zip(per_call, probe.switches, strict=False):
        row["old_pool_events"] = events
        row["old_pool_deepest"] = deepest
    stalls = [s for s in probe.stalls if first <= s[0] <= last]
    busy = sum(s[1] for s in stalls) or 1
    dispatches = [d for d in probe.dispatches if first <= d[0] <= last]
    collections = [g for g in probe.collections if first <= g[1] <= last]
    return {
        "variant": name,
        "code": "this checkout" if root == ROOT else "another checkout (--variant)",
        "switches": len(calls),
        "round_trip_ms": pct([c["round_trip_ms"] for c in per_call]),
        "switch_ms": pct([c["switch_ms"] for c in per_call]),
        "rpc_ms": pct([c["rpc_ms"] for c in per_call]),
        "audit_took_ms": pct(audit),
        "health_ms": pct(health),
        "waited_aggregates": pct([float(c["waited_aggregates"]) for c in per_call]),
        "old_pool_events": pct([float(c.get("old_pool_events", 0)) for c in per_call]),
        "old_pool_deepest": pct([float(c.get("old_pool_deepest", 0)) for c in per_call]),
        "loop_stalls": {
            "per_s": round(len(stalls) / seconds, 1),
            "ms": pct([s[1] / 1e6 for s in stalls]),
            "share_on_cpu": round(sum(min(s[2], s[1]) for s in stalls) / busy, 2),
            "share_runnable_waiting": round(sum(s[3] for s in stalls) / busy, 2),
        },
        "dispatch": {
            "records": pct([float(d[1]) for d in dispatches]),
            "ms": pct([d[2] / 1e6 for d in dispatches]),
        },
        "gc": {
            str(g): pct([n / 1e6 for gg, _, n in collections if gg == g])
            for g in sorted({g for g, _, _ in collections})
        },
        "slowest": sorted(per_call, key=lambda r: -r["round_trip_ms"])[:5],
        "calls": per_call,
        "health_calls_ms": [round(h, 3) for h in health],
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every call of every run of a variant together (the runs interleave the
    variants, so each sees the same spread of load)."""
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["variant"].rsplit("-", 1)[0] for r in runs):
        mine = [r for r in runs if r["variant"].rsplit("-", 1)[0] == label]
        calls = [c for r in mine for c in r["calls"]]
        out[label] = {
            "runs": len(mine),
            "calls": len(calls),
            "round_trip_ms": pct([c["round_trip_ms"] for c in calls]),
            "switch_ms": pct([c["switch_ms"] for c in calls]),
            "rpc_ms": pct([c["rpc_ms"] for c in calls]),
            "health_ms": pct([h for r in mine for h in r["health_calls_ms"]]),
            "p99_of_runs_ms": [r["round_trip_ms"]["p99"] for r in mine],
        }
    return out


def table(report: dict[str, Any]) -> str:
    lines = [
        (
            f"SetPoolMode under {report['rate']:,.0f} events/s, {report['handler_ms']:g} ms "
            f"handler, {report['partitions']} partitions, {report['aggregates']:,} aggregates; "
            f"load average {report['loadavg_start'][0]:.1f} -> {report['loadavg_end'][0]:.1f}"
        ),
        "",
        (
            "| run | calls | round trip p50 / p99 / max ms | switch p50 / p99 ms "
            "| rpc p99 ms | health p50 / p99 ms | old-pool events p99 | stalls/s "
            "| stall max ms | stalled runnable |"
        ),
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        rt, sw, h, st = r["round_trip_ms"], r["switch_ms"], r["health_ms"], r["loop_stalls"]
        lines.append(
            f"| {r['variant']} | {r['switches']} | {rt['p50']} / {rt['p99']} / {rt['max']} "
            f"| {sw['p50']} / {sw['p99']} | {r['rpc_ms']['p99']} | {h['p50']} / {h['p99']} "
            f"| {r['old_pool_events']['p99']:.0f} | {st['per_s']} | {st['ms']['max']} "
            f"| {st['share_runnable_waiting']:.0%} |"
        )
    lines += [
        "",
        "All calls of each variant together:",
        "",
        (
            "| variant | runs | calls | round trip p50 / p95 / p99 / max ms "
            "| switch p50 / p99 / max ms | rpc p99 ms | health p50 / p99 ms "
            "| round trip p99 per run |"
        ),
        "|---|---:|---:|---|---|---:|---|---|",
    ]
    for label, v in report.get("pooled", {}).items():
        rt, sw, h = v["round_trip_ms"], v["switch_ms"], v["health_ms"]
        lines.append(
            f"| {label} | {v['runs']} | {v['calls']} | {rt['p50']} / {rt['p95']} / {rt['p99']} / "
            f"{rt['max']} | {sw['p50']} / {sw['p99']} / {sw['max']} | {v['rpc_ms']['p99']} "
            f"| {h['p50']} / {h['p99']} | {', '.join(f'{x:g}' for x in v['p99_of_runs_ms'])} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="switch-latency-"))
    report: dict[str, Any] = {
        "benchmark": "switch_latency",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "rate": args.rate,
        "handler_ms": args.handler_ms,
        "partitions": args.partitions,
        "aggregates": args.aggregates,
        "lag_probe": not args.no_lag_probe,
        "inline_producer": args.inline_producer,
        "freeze_ms": args.freeze_ms,
        "read_call": args.read_call,
        "freeze_reads": args.freeze_reads,
        "runs": [],
    }
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    await asyncio.to_thread(broker.start)
    try:
        variants = [("current", ROOT)]
        for spec in reversed(args.variant):
            label, _, root = spec.rpartition("=")
            variants.insert(0, (label or "baseline", Path(root)))
        for i in range(args.runs):
            for label, root in variants:
                row = await one_run(args, broker, workdir, f"{label}-{i + 1}", root)
                brief = {k: row[k] for k in ("variant", "round_trip_ms", "switch_ms")}
                print(json.dumps(brief), file=sys.stderr)
                report["runs"].append(row)
        report["pooled"] = pooled(report["runs"])
        if not args.keep_calls:
            for run in report["runs"]:
                del run["calls"], run["health_calls_ms"]
    finally:
        await asyncio.to_thread(broker.stop)
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def produce_main(args: argparse.Namespace) -> None:
    """The producer child: ``--rate`` events/s until SIGTERM."""

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        producer = SteadyProducer(
            args.brokers, args.topic, partitions=args.partitions, aggregates=args.aggregates
        )
        await producer.run(args.rate, seconds=3600, stop=stop)

    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--switches", type=int, default=200)
    p.add_argument("--handler-ms", type=float, default=1.0)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--aggregates", type=int, default=10_000)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of stream before switching")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--baseline-root",
        "--variant",
        dest="variant",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="also run the service code of DIR (repeatable; NAME defaults to baseline)",
    )
    p.add_argument(
        "--freeze-ms",
        type=float,
        default=0.0,
        help="SIGSTOP the service this long before each call (a backlog builds meanwhile)",
    )
    p.add_argument(
        "--read-call",
        choices=("health", "status", "fleet-status"),
        default="health",
        help="the call timed half-way between two switches (the 'health' columns)",
    )
    p.add_argument(
        "--freeze-reads",
        action="store_true",
        help="with --freeze-ms, freeze before each read call too (it meets a backlog)",
    )
    p.add_argument("--no-lag-probe", action="store_true", help="no stall probe in the service")
    p.add_argument("--inline-producer", action="store_true", help="produce in this process")
    p.add_argument("--json", default="bench/results/switch_latency.json")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--keep-calls", action="store_true", help="every call in the JSON too")
    p.add_argument("--produce", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--brokers", help=argparse.SUPPRESS)
    p.add_argument("--topic", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.produce:
        produce_main(args)
        return
    args.variant = [
        f"{label}={os.path.abspath(root)}" if label else os.path.abspath(root)
        for label, _, root in (v.rpartition("=") for v in args.variant)
    ]
    report = asyncio.run(main_async(args))
    print(table(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
