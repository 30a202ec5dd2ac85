"""The handler and probes ``bench/switch_latency.py`` runs inside ``pool-server``.

A top-level module (``--handler _switch_probe:handle``, with ``bench/`` on the
service's ``PYTHONPATH``), so that it also loads into the service code of
another checkout (``--baseline-root``). Configured by the environment:

- ``HANDLER_LATENCY_MS`` (default 1): the handler awaits that long.
- ``SWITCH_PROBE_FILE``: where the probes append their lines (one
  ``os.write`` each; ``time.monotonic_ns()`` is shared with the bench):

  - ``W,start,events,depth,aggregates,took`` per mode change: events in the
    old pool, its deepest executor and its aggregates when the rule changed;
  - ``D,start,records,ns`` per call of the consumer's ``_dispatch_batch``;
  - ``G,generation,start,ns`` per cyclic-GC collection of 0.5 ms or more;
  - ``S,start,late,cpu,runnable`` per event-loop stall (``SWITCH_PROBE_LAG``,
    default 1): a task sleeps 1 ms and reports each wake-up later than 2 ms,
    with the loop thread's CPU time over it and the time it spent runnable but
    not running (``/proc/thread-self/schedstat``: another process had the CPU);
  - ``T,now,beat,stack`` (``SWITCH_PROBE_STACKS=1``): while the loop is
    stalled, the loop thread's stack, sampled from a thread.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pool import Message

__all__ = ["handle"]

#: A wake-up later than this is a stall of the service's event loop.
STALL_NS = 2_000_000
SLEEP_S = 0.001

_latency = float(os.environ.get("HANDLER_LATENCY_MS", "1")) / 1000.0
_path = os.environ.get("SWITCH_PROBE_FILE")
_fd: int | None = None
_started = False
_beat = 0
_gc_started = 0
_tasks: set[asyncio.Task[None]] = set()


def _write(line: str) -> None:
    global _fd
    if _path is None:
        return
    if _fd is None:
        _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line.encode())


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    now = time.monotonic_ns()
    if phase == "start":
        _gc_started = now
    elif now - _gc_started >= 500_000:
        _write(f"G,{info['generation']},{_gc_started},{now - _gc_started}\n")


def _runnable_ns(fd: int) -> int:
    """Time this thread spent runnable but not running (``schedstat`` field 2)."""
    return int(os.pread(fd, 64, 0).split()[1])


async def _lag_probe() -> None:
    global _beat
    # Opened on the loop's thread: the descriptor stays bound to that thread.
    sched = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    while True:
        before = _beat = time.monotonic_ns()
        cpu = time.thread_time_ns()
        queued = _runnable_ns(sched)
        await asyncio.sleep(SLEEP_S)
        late = time.monotonic_ns() - before
        if late > STALL_NS:
            cpu = time.thread_time_ns() - cpu
            queued = _runnable_ns(sched) - queued
            _write(f"S,{before},{late},{cpu},{queued}\n")


def _stack_sampler(main: int) -> None:
    while True:
        time.sleep(0.001)
        now = time.monotonic_ns()
        if now - _beat < 2 * STALL_NS:
            continue
        frame = sys._current_frames().get(main)
        if frame is None:
            continue
        stack = traceback.extract_stack(frame)[-14:]
        folded = ";".join(f"{Path(f.filename).name}:{f.name}:{f.lineno}" for f in stack)
        _write(f"T,{now},{_beat},{folded}\n")


def _patch() -> None:
    """Wrap the switch's rule change and ``EventConsumer._dispatch_batch`` (W and D lines).

    The rule change is ``PoolSwitch._install`` where it exists (the one step
    both an awaited change and ``change_nowait``, the fleet's apply, go
    through; ``took`` is then the installation's), else ``PoolSwitch._change``
    (older code, through ``--baseline-root``; ``took`` includes its wait)."""
    from pool import PoolMode, _switch
    from server import _consumer

    def before(self: Any) -> tuple[int, int, int, int]:
        old = self.pools[self.mode]
        counts = self._keyed_counts if self.mode is PoolMode.KEYED else self._actor_counts
        return time.monotonic_ns(), old.in_flight, max(old.depths()), len(counts)

    def record(seen: tuple[int, int, int, int]) -> None:
        start, events, deepest, aggregates = seen
        _write(f"W,{start},{events},{deepest},{aggregates},{time.monotonic_ns() - start}\n")

    install = getattr(_switch.PoolSwitch, "_install", None)
    if install is not None:

        def recorded_install(self: Any, *args: Any, **kwargs: Any) -> Any:
            seen, generation = before(self), self.generation
            waiting = install(self, *args, **kwargs)
            if self.generation != generation:  # the rule changed
                record(seen)
            return waiting

        _switch.PoolSwitch._install = recorded_install  # type: ignore[method-assign]
    else:
        change = _switch.PoolSwitch._change

        async def recorded_change(self: Any, *args: Any, **kwargs: Any) -> Any:
            seen = before(self)
            result = await change(self, *args, **kwargs)
            record(seen)
            return result

        _switch.PoolSwitch._change = recorded_change  # type: ignore[method-assign]

    dispatch = _consumer.EventConsumer._dispatch_batch

    def recorded_dispatch(self: Any, part: Any, records: Any, *args: Any) -> Any:
        start = time.monotonic_ns()
        out = dispatch(self, part, records, *args)
        _write(f"D,{start},{len(records)},{time.monotonic_ns() - start}\n")
        return out

    _consumer.EventConsumer._dispatch_batch = recorded_dispatch  # type: ignore[method-assign]


def _start() -> None:
    global _started
    _started = True
    if _path is None:
        return
    gc.callbacks.append(_on_gc)
    if os.environ.get("SWITCH_PROBE_LAG", "1") == "1":
        task = asyncio.get_running_loop().create_task(_lag_probe())
        _tasks.add(task)
        if os.environ.get("SWITCH_PROBE_STACKS") == "1":
            main = threading.get_ident()
            threading.Thread(target=_stack_sampler, args=(main,), daemon=True).start()


if _path is not None:
    _patch()


async def handle(message: Message) -> None:
    """Await ``HANDLER_LATENCY_MS``; the first call starts the probes."""
    if not _started:
        _start()
    if _latency:
        await asyncio.sleep(_latency)
