"""``poolctl`` end to end: the installed console script as a subprocess against
real control-plane servers on loopback."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from clients.poolctl import build_parser
from pool import PoolMode
from tests.helpers import assert_eventually, find_free_port
from tests.server.grpc_harness import ADMIN, READER, Gate, control_server


def _poolctl() -> list[str]:
    script = Path(sys.executable).parent / "poolctl"
    if script.exists():
        return [str(script)]
    found = shutil.which("poolctl")
    assert found, "the poolctl console script is not installed (pip install -e .)"
    return [found]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


async def poolctl(*args: str, env: dict[str, str] | None = None) -> Run:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POOLCTL_")}
    environment.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        *_poolctl(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_status_prints_a_table_and_json() -> None:
    async with control_server() as h:
        await (await h.target.feed("agg-1"))
        table = await poolctl("--target", h.address, "status")
        assert table.code == 0, table.err
        assert "mode        keyed" in table.out
        assert "TOPIC   PARTITION  COMMITTED" in table.out
        assert "keyed  8     100" in table.out
        # Options after the command work too.
        as_json = await poolctl("status", "--json", "--target", h.address)
        assert as_json.code == 0, as_json.err
        doc = as_json.json()
        assert isinstance(doc, dict)
        assert doc["mode"] == "KEYED"
        assert [p["partition"] for p in doc["partitions"]] == [0, 1]
        assert doc["partitions"][0]["position"] == 1  # int64 is a number, not proto JSON's string


async def test_mode_and_rollout_change_the_service_and_exit_zero() -> None:
    async with control_server(admin_token=ADMIN) as h:
        env = {"POOLCTL_TOKEN": ADMIN, "POOLCTL_TARGET": h.address}
        switched = await poolctl("mode", "actor", "--json", "--request-id", "cli-1", env=env)
        assert switched.code == 0, switched.err
        assert switched.json()["result"]["mode"] == "ACTOR"  # type: ignore[index]
        assert h.switch.mode is PoolMode.ACTOR
        rollout = await poolctl("rollout", "30", env=env)
        assert rollout.code == 0, rollout.err
        assert "rollout 100% -> 30%" in rollout.out
        assert h.switch.rollout_percent == 30.0
        replay = await poolctl("mode", "keyed", "--request-id", "cli-1", env=env)
        assert replay.code == 0
        assert "replayed" in replay.out
        assert h.switch.mode is PoolMode.ACTOR


async def test_exit_codes_scripts_can_rely_on() -> None:
    gate = Gate(closed=True)
    async with control_server(gate, admin_token=ADMIN, read_token=READER) as h:
        await h.target.feed("agg-1")
        target = ("--target", h.address)
        unreachable = await poolctl("status", "--target", f"127.0.0.1:{find_free_port()}")
        assert unreachable.code == 3, unreachable.err
        assert "UNAVAILABLE" in unreachable.err
        assert (await poolctl("status", *target, "--token", "wrong")).code == 4
        denied = await poolctl("mode", "actor", *target, "--token", READER)
        assert denied.code == 4
        assert "PERMISSION_DENIED" in denied.err
        assert (await poolctl("rollout", "150", *target, "--token", ADMIN)).code == 2
        assert (await poolctl("frobnicate", *target)).code == 2
        unknown = await poolctl("pause", "--partition", "nope:0", *target, "--token", ADMIN)
        assert unknown.code == 6
        timed_out = await poolctl(
            "drain", "--timeout", "0.2", "--resume", "--json", *target, "--token", ADMIN
        )
        assert timed_out.code == 5, timed_out.err
        doc = timed_out.json()
        assert isinstance(doc, dict)
        assert doc["error"]["code"] == "DEADLINE_EXCEEDED"
        assert doc["result"]["remaining"] == 1
        gate.open()
        drained = await poolctl("drain", "--timeout", "5", *target, "--token", ADMIN)
        assert drained.code == 0, drained.err
        assert "drain complete" in drained.out


async def test_several_targets_are_each_applied_and_reported() -> None:
    async with control_server() as a, control_server() as b:
        both = await poolctl(
            "mode", "actor", "--json", "--target", a.address, "--target", b.address
        )
        assert both.code == 0, both.err
        doc = both.json()
        assert isinstance(doc, dict)
        assert [(t["target"], t["ok"]) for t in doc["targets"]] == [
            (a.address, True),
            (b.address, True),
        ]
        assert a.switch.mode is b.switch.mode is PoolMode.ACTOR
        down = f"127.0.0.1:{find_free_port()}"
        partial = await poolctl("pause", "--target", a.address, "--target", down)
        assert partial.code == 3
        assert f"== {a.address} ==" in partial.out
        assert "paused: events[0], events[1]" in partial.out
        assert all("operator" in st.reasons for st in a.target.parts.values())


async def test_dead_letters_print_json_lines() -> None:
    async with control_server() as h:
        for n in range(2):
            await (await h.target.feed(f"poison-{n}"))
        run = await poolctl("dead-letters", "--json", "--target", h.address)
        assert run.code == 0, run.err
        lines = [json.loads(line) for line in run.out.splitlines()]
        assert [line["dead_letter"]["aggregate_id"] for line in lines[:2]] == [
            "poison-0",
            "poison-1",
        ]
        assert lines[2]["backlog_end"]["count"] == 2
        table = await poolctl("dead-letters", "--aggregate", "poison-1", "--target", h.address)
        assert table.code == 0
        assert "aggregate=poison-1" in table.out
        assert "poison-0" not in table.out
        redrive = await poolctl("redrive", "--all", "--target", h.address)
        assert redrive.code == 0, redrive.err
        assert "republished 2" in redrive.out


async def test_version_is_the_installed_distributions() -> None:
    run = await poolctl("--version")
    assert run.code == 0, run.err
    assert run.out == f"poolctl {importlib.metadata.version('kafka-actor-pool')}\n"


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest: bool(c.help) for c in commands._choices_actions} == dict.fromkeys(
        commands.choices, True
    )
    missing = [
        f"{name}: {'/'.join(action.option_strings) or action.dest}"
        for name, command in [("poolctl", parser), *commands.choices.items()]
        for action in command._actions
        if action is not commands and not action.help
    ]
    assert missing == []
    assert len(commands.choices) == 10  # the walk saw every command


async def test_bad_arguments_are_usage_errors_of_their_command() -> None:
    down = ("--target", f"127.0.0.1:{find_free_port()}")  # never reached: argparse rejects first
    for args, expected in [
        (("rollout", "150"), "poolctl rollout: error: argument percent: must be within 0..100"),
        (("rollout", "abc"), "poolctl rollout: error: argument percent: not a number: 'abc'"),
        (("rollout", "-5"), "poolctl rollout: error:"),
        (("depth", "--top", "5000"), "poolctl depth: error: argument --top: must be within"),
        (("mode", "actor", "--wait", "-1"), "poolctl mode: error: argument --wait: must be >= 0"),
        (("redrive", "--id", "dl-1", "--all"), "poolctl redrive: error: argument --all: not"),
    ]:
        run = await poolctl(*args, *down)
        assert run.code == 2, (args, run.err)
        assert expected in run.err, (args, run.err)


def _rfc3339(text: object) -> dt.datetime:
    assert isinstance(text, str), text
    assert text.endswith("Z"), text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_json_output_has_numbers_seconds_times_and_readable_names() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        await h.target.feed("agg-1")
        target = ("--json", "--target", h.address)
        status = (await poolctl("status", *target)).json()
        assert isinstance(status, dict)
        assert status["mode"] == "KEYED"
        assert [p["mode"] for p in status["pools"]] == ["KEYED", "ACTOR"]
        assert status["generation"] == 0
        assert status["in_flight"] == 1
        assert isinstance(status["uptime"], float)
        assert 0 < status["uptime"] < 60
        assert abs(_rfc3339(status["since"]).timestamp() - h.switch.since) < 1
        first = status["partitions"][0]
        assert (first["position"], first["lag"], first["in_flight"]) == (1, 1, 1)
        assert first["committed"] is None  # unset optional: null
        # A name from the JSON is a valid argument ("ACTOR": any case).
        actor = status["pools"][1]["mode"]
        switched = (await poolctl("mode", actor, "--wait", "0", *target)).json()
        assert isinstance(switched, dict)
        result = switched["result"]
        assert (result["previous_mode"], result["mode"]) == ("KEYED", "ACTOR")
        assert result["generation"] == 1
        assert result["pending_aggregates"] == 1
        assert isinstance(result["took"], float)
        assert 0 <= result["took"] < 5
        depth = (await poolctl("depth", "--aggregate", "agg-1", *target)).json()
        assert isinstance(depth, dict)
        assert depth["aggregate"]["depth"] == 1
        assert {p["mode"]: p["total"] for p in depth["pools"]} == {"KEYED": 1, "ACTOR": 0}
        drain = asyncio.create_task(poolctl("drain", "--resume", *target))
        await assert_eventually(lambda: h.target.status().draining, message="drain running")
        gate.open()
        drained = (await drain).json()
        assert isinstance(drained, dict)
        assert (drained["finished"], drained["remaining"]) == (1, 0)
        assert drained["committed"] == [{"topic": "events", "partition": 0, "offset": 1}]
        assert isinstance(drained["took"], float)
        paused = (await poolctl("pause", "--partition", "events:1", *target)).json()
        assert paused == {"partitions": [{"topic": "events", "partition": 1}]}
        resumed = (await poolctl("resume", *target)).json()
        assert resumed == {"partitions": [{"topic": "events", "partition": 1}]}
        await (await h.target.feed("poison-1"))
        lines = [
            json.loads(line) for line in (await poolctl("dead-letters", *target)).out.splitlines()
        ]
        dead = lines[0]["dead_letter"]
        assert (dead["offset"], dead["attempts"], dead["key"]) == (1, 1, "cG9pc29uLTE=")
        assert abs(_rfc3339(dead["time"]).timestamp() - dead["timestamp_ms"] / 1000) < 5
        assert lines[1] == {"target": h.address, "backlog_end": {"count": 1}}


async def test_rollout_in_keyed_mode_says_it_takes_effect_in_actor_mode() -> None:
    async with control_server() as h:
        target = ("--target", h.address)
        keyed = await poolctl("rollout", "50", *target)
        assert keyed.code == 0, keyed.err
        assert "rollout 100% -> 50%" in keyed.out
        assert "in keyed mode; the rollout takes effect in actor mode" in keyed.out
        as_json = await poolctl("rollout", "40", "--json", *target)
        assert as_json.code == 0, as_json.err
        assert as_json.json()["result"]["rollout_percent"] == 40.0  # type: ignore[index]
        assert "takes effect in actor mode" in as_json.err
        assert (await poolctl("mode", "actor", *target)).code == 0
        actor = await poolctl("rollout", "50", *target)
        assert actor.code == 0, actor.err
        assert "rollout 40% -> 50%" in actor.out
        assert "takes effect" not in actor.out + actor.err
        assert h.switch.rollout_percent == 50.0


async def test_status_after_a_drain_shows_the_service_drained() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        target = ("--target", h.address)
        await h.target.feed("agg-1")
        drain = asyncio.create_task(poolctl("drain", "--timeout", "10", *target))
        await assert_eventually(lambda: h.target.status().draining, message="drain running")
        during = await poolctl("status", *target)
        assert "intake      draining: 2 of 2 partitions paused (drain)" in during.out
        gate.open()
        drained = await drain
        assert drained.code == 0, drained.err
        assert "drain complete: 1 event finished, 0 remaining" in drained.out
        after = await poolctl("status", *target)
        assert after.code == 0, after.err
        assert "intake      drained: 2 of 2 partitions paused (drain)" in after.out
        rows = [line.split() for line in after.out.splitlines() if line.startswith("events ")]
        assert [row[-1] for row in rows] == ["drain", "drain"]
        doc = (await poolctl("status", "--json", *target)).json()
        assert isinstance(doc, dict)
        assert (doc["intake"], doc["draining"]) == ("drained", False)
        assert [p["paused_reasons"] for p in doc["partitions"]] == [["drain"], ["drain"]]
        assert (await poolctl("resume", "--partition", "events:1", *target)).code == 0
        partly = await poolctl("status", *target)
        assert "intake      partly paused: 1 of 2 partitions paused (drain)" in partly.out
        assert (await poolctl("resume", *target)).code == 0
        running = await poolctl("status", *target)
        assert "intake      running\n" in running.out


async def test_counts_of_one_are_singular() -> None:
    async with control_server() as h:
        await (await h.target.feed("poison-1"))
        target = ("--target", h.address)
        listed = await poolctl("dead-letters", *target)
        assert listed.code == 0, listed.err
        assert "1 dead letter in memory" in listed.err
        # (A drain's "1 event finished": test_status_after_a_drain_shows_the_service_drained.)
        depth = await poolctl("depth", "--pool", "keyed", *target)
        assert "8 executors x capacity 100" in depth.out
        redrive = await poolctl("redrive", "--all", *target)
        assert redrive.code == 0, redrive.err
        assert "matched 1 dead letter, republished 1, failed 0" in redrive.out
    async with control_server(size=1) as h:
        depth = await poolctl("depth", "--target", h.address)
        assert "1 executor x capacity 100" in depth.out
        for n in range(2):
            await (await h.target.feed(f"poison-{n}"))
        assert (
            "2 dead letters in memory" in (await poolctl("dead-letters", "--target", h.address)).err
        )
