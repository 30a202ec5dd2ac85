"""``actorpool.control.v1.PoolControl``: one method per RPC over a :class:`ControlTarget`.

Each method reads and validates its request with the ``*_from_pb`` helpers
of :mod:`server._grpc._convert` (raising
:class:`~server._grpc._status.InvalidArgumentError`), calls the target, and
builds the answer with the ``*_to_pb`` helpers. Methods raise, never abort:
the interceptor maps exceptions to status codes.

Fleet scope: :func:`~server._grpc._fleet.fleet_for` decides whether a
mutating call acts on the fleet; its branch, at the top of
``SetPoolMode``/``SetRollout``/``Pause``/``Resume``, goes through
:mod:`server._grpc._fleet` (the control topic) instead of the target.

Loops: the methods run on the server's event loop (a thread of its own, see
:func:`~server._grpc._server.start_grpc_server`). What reads or changes the
target's state (the switch, the consumer, pauses, drains, dead letters, a
status snapshot) runs on the service's loop through :meth:`_on_service`
(:func:`~server._loops.run_on`; a stream through
:func:`~server._loops.iterate_on`); validation, the replay cache, health and
the fleet-scope calls (which hop to the fleet's loop themselves) stay on the
server's loop.

Adding an RPC: declare it in ``proto/`` (``make protos``), add its method
here and its conversions to ``_convert.py``, and the target method it needs
to :class:`~server._control.ControlTarget` (its body through
``self._on_service(...)`` if it touches the target). A call that changes the service
goes in :data:`MUTATING_METHODS` (admin token, audit) and runs through
``self._replay.run(...)`` so a repeated ``request_id`` gets the first answer.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeAlias, TypeVar

import grpc
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc

from pool import PoolMode
from server._control import (
    ControlTarget,
    DeadLetterFilter,
    DrainIncompleteError,
    DrainProgress,
    ModeSwitch,
    SwitchOutcome,
)
from server._control_metrics import ControlMetrics
from server._dlq_subscription import DeadLetterSubscription
from server._fleet import FleetControl
from server._grpc import _fleet as fleet_rpc
from server._grpc._convert import (
    dead_letter_to_pb,
    drain_progress_to_pb,
    drain_result_to_pb,
    drain_timeout_from_pb,
    executor_depth_to_pb,
    filter_from_pb,
    mode_from_pb,
    mode_to_pb,
    partitions_from_pb,
    partitions_to_pb,
    redrive_selection_from_pb,
    status_to_pb,
    switch_result_to_pb,
    wait_timeout_from_pb,
)
from server._grpc._health import HealthState
from server._grpc._replay import ReplayCache, replayed, retrieve_exception
from server._grpc._status import InvalidArgumentError
from server._loops import iterate_on, run_on

__all__ = [
    "DEFAULT_STREAM_BUFFER",
    "MUTATING_METHODS",
    "SERVICE_NAME",
    "PoolControlServicer",
]

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["PoolControl"].full_name

#: Calls that change state: admin token required, audited, idempotent by request_id.
MUTATING_METHODS: Final = frozenset(
    {"SetPoolMode", "SetRollout", "Drain", "Pause", "Resume", "RedriveDeadLetters"}
)

DEFAULT_TOP: Final = 10
MAX_TOP: Final = 1000
DEFAULT_STREAM_BUFFER: Final = 1000
MAX_STREAM_BUFFER: Final = 100_000
MAX_AGGREGATE_ID: Final = 256

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_T = TypeVar("_T")
_SwitchResponse = TypeVar("_SwitchResponse", pb.SetPoolModeResponse, pb.SetRolloutResponse)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _active_modes(mode: PoolMode, rollout: float) -> set[PoolMode]:
    if mode is PoolMode.KEYED or rollout <= 0:
        return {PoolMode.KEYED}
    if rollout >= 100:
        return {PoolMode.ACTOR}
    return {PoolMode.KEYED, PoolMode.ACTOR}


class PoolControlServicer(pb_grpc.PoolControlServicer):
    """``PoolControl`` over a :class:`ControlTarget`. Raises, never aborts:
    the interceptor turns exceptions into status codes."""

    def __init__(
        self,
        target: ControlTarget,
        *,
        health: HealthState,
        metrics: ControlMetrics,
        replay_capacity: int = 1024,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        service_loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._target = target
        self._service_loop = service_loop
        self._health = health
        self._metrics = metrics
        self._replay = ReplayCache(replay_capacity)
        self._switch_lock = asyncio.Lock()
        self._stream_buffer = stream_buffer
        self._closing = False
        self._streams: set[DeadLetterSubscription] = set()
        self._drains: dict[tuple[str, str], asyncio.Future[pb.DrainResult]] = {}

    def shutdown(self) -> None:
        """End following streams (dead letters) so the server can stop promptly."""
        self._closing = True
        loop = self._service_loop
        if loop is None or loop is _running_loop():
            self._close_streams()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._close_streams)

    def _close_streams(self) -> None:
        for sub in list(self._streams):
            sub.close()

    async def _on_service(self, body: Callable[[], Awaitable[_T]]) -> _T:
        """``await body()`` on the service's loop, where the target's state lives
        (the switch, the consumer, the dead-letter store); the caller is on the
        server's loop."""

        async def run() -> _T:
            return await body()

        return await run_on(self._service_loop or asyncio.get_running_loop(), run())

    # ---------------------------------------------------------- reads
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: _Context
    ) -> pb.GetStatusResponse:
        async def status() -> pb.GetStatusResponse:
            response = status_to_pb(self._target.status())
            fleet_rpc.add_replica_fleet_status(response, self._target)
            return response

        return await self._on_service(status)

    async def GetFleetStatus(
        self, request: pb.GetFleetStatusRequest, context: _Context
    ) -> pb.GetFleetStatusResponse:
        # On the server's loop: the fleet's fold and reports are replaced, never
        # mutated, by the fleet's own loop.
        return fleet_rpc.fleet_status(self._target)

    async def GetInboxDepth(
        self, request: pb.GetInboxDepthRequest, context: _Context
    ) -> pb.GetInboxDepthResponse:
        if not 0 <= request.top <= MAX_TOP:
            raise InvalidArgumentError(f"top must be within 0..{MAX_TOP}, got {request.top}")
        if len(request.aggregate_id) > MAX_AGGREGATE_ID:
            raise InvalidArgumentError(f"aggregate_id longer than {MAX_AGGREGATE_ID} characters")
        if request.pool != pb.POOL_MODE_UNSPECIFIED:
            mode_from_pb(request.pool, "pool")
        return await self._on_service(lambda: self._inbox_depth(request))

    async def _inbox_depth(self, request: pb.GetInboxDepthRequest) -> pb.GetInboxDepthResponse:
        top = request.top or DEFAULT_TOP
        switch = self._target.switch
        active = _active_modes(switch.mode, switch.rollout_percent)
        if request.pool != pb.POOL_MODE_UNSPECIFIED:
            modes = [mode_from_pb(request.pool, "pool")]
        else:
            modes = [
                m for m in (PoolMode.KEYED, PoolMode.ACTOR)
                if m in active or switch.pools[m].in_flight > 0
            ]  # fmt: skip
        response = pb.GetInboxDepthResponse()
        for mode in modes:
            pool = switch.pools[mode]
            depths = pool.depths()
            capacity = pool.capacity
            entry = response.pools.add(
                mode=mode_to_pb(mode),
                active=mode in active,
                total=sum(depths),
                size=pool.size,
                capacity=capacity,
            )
            if not request.omit_executors:
                entry.executors.extend(
                    executor_depth_to_pb(i, d, capacity) for i, d in enumerate(depths)
                )
            deepest = heapq.nsmallest(top, range(len(depths)), key=lambda i: (-depths[i], i))
            entry.top.extend(executor_depth_to_pb(i, depths[i], capacity) for i in deepest)
            response.total += entry.total
        if request.aggregate_id:
            aggregate = request.aggregate_id
            mode, index = switch.where(aggregate)
            pool = switch.pools[mode]
            response.aggregate.CopyFrom(
                pb.AggregateDepth(
                    aggregate_id=aggregate,
                    mode=mode_to_pb(mode),
                    executor=index,
                    depth=pool.depth(index),
                    capacity=pool.capacity,
                )
            )
        return response

    # ------------------------------------------------------ mode switch
    async def SetPoolMode(
        self, request: pb.SetPoolModeRequest, context: _Context
    ) -> pb.SetPoolModeResponse:
        mode = mode_from_pb(request.mode, "mode")
        wait = wait_timeout_from_pb(request)
        if (fleet := fleet_rpc.fleet_for(self._target, request)) is not None:
            return await self._switch_fleet(
                fleet,
                "SetPoolMode",
                fleet_rpc.Change("mode", mode=mode),
                request,
                wait,
                pb.SetPoolModeResponse,
            )

        async def change() -> pb.SetPoolModeResponse:
            outcome = await self._on_service(
                lambda: self._switch(lambda s: s.set_mode(mode, wait_timeout=wait))
            )
            return pb.SetPoolModeResponse(result=switch_result_to_pb(outcome))

        return await self._replay.run("SetPoolMode", request.request_id, change)

    async def _switch(
        self, change: Callable[[ModeSwitch], Awaitable[SwitchOutcome]]
    ) -> SwitchOutcome:
        """A replica-scope switch change, one at a time (on the service's loop)."""
        async with self._switch_lock:
            return await change(self._target.switch)

    async def _switch_fleet(
        self,
        fleet: FleetControl,
        method: str,
        change: fleet_rpc.Change,
        request: pb.SetPoolModeRequest | pb.SetRolloutRequest,
        wait: float,
        response: Callable[..., _SwitchResponse],
    ) -> _SwitchResponse:
        """A fleet-scoped SetPoolMode/SetRollout: write the change, answer with
        this replica's switch as it applied the generation and every replica's result."""

        async def change_fleet() -> _SwitchResponse:
            done, result = await fleet_rpc.write(fleet, method, change, request, wait)
            local = fleet_rpc.local_outcome(fleet, done.generation, self._target.switch)
            return response(result=switch_result_to_pb(local), fleet=result, replayed=done.replayed)

        return await self._replay.run(method, request.request_id, change_fleet)

    async def SetRollout(
        self, request: pb.SetRolloutRequest, context: _Context
    ) -> pb.SetRolloutResponse:
        percent = request.percent
        if not math.isfinite(percent) or not 0.0 <= percent <= 100.0:
            raise InvalidArgumentError(f"rollout percent must be within 0..100, got {percent!r}")
        wait = wait_timeout_from_pb(request)
        if (fleet := fleet_rpc.fleet_for(self._target, request)) is not None:
            return await self._switch_fleet(
                fleet,
                "SetRollout",
                fleet_rpc.Change("rollout", rollout=percent),
                request,
                wait,
                pb.SetRolloutResponse,
            )

        async def change() -> pb.SetRolloutResponse:
            outcome = await self._on_service(
                lambda: self._switch(lambda s: s.set_rollout(percent, wait_timeout=wait))
            )
            return pb.SetRolloutResponse(result=switch_result_to_pb(outcome))

        return await self._replay.run("SetRollout", request.request_id, change)

    # ---------------------------------------------------- pause/resume
    async def Pause(self, request: pb.PauseRequest, context: _Context) -> pb.PauseResponse:
        partitions = partitions_from_pb(request.partitions)
        if (fleet := fleet_rpc.fleet_for(self._target, request)) is not None:
            fleet_rpc.check_partitions(fleet, partitions)
            wait = wait_timeout_from_pb(request)
            change = fleet_rpc.Change(
                "pause", partitions=None if partitions is None else tuple(partitions)
            )

            async def pause_fleet() -> pb.PauseResponse:
                done, result = await fleet_rpc.write(fleet, "Pause", change, request, wait)
                paused, every = fleet_rpc.paused_to_pb(done)
                return pb.PauseResponse(
                    partitions=paused, all_paused=every, fleet=result, replayed=done.replayed
                )

            return await self._replay.run("Pause", request.request_id, pause_fleet)

        async def pause() -> pb.PauseResponse:
            paused = await self._on_service(lambda: self._target.pause(partitions))
            return pb.PauseResponse(partitions=partitions_to_pb(paused))

        return await self._replay.run("Pause", request.request_id, pause)

    async def Resume(self, request: pb.ResumeRequest, context: _Context) -> pb.ResumeResponse:
        partitions = partitions_from_pb(request.partitions)
        if (fleet := fleet_rpc.fleet_for(self._target, request)) is not None:
            fleet_rpc.check_partitions(fleet, partitions)
            wait = wait_timeout_from_pb(request)
            change = fleet_rpc.Change(
                "resume", partitions=None if partitions is None else tuple(partitions)
            )

            async def resume_fleet() -> pb.ResumeResponse:
                before = fleet_rpc.paused_before(fleet)
                done, result = await fleet_rpc.write(fleet, "Resume", change, request, wait)
                resumed = fleet_rpc.resumed_to_pb(done, before)
                return pb.ResumeResponse(
                    partitions=resumed,
                    all_paused=done.state.paused.all,
                    fleet=result,
                    replayed=done.replayed,
                )

            return await self._replay.run("Resume", request.request_id, resume_fleet)

        async def resume() -> pb.ResumeResponse:
            resumed = await self._on_service(lambda: self._target.resume(partitions))
            return pb.ResumeResponse(partitions=partitions_to_pb(resumed))

        return await self._replay.run("Resume", request.request_id, resume)

    # ----------------------------------------------------------- drain
    async def Drain(
        self, request: pb.DrainRequest, context: _Context
    ) -> AsyncIterator[pb.DrainResponse]:
        timeout = drain_timeout_from_pb(request)
        partitions = partitions_from_pb(request.partitions)
        # A stream cannot go through ReplayCache.run: the answer of a repeated
        # request_id (or of a retry while the first still runs) is its result alone.
        key = ("Drain", request.request_id)
        outcome: asyncio.Future[pb.DrainResult] | None = None
        if request.request_id:
            seen = self._replay.lookup(key)
            if seen is None and key in self._drains:
                # The same drain is running (a client retry): wait for its answer.
                seen = await asyncio.shield(self._drains[key])
            if seen is not None:
                yield pb.DrainResponse(result=replayed(seen))  # type: ignore[arg-type]
                return
            outcome = self._drains[key] = asyncio.get_running_loop().create_future()
            outcome.add_done_callback(retrieve_exception)

        latest: collections.deque[DrainProgress] = collections.deque(maxlen=1)
        wake = asyncio.Event()
        here = asyncio.get_running_loop()

        def progressed(progress: DrainProgress) -> None:
            latest.append(progress)
            wake.set()

        def on_progress(progress: DrainProgress) -> None:
            # Called on the service's loop; the stream is on the server's.
            if asyncio.get_running_loop() is here:
                progressed(progress)
            else:
                here.call_soon_threadsafe(progressed, progress)

        self._health.draining += 1
        await self._health.update()
        drain = asyncio.create_task(
            self._on_service(
                lambda: self._target.drain(
                    timeout=timeout,
                    partitions=partitions,
                    resume_after=request.resume_after,
                    progress=on_progress,
                )
            ),
            name="control-drain",
        )
        try:
            while not drain.done():
                woken = asyncio.create_task(wake.wait(), name="control-drain-progress")
                try:
                    await asyncio.wait({drain, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                wake.clear()
                if latest and not drain.done():
                    yield pb.DrainResponse(progress=drain_progress_to_pb(latest.pop()))
            try:
                result = drain.result()
            except DrainIncompleteError as exc:
                yield pb.DrainResponse(result=drain_result_to_pb(exc.result, complete=False))
                context.set_trailing_metadata((("drain-remaining", str(exc.result.remaining)),))
                raise
            answer = drain_result_to_pb(result, complete=True)
            if outcome is not None:
                self._replay.remember(key, answer)
                outcome.set_result(answer)
            yield pb.DrainResponse(result=answer)
        except BaseException as exc:
            if outcome is not None and not outcome.done():
                if isinstance(exc, Exception):
                    outcome.set_exception(exc)
                else:
                    outcome.cancel()
            raise
        finally:
            if outcome is not None:
                if not outcome.done():
                    outcome.cancel()
                self._drains.pop(key, None)
            if not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            self._health.draining -= 1
            await self._health.update()

    # ---------------------------------------------------- dead letters
    async def StreamDeadLetters(
        self, request: pb.StreamDeadLettersRequest, context: _Context
    ) -> AsyncIterator[pb.StreamDeadLettersResponse]:
        if request.backlog_limit < 0:
            raise InvalidArgumentError("backlog_limit must be >= 0")
        if request.buffer_size < 0:
            raise InvalidArgumentError("buffer_size must be >= 0")
        dl_filter = filter_from_pb(request.filter)
        loop = self._service_loop or asyncio.get_running_loop()
        async for response in iterate_on(loop, lambda: self._dead_letters(request, dl_filter)):
            yield response

    async def _dead_letters(
        self, request: pb.StreamDeadLettersRequest, dl_filter: DeadLetterFilter
    ) -> AsyncIterator[pb.StreamDeadLettersResponse]:
        """StreamDeadLetters' answers, produced on the service's loop (the
        dead-letter store and its subscriptions live there)."""
        limit = request.backlog_limit or None
        follow = request.follow and not self._closing
        sub = DeadLetterSubscription.open(
            lambda: self._target.select_dead_letters(dl_filter, limit),
            (lambda s: self._target.subscribe_dead_letters(s.push)) if follow else None,
            dl_filter.matches,
            buffer=min(request.buffer_size or self._stream_buffer, MAX_STREAM_BUFFER),
            on_skip=self._metrics.stream_skipped.inc,
        )
        self._streams.add(sub)
        try:
            for _ in range(sub.backlog_size):
                dead = await anext(sub)
                yield pb.StreamDeadLettersResponse(dead_letter=dead_letter_to_pb(dead))
            yield pb.StreamDeadLettersResponse(backlog_end=pb.BacklogEnd(count=sub.backlog_size))
            reported = 0
            async for dead in sub:
                if self._closing:
                    break
                if sub.skipped > reported:
                    count, reported = sub.skipped - reported, sub.skipped
                    yield pb.StreamDeadLettersResponse(
                        skipped=pb.Skipped(count=count, total=reported)
                    )
                yield pb.StreamDeadLettersResponse(dead_letter=dead_letter_to_pb(dead))
        finally:
            self._streams.discard(sub)
            sub.close()

    async def RedriveDeadLetters(
        self, request: pb.RedriveDeadLettersRequest, context: _Context
    ) -> pb.RedriveDeadLettersResponse:
        ids, dl_filter = redrive_selection_from_pb(request)

        async def redrive() -> pb.RedriveDeadLettersResponse:
            result = await self._on_service(lambda: self._target.redrive(ids=ids, filter=dl_filter))
            return pb.RedriveDeadLettersResponse(
                matched=result.matched,
                republished=result.republished,
                failed=result.failed,
                errors=dict(result.errors),
            )

        return await self._replay.run("RedriveDeadLetters", request.request_id, redrive)
