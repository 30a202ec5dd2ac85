"""The switch client of the ``fleet_storm`` campaign, a process of its own.

An operator's client (``poolctl``, a script) is a separate process: the
campaign's calls run here, not in the campaign's process (whose loop and GIL
also produce the 10 000 events/s). Started as ``python -m
bench.campaigns._fleet_caller``; reads one JSON request per line on stdin::

    {"id": 3, "replica": "replica1", "target": "127.0.0.1:40123",
     "kind": "mode" | "rollout", "value": "actor" | 25.0, "wait_timeout": 10}

makes the fleet-scope call over one channel per replica (connected, with a
``GetStatus``, before its first switch; a replica whose address changed, i.e.
restarted, gets a new one) and writes one JSON line back::

    {"id": 3, "ms": 41.2, "fleet": "<FleetResult.SerializeToString, base64>"}

``ms`` is the call's time measured here, from its start until it returned. A
call that fails answers ``{"id": 3, "error": "..."}`` and the client goes on.
When stdin closes it writes ``{"loop_lag_ms": {"p50": .., "p99": .., "max": ..,
"n": ..}}`` (how late its event loop woke a 5 ms sleeper) and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from typing import Any

from clients import AsyncPoolControlClient

#: The per-call deadline of the channels (a switch waits ``wait_timeout`` at most).
CALL_TIMEOUT_S = 30.0


class _Channels:
    """One control channel per replica, keyed on its name; a new address (the
    replica restarted) closes the old channel and opens a new one."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, AsyncPoolControlClient]] = {}

    async def get(self, replica: str, target: str) -> AsyncPoolControlClient:
        kept = self._open.get(replica)
        if kept is not None and kept[0] == target:
            return kept[1]
        if kept is not None:
            del self._open[replica]
            with contextlib.suppress(Exception):
                await kept[1].close()
        client = AsyncPoolControlClient(target, timeout=CALL_TIMEOUT_S)
        try:
            await client.status()
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close()
            raise
        self._open[replica] = (target, client)
        return client

    async def switch(self, request: dict[str, Any]) -> dict[str, Any]:
        """One fleet-scope switch: the call's time (ms) and its FleetResult."""
        client = await self.get(str(request["replica"]), str(request["target"]))
        wait = float(request.get("wait_timeout", 10.0))
        started = time.monotonic()
        if request["kind"] == "mode":
            fleet = (await client.set_mode(str(request["value"]), wait_timeout=wait)).fleet
        elif request["kind"] == "rollout":
            fleet = (await client.set_rollout(float(request["value"]), wait_timeout=wait)).fleet
        else:
            raise ValueError(f"unknown kind {request['kind']!r}")
        ms = (time.monotonic() - started) * 1000
        return {"ms": round(ms, 3), "fleet": base64.b64encode(fleet.SerializeToString()).decode()}

    async def close(self) -> None:
        for _, client in self._open.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._open.clear()


async def _loop_lag(lags: list[float], stop: asyncio.Event, every: float = 0.005) -> None:
    """How late this process's event loop wakes a sleeper (ms), every ``every``."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(every)
        lags.append((time.monotonic() - before - every) * 1000)


def _write(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    channels = _Channels()
    lags: list[float] = []
    stop = asyncio.Event()
    lag_probe = asyncio.ensure_future(_loop_lag(lags, stop))
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            ident: Any = None
            try:
                request = json.loads(line)
                ident = request.get("id")
                answer = await channels.switch(request)
            except Exception as exc:
                _write({"id": ident, "error": repr(exc)})
                continue
            _write({"id": ident, **answer})
    finally:
        stop.set()
        await lag_probe
        await channels.close()
    ranked = sorted(lags)

    def pct(q: float) -> float:
        # Nearest rank, as the harness's ``percentile``.
        return round(ranked[round(q * (len(ranked) - 1))], 1) if ranked else 0.0

    _write({"loop_lag_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0), "n": len(lags)}})


if __name__ == "__main__":
    asyncio.run(main())
