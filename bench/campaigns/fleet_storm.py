"""Campaign: fleet switches through random replicas of a three-replica group,
with a kill -9 of a random replica every 20 switches."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from actorpool.control.v1 import control_pb2 as pb

from bench.campaigns._harness import (
    ROOT,
    ServiceProcess,
    SteadyProducer,
    account,
    campaign_env,
    committed_offsets,
    ends_of,
    num,
    percentile,
    read_records,
    read_topic,
    result,
    wait_for,
)

NAME = "fleet_storm"
DESCRIPTION = (
    "Three replicas of one group; fleet-scope SetPoolMode / SetRollout through a "
    "random replica under load, a kill -9 (and restart) of a random replica every "
    "20 switches; latency from the call until every live replica applied."
)
ORDER = 40
TIMEOUT_S = 600

ROLLOUTS = (0.0, 10.0, 25.0, 50.0, 75.0, 100.0)
#: Reports every 200 ms (a killed replica's report is stale 600 ms after the
#: last one). The first switch after a kill finds the dead replica by probing
#: its gRPC address (connection refused) and answers it DOWN without waiting.
HEARTBEAT_MS = 200
TARGET_P99_MS = 250.0


def _log_lines(svc: ServiceProcess, events: set[str]) -> list[dict[str, Any]]:
    """The JSON log lines named in ``events`` of every process ``svc`` started."""
    out = []
    for n in range(1, svc.starts + 1):
        path = Path(svc.workdir) / f"{svc.name}.{n}.err"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if item.get("event") in events:
                item["replica"] = svc.name
                item["replica_pid"] = svc.pids[n - 1] if n <= len(svc.pids) else 0
                out.append(item)
    return out


def _breakdown(replicas: list[ServiceProcess], switches: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the time of each switch went, from the replicas' ``fleet.waited``
    (the replica called) and ``fleet.reported`` (each replica that applied) log
    lines, joined by generation. Per switch, per replica: ``read`` = the write
    read back by the writer -> the record read by this replica's follower;
    ``hop`` = the follower -> the apply started on the service's loop;
    ``apply``; ``back`` = the snapshot and the hop back to the I/O loop;
    ``publish`` = the report's send until acknowledged; ``seen`` = acknowledged
    -> read by the replica called."""
    lines = [x for svc in replicas for x in _log_lines(svc, {"fleet.waited", "fleet.reported"})]
    waited = {x["generation"]: x for x in lines if x["event"] == "fleet.waited"}
    reported: dict[int, list[dict[str, Any]]] = {}
    for x in lines:
        if x["event"] == "fleet.reported":
            reported.setdefault(x["generation"], []).append(x)
    rows = []
    for sw in switches:
        w = waited.get(sw["generation"])
        if w is None:
            continue
        per = []
        server_started = w["written_at"] - (w["write_ms"] + (w.get("to_io_loop_ms") or 0)) / 1000
        for r in reported.get(sw["generation"], []):
            acked = r["seen_at"] + r["took_ms"] / 1000
            seen_by_caller = None
            for instance, took in (w.get("replicas") or {}).items():
                if took is not None and instance.endswith(f"-{r['replica_pid']}"):
                    seen_by_caller = server_started + took / 1000
            per.append(
                {
                    "replica": r["replica"],
                    "read": round((r["seen_at"] - w["written_at"]) * 1000, 1),
                    "hop": r["to_service_loop_ms"],
                    "apply": r["apply_ms"],
                    "back": round(r["snapshot_ms"] + r["to_io_loop_ms"], 1),
                    "publish": r["publish_ms"],
                    "seen": (
                        None
                        if seen_by_caller is None
                        else round((seen_by_caller - acked) * 1000, 1)
                    ),
                }
            )
        rows.append(
            {
                **sw,
                "to_io_loop": w.get("to_io_loop_ms"),
                "write": w["write_ms"],
                "wait": w["wait_ms"],
                "replicas": per,
            }
        )
    steps = ("read", "hop", "apply", "back", "publish", "seen")
    per_replica = [r for row in rows for r in row["replicas"]]
    summary: dict[str, Any] = {}
    for step in steps:
        values = [float(r[step]) for r in per_replica if r[step] is not None]
        summary[step] = {
            "p50": round(percentile(values, 0.5), 1),
            "p99": round(percentile(values, 0.99), 1),
            "max": round(max(values, default=0), 1),
        }
    for row in rows:
        row["outside"] = round(row["ms"] - row["server_ms"], 1)
    for step in ("outside", "to_io_loop", "write", "wait"):
        values = [float(row[step]) for row in rows if row[step] is not None]
        summary[step] = {
            "p50": round(percentile(values, 0.5), 1),
            "p99": round(percentile(values, 0.99), 1),
            "max": round(max(values, default=0), 1),
        }
    return {"ms": summary, "slow": [row for row in rows if row["ms"] > TARGET_P99_MS]}


