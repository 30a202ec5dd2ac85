"""Campaign 4b: the poison storm with the service in ACTOR mode (default
supervision: restart budget 3 per 60 s per actor)."""

from __future__ import annotations

from typing import Any

from bench.campaigns.poison_storm import run_mode

NAME = "poison_storm_actor"
DESCRIPTION = (
    "The poison storm (5 % permanent, 5 % transient failures) with the service in "
    "ACTOR mode and the default supervision (restart budget 3 per 60 s per actor); "
    "the events the budget escalates must be exactly those an independent model of "
    "it predicts."
)
ORDER = 5
TIMEOUT_S = 600


async def run(quick: bool) -> dict[str, Any]:
    return await run_mode(quick, "actor", NAME)
