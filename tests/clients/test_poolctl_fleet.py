"""``poolctl`` and fleet scope: the console script against two real replicas
of one consumer group (in this process) on the embedded broker."""

from __future__ import annotations

from typing import Any

from pool import PoolMode
from server._broker import EmbeddedBroker
from tests.clients.test_poolctl import poolctl
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually, find_free_port
from tests.server.test_fleet import mode_of, replica


async def test_poolctl_acts_on_the_fleet_by_default_and_on_one_replica_with_replica(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    group = f"{topic}-g"
    async with (
        replica(broker, topic, group) as (a, _, _),
        replica(broker, topic, group) as (b, _, _),
    ):
        assert a.endpoints is not None
        assert b.endpoints is not None
        ta, tb = a.endpoints.grpc_address or "", b.endpoints.grpc_address or ""
        await assert_eventually(lambda: a.fleet is not None and len(a.fleet.reports) == 2)

        switched = await poolctl("--target", ta, "mode", "actor")
        assert switched.code == 0, switched.err
        assert "fleet generation 0 -> 1   every live replica applied" in switched.out
        assert a.instance in switched.out
        assert b.instance in switched.out
        assert b.switch.mode is PoolMode.ACTOR

        # Two targets, one fleet write (one request ID): the second is a replay.
        both = await poolctl("--target", ta, "--target", tb, "--json", "rollout", "30")
        assert both.code == 0, both.err
        doc: Any = both.json()
        gens = {t["result"]["fleet"]["generation"] for t in doc["targets"]}
        assert gens == {2}
        assert sorted(t["result"]["replayed"] for t in doc["targets"]) == [False, True]

        local = await poolctl("--target", tb, "mode", "keyed", "--replica")
        assert local.code == 0, local.err
        assert "fleet generation" not in local.out
        assert mode_of(b) is PoolMode.KEYED

        await assert_eventually(lambda: _diverged_in_table(ta, b.instance), timeout=10)
        fleet = await poolctl("--target", ta, "--json", "fleet")
        assert fleet.code == 0, fleet.err
        state: Any = fleet.json()
        assert state["desired"]["generation"] == 2
        assert state["desired"]["mode"] == "ACTOR"
        assert {r["report"]["instance"] for r in state["replicas"]} == {a.instance, b.instance}
        # The same JSON shape as every command: numbers, seconds, RFC 3339, short enums.
        assert state["desired"]["time"].endswith("Z")
        assert all(isinstance(r["age"], float) for r in state["replicas"])
        assert {r["report"]["mode"] for r in state["replicas"]} == {"ACTOR", "KEYED"}

        paused = await poolctl("--target", ta, "--json", "pause", "--partition", f"{topic}:1")
        assert paused.code == 0, paused.err
        pause_doc: Any = paused.json()
        assert pause_doc["partitions"] == [{"topic": topic, "partition": 1}]
        assert (pause_doc["all_paused"], pause_doc["replayed"]) == (False, False)
        assert pause_doc["fleet"]["generation"] == 3
        assert {r["outcome"] for r in pause_doc["fleet"]["replicas"]} == {"APPLIED"}
        assert all(isinstance(r["took"], float) for r in pause_doc["fleet"]["replicas"])
        resumed = await poolctl("--target", ta, "resume")
        assert resumed.code == 0, resumed.err
        assert f"resumed: {topic}[1]" in resumed.out
        assert "fleet generation 3 -> 4" in resumed.out

        stale = await poolctl("--target", ta, "rollout", "40", "--expect-generation", "1")
        assert stale.code == 5
        assert "generation 4" in stale.err
        bad = await poolctl(
            "--target", ta, "mode", "actor", "--replica", "--expect-generation", "1"
        )
        assert bad.code == 2


async def _diverged_in_table(target: str, instance: str) -> bool:
    run = await poolctl("--target", target, "fleet")
    assert run.code == 0, run.err
    return any(instance in line and "diverged" in line for line in run.out.splitlines())


async def test_bad_fleet_arguments_are_usage_errors_of_their_command() -> None:
    down = ("--target", f"127.0.0.1:{find_free_port()}")  # never reached: argparse rejects first
    for args, expected in [
        (
            ("mode", "actor", "--replica", "--expect-generation", "1"),
            "poolctl mode: error: argument --expect-generation: not allowed with argument",
        ),
        (("rollout", "10", "--expect-generation", "-1"), "argument --expect-generation: must be"),
        (
            ("pause", "--expect-generation", "x"),
            "poolctl pause: error: argument --expect-generation",
        ),
        (("resume", "--wait", "-1"), "poolctl resume: error: argument --wait: must be >= 0"),
    ]:
        run = await poolctl(*args, *down)
        assert run.code == 2, (args, run.err)
        assert expected in run.err, (args, run.err)
