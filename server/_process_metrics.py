"""Process metrics the standard ``process_*`` collector lacks: asyncio tasks.

``kafka_eventbus_process_asyncio_tasks`` counts the tasks of the service's
event loop that are not done, at scrape time. A number that keeps rising under
steady load is a task leak (a stream, drain or dead-letter publish that never
ends); the reliability soak (``bench/campaigns/soak.py``) watches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pool._metric_defs import metric_name

ASYNCIO_TASKS: Final = metric_name("process", "asyncio_tasks")


class AsyncioTasksCollector(Collector):
    """Counts the loop's unfinished tasks when scraped (from the /metrics thread:
    ``asyncio.all_tasks`` tolerates being called from another thread)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, registry: CollectorRegistry | None = None
    ) -> None:
        self._loop = loop
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            ASYNCIO_TASKS,
            "Asyncio tasks of the service's event loop not yet done (at scrape time).",
            value=len(asyncio.all_tasks(self._loop)),
        )
