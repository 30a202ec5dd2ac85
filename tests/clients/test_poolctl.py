"""``poolctl`` end to end: the installed console script as a subprocess against
real control-plane servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pool import PoolMode
from tests.helpers import find_free_port
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
        assert doc["mode"] == "POOL_MODE_KEYED"
        assert [p["partition"] for p in doc["partitions"]] == [0, 1]
        assert doc["partitions"][0]["position"] == "1"  # int64 is a string in proto JSON


async def test_mode_and_rollout_change_the_service_and_exit_zero() -> None:
    async with control_server(admin_token=ADMIN) as h:
        env = {"POOLCTL_TOKEN": ADMIN, "POOLCTL_TARGET": h.address}
        switched = await poolctl("mode", "actor", "--json", "--request-id", "cli-1", env=env)
        assert switched.code == 0, switched.err
        assert switched.json()["result"]["mode"] == "POOL_MODE_ACTOR"  # type: ignore[index]
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
        assert doc["result"]["remaining"] == "1"
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
        assert lines[2]["backlog_end"]["count"] == "2"
        table = await poolctl("dead-letters", "--aggregate", "poison-1", "--target", h.address)
        assert table.code == 0
        assert "aggregate=poison-1" in table.out
        assert "poison-0" not in table.out
        redrive = await poolctl("redrive", "--all", "--target", h.address)
        assert redrive.code == 0, redrive.err
        assert "republished 2" in redrive.out
