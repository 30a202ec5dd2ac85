"""The asyncio task gauge the soak campaign watches."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from server._process_metrics import ASYNCIO_TASKS, AsyncioTasksCollector
from server._service import _process_registry


def _value(registry: CollectorRegistry) -> float:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(ASYNCIO_TASKS + " "):
            return float(line.split()[1])
    raise AssertionError(f"{ASYNCIO_TASKS} not exported")


async def test_counts_the_loops_unfinished_tasks_at_scrape_time() -> None:
    registry = CollectorRegistry()
    AsyncioTasksCollector(asyncio.get_running_loop(), registry=registry)
    before = _value(registry)
    gate = asyncio.Event()
    tasks = [asyncio.create_task(gate.wait()) for _ in range(25)]
    # Scraped from another thread, as the /metrics server does.
    assert await asyncio.to_thread(_value, registry) == before + 25
    gate.set()
    await asyncio.gather(*tasks)
    assert _value(registry) == before


async def test_the_service_registry_exports_it() -> None:
    assert _value(_process_registry()) >= 1  # this test's own task


def test_no_running_loop_no_gauge() -> None:
    assert ASYNCIO_TASKS not in generate_latest(_process_registry()).decode()
