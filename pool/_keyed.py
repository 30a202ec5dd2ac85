"""The keyed worker pool: N workers, each a task with a bounded queue."""

from __future__ import annotations

from pool._executor import BasePool
from pool._protocol import PoolMode


class KeyedWorkerPool(BasePool):
    """Each aggregate is pinned to one worker (FNV-1a routing); a worker handles
    one event at a time, in queue order.

    Built as ``KeyedWorkerPool(handler, PoolOptions(size=..., capacity=...),
    metrics=...)``: ``options.capacity`` bounds each worker's queue.

    A failing event is retried under the retry policy, then dead-lettered.
    During each backoff it is parked: the worker serves other aggregates, and
    the failing aggregate's later events wait behind it.
    """

    _mode = PoolMode.KEYED