async def _loop_lag(lags: list[float], stop: asyncio.Event, every: float = 0.005) -> None:
    """How late this process's event loop wakes a sleeper (ms), every ``every``."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(every)
        lags.append((time.monotonic() - before - every) * 1000)


class _Caller:
    """The switch client, a process of its own (``_fleet_caller``): as an
    operator's client, it shares neither this process's loop nor its GIL with
    the producer. One request line per switch on its stdin, one answer line
    back; the call's time is measured in the child."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._proc: asyncio.subprocess.Process | None = None
        self._next = 0
        self.loop_lag_ms: dict[str, float] = {}

    @property
    def _stderr(self) -> Path:
        return self._workdir / "fleet-caller.err"

    async def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        with self._stderr.open("wb") as err:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.campaigns._fleet_caller",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=env,
            )

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the switch client is not started")
        proc.stdin.write((json.dumps(request) + "\n").encode())
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            tail = self._stderr.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the switch client exited ({proc.returncode}): {tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def switch(
        self, svc: ServiceProcess, kind: str, value: str | float
    ) -> tuple[pb.FleetResult, float]:
        """One fleet-scope switch through ``svc``: its result and how long the
        call took (ms, in the client), from its start until it returned."""
        self._next += 1
        answer = await self._ask(
            {
                "id": self._next,
                "replica": svc.name,
                "target": svc.grpc_address,
                "kind": kind,
                "value": value,
                "wait_timeout": 10,
            }
        )
        if answer.get("id") != self._next:
            raise RuntimeError(f"answer {answer!r} to request {self._next}")
        if "error" in answer:
            raise RuntimeError(answer["error"])
        fleet = pb.FleetResult()
        fleet.ParseFromString(base64.b64decode(answer["fleet"]))
        return fleet, float(answer["ms"])

    async def close(self) -> None:
        """Close its stdin (it closes its channels, sends its loop lag and
        exits); killed if it has not exited in 10 s."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            if proc.stdout is not None:
                async with asyncio.timeout(10):
                    while line := await proc.stdout.readline():
                        last = json.loads(line)
                        if "loop_lag_ms" in last:
                            self.loop_lag_ms = last["loop_lag_ms"]
                    await proc.wait()
        except (TimeoutError, ValueError, OSError):
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _all_assigned(replicas: list[ServiceProcess]) -> bool:
    return all([await svc.assigned() for svc in replicas])


async def run(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    switches = 20 if quick else 100
    kill_every = 10 if quick else 20
    rate = 2_000 if quick else 10_000
    partitions, aggregates = 6, 900
    gap = 0.1
    rng = random.Random(11)
    async with campaign_env(NAME) as env:
        topic = await env.topic(partitions)
        record = env.workdir / "fleet.records"
        replicas: list[ServiceProcess] = []
        for i in range(3):
            svc = env.service(
                topic,
                name=f"replica{i}",
                mode="keyed",
                latency_ms=1.0,
                # info: the fleet.waited / fleet.reported lines of the breakdown.
                settings={"control.heartbeatMs": HEARTBEAT_MS, "log.level": "info"},
            )
            svc.record = record
            replicas.append(svc)
        await asyncio.gather(*(svc.start(wait_assigned=False) for svc in replicas))
        producer = SteadyProducer(
            env.bootstrap, topic, partitions=partitions, aggregates=aggregates
        )
        stop = asyncio.Event()
        produce = asyncio.ensure_future(producer.run(rate, seconds=600, stop=stop))
        # The calls run in a process of their own (an operator's client is one):
        # this process's loop and GIL also produce the 10 000 events/s.
        caller = _Caller(env.workdir)
        await caller.start()
        lags: list[float] = []
        lag_probe = asyncio.ensure_future(_loop_lag(lags, stop))
        took_ms: list[float] = []
        server_ms: list[float] = []
        answered_down = 0
        other_ms: list[float] = []
        first_after_kill_ms: list[float] = []
        slow: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        incomplete = 0
        applied_by: list[int] = []
        kills: list[str] = []
        killed_at = -1.0
        victim: ServiceProcess | None = None
        restarting: asyncio.Future[None] | None = None
        mode = "keyed"
        kinds = {"mode": 0, "rollout": 0}
        errors: list[str] = []
        try:
            # The group formed (every replica owns partitions: its join's rebalances
            # are over) and the stream has flowed for a second.
            await wait_for(
                lambda: _all_assigned(replicas), 60, "every replica owns partitions", 0.2
            )
            await asyncio.sleep(1.0)
            for n in range(switches):
                if n and n % kill_every == 0:
                    if restarting is not None:
                        await restarting
                    victim = rng.choice(replicas)
                    victim.kill(signal.SIGKILL)
                    kills.append(victim.name)
                    killed_at = time.monotonic()
                    # Restarted in the background: the switches go on without it, and
                    # the first ones wait for its report until it is stale.
                    restarting = asyncio.ensure_future(victim.start(wait_assigned=False))
                await asyncio.sleep(rng.uniform(0, 2 * gap))
                up = [
                    s
                    for s in replicas
                    if s is not victim or restarting is None or restarting.done()
                ]
                through = rng.choice(up)
                call_started = time.monotonic()
                value: str | float
                if rng.random() < 0.5:
                    mode = "actor" if mode == "keyed" else "keyed"
                    kind, value = "mode", mode
                else:
                    kind, value = "rollout", rng.choice(ROLLOUTS)
                try:
                    fleet, ms = await caller.switch(through, kind, value)
                except Exception as exc:
                    errors.append(f"switch {n} through {through.name}: {exc!r}")
                    continue
                kinds[kind] += 1
                took_ms.append(ms)
                server_ms.append(fleet.took.ToNanoseconds() / 1e6)
                answered_down += sum(r.outcome == pb.REPLICA_OUTCOME_DOWN for r in fleet.replicas)
                since_kill = call_started - killed_at if killed_at >= 0 else -1.0
                # The first switch after a kill meets the dead replica's report (live
                # for three heartbeats): it probes the replica and answers it DOWN.
                (first_after_kill_ms if n and n % kill_every == 0 else other_ms).append(ms)
                calls.append(
                    {
                        "switch": n,
                        "generation": fleet.generation,
                        "ms": round(ms, 1),
                        "server_ms": round(server_ms[-1], 1),
                        "s_since_kill": round(since_kill, 2),
                        "through": through.name,
                    }
                )
                if ms > TARGET_P99_MS:
                    slow.append(
                        {
                            "switch": n,
                            "ms": round(ms, 1),
                            "s_since_kill": round(since_kill, 2),
                            "through": through.name,
                        }
                    )
                if not fleet.complete:
                    incomplete += 1
                applied_by.append(
                    sum(r.outcome == pb.REPLICA_OUTCOME_APPLIED for r in fleet.replicas)
                )
            if restarting is not None:
                await restarting
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            stats = await produce
            await caller.close()
            await lag_probe
        truth = await read_topic(env.bootstrap, topic)
        keys = {(r.partition, r.offset) for r in truth}
        caught_up = await env.wait_handled(record, keys, timeout=120)
        codes = [await svc.stop() for svc in replicas]
        breakdown = _breakdown(replicas, calls)
        records = read_records(record)
        acc = account(truth, records)
        ends = ends_of(truth, partitions)
        committed = await committed_offsets(env.bootstrap, replicas[0].group, topic, partitions)
    p50, p99 = percentile(took_ms, 0.5), percentile(took_ms, 0.99)
    failures = []
    if acc.lost or acc.reordered or acc.overlapped or acc.unexpected:
        failures.append(f"accounting: {acc.as_dict()}")
    if committed != ends:
        failures.append(f"committed {committed} != ends {ends}")
    if any(codes):
        failures.append(f"exit codes {codes}")
    if errors:
        failures.append(f"{len(errors)} switches failed: {errors[:3]}")
    if incomplete:
        failures.append(f"{incomplete} switches not applied by every live replica in time")
    if p99 > TARGET_P99_MS:
        failures.append(f"fleet switch p99 {p99:.1f} ms above the {TARGET_P99_MS:g} ms target")
    return result(
        NAME,
        tried=(
            f"{switches} fleet switches through random replicas of 3, "
            f"kill -9 of a random replica every {kill_every}"
        ),
        amount=(
            f"{switches} switches ({kinds['mode']} mode, {kinds['rollout']} rollout), "
            f"{len(kills)} kill -9, {num(len(truth))} events at {num(stats.rate)}/s "
            f"(target {num(rate)}/s); switch p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        ),
        accounting=acc,
        passed=not failures,
        seconds=time.monotonic() - started,
        failures=failures,
        details={
            "target_rate_per_s": rate,
            "produced": stats.as_dict(),
            "catch_up_after_production_s": round(caught_up, 2),
            "fleet_switch_ms": {
                "p50": round(p50, 1),
                "p99": round(p99, 1),
                "max": round(max(took_ms, default=0), 1),
                "target_p99": TARGET_P99_MS,
                "first_after_a_kill": [round(ms, 1) for ms in first_after_kill_ms],
                "others_p50": round(percentile(other_ms, 0.5), 1),
                "others_p99": round(percentile(other_ms, 0.99), 1),
                "server_p50": round(percentile(server_ms, 0.5), 1),
                "server_p99": round(percentile(server_ms, 0.99), 1),
                "slow": slow[:20],
            },
            # Each step's p50 / p99 / max (ms), then the slow switches step by step.
            "breakdown_ms": {
                step: f"{v['p50']:g} / {v['p99']:g} / {v['max']:g}"
                for step, v in breakdown["ms"].items()
            },
            "breakdown_slow": breakdown["slow"][:20],
            "campaign_loop_lag_ms": {
                "p50": round(percentile(lags, 0.5), 1),
                "p99": round(percentile(lags, 0.99), 1),
                "max": round(max(lags, default=0), 1),
            },
            "client_loop_lag_ms": caller.loop_lag_ms,
            "switches": kinds,
            "incomplete": incomplete,
            "answered_down": answered_down,
            "replicas_applied_min": min(applied_by, default=0),
            "kills": kills,
            "heartbeat_ms": HEARTBEAT_MS,
            "partitions": partitions,
            "aggregates": aggregates,
            "handler_latency_ms": 1.0,
            "exit_codes": codes,
            "notes": [
                (
                    "Latency is the client's: from the fleet-scope call until it "
                    "returned with every live replica's report of the new generation "
                    "applied (the control topic read back through the replica called). "
                    "The calls run in a client process of their own, as an operator's "
                    "would (bench/campaigns/_fleet_caller.py: one request line on its "
                    "stdin per switch, the call timed there), over one channel per "
                    "replica process, connected before its first switch; this "
                    "process's loop produces the 10 000 events/s "
                    "(campaign_loop_lag_ms / client_loop_lag_ms: how late the "
                    "campaign's / the client's loop wakes a 5 ms sleeper). "
                    "server_p50/p99 are the replica's own figure "
                    "(FleetResult.took: from the call's arrival in its handler until "
                    "every live replica applied). A killed replica's report stays live "
                    "for three heartbeats (600 ms); the first switch after each kill "
                    "(first_after_a_kill) probes it, finds its gRPC address refusing "
                    "connections and answers it DOWN (answered_down) instead of waiting. "
                    "The victim restarts in the background while the switches go on "
                    "(its group join, the rebalance, the backlog it takes over). The "
                    "first switch comes once every replica owns partitions (the group's "
                    "start-up rebalances are over) and the stream has flowed for 1 s."
                ),
                (
                    "breakdown_ms (p50 / p99 / max, from the replicas' fleet.waited and "
                    "fleet.reported log lines): outside = the client's time minus the "
                    "server's (the call's way to the handler and back, on the called replica's "
                    "gRPC loop, a thread of its own, and the client process); to_io_loop = "
                    "the handler "
                    "to the fleet's loop; write = the proposal written and read back; "
                    "wait = until every live replica reported it applied. Per replica: "
                    "read = the writer read its record back -> this replica's follower "
                    "read it; hop = the follower -> the apply began on the service's "
                    "loop; apply; back = the report's snapshot and the way back to the "
                    "fleet's loop; publish = the report sent -> acknowledged; seen = "
                    "acknowledged -> read by the replica called. breakdown_slow: the "
                    "switches above the target, each with its replicas' steps."
                ),
                (
                    "The p99 depends on the machine's load more than on anything else: "
                    "on the shared 2-CPU machine it met the target in every run with "
                    "little other load, and in 3 of 11 runs with other work on both CPUs "
                    "(docs/fleet.md, Figures: each step's share of the slow switches)."
                ),
                (
                    "Order and loss are judged across the three processes from the "
                    "handler's records (one shared O_APPEND file); a kill -9 redelivers "
                    "the victim's uncommitted events, which count as duplicates, not loss."
                ),
            ],
        },
    )
