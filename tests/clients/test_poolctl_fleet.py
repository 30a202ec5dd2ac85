"""``poolctl`` and fleet scope: the console script against two real replicas
of one consumer group (in this process) on the embedded broker."""

from __future__ import annotations

from typing import Any

from pool import PoolMode
from server._broker import EmbeddedBroker
from tests.clients.test_poolctl import poolctl
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.test_fleet import replica


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
        assert gens == {"2"}
        assert sorted(t["result"].get("replayed", False) for t in doc["targets"]) == [False, True]

        local = await poolctl("--target", tb, "mode", "keyed", "--replica")
        assert local.code == 0, local.err
        assert "fleet generation" not in local.out
        assert b.switch.mode is PoolMode.KEYED

        await assert_eventually(lambda: _diverged_in_table(ta, b.instance), timeout=10)
        fleet = await poolctl("--target", ta, "--json", "fleet")
        assert fleet.code == 0, fleet.err
        state: Any = fleet.json()
        assert state["desired"]["generation"] == "2"
        assert state["desired"]["mode"] == "POOL_MODE_ACTOR"
        assert {r["report"]["instance"] for r in state["replicas"]} == {a.instance, b.instance}

        stale = await poolctl("--target", ta, "rollout", "40", "--expect-generation", "1")
        assert stale.code == 5
        assert "generation 2" in stale.err
        bad = await poolctl(
            "--target", ta, "mode", "actor", "--replica", "--expect-generation", "1"
        )
        assert bad.code == 2


async def _diverged_in_table(target: str, instance: str) -> bool:
    run = await poolctl("--target", target, "fleet")
    assert run.code == 0, run.err
    return any(instance in line and "diverged" in line for line in run.out.splitlines())
