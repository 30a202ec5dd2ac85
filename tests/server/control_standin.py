"""A pure-logic :class:`ControlTarget` over a real :class:`pool.PoolSwitch`.

Stands in for the Kafka-facing service in control-plane tests: the switch, the
pools, the handler and the dead letters are real; partitions, pause/resume,
committed offsets and redrive are simulated in memory. The end-to-end test
against the real ``Service`` lives with the service.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pool import (
    ActorPool,
    ActorPoolOptions,
    DeadLetter,
    Handler,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    RetryPolicy,
)
from server._control import (
    CommittedOffset,
    DeadLetterFilter,
    DrainIncompleteError,
    DrainProgress,
    DrainResult,
    NotReadyError,
    Partition,
    PartitionStatus,
    PoolStatus,
    PreconditionError,
    RedriveResult,
    ServiceStatus,
    UnknownPartitionError,
)

TOPIC = "events"


def make_switch(
    handler: Handler,
    *,
    actor_handler: Handler | None = None,
    size: int = 8,
    capacity: int = 100,
    mode: PoolMode = PoolMode.KEYED,
    rollout_percent: float = 100.0,
) -> PoolSwitch:
    retry = RetryPolicy(max_attempts=1, initial_backoff=0.001, max_backoff=0.001, jitter=0.0)
    keyed = KeyedWorkerPool(handler, PoolOptions(size=size, capacity=capacity, retry=retry))
    actor = ActorPool(
        actor_handler or handler, ActorPoolOptions(size=size, capacity=capacity, retry=retry)
    )
    return PoolSwitch(keyed, actor, mode=mode, rollout_percent=rollout_percent)


def message(aggregate_id: str, offset: int, partition: int = 0, value: bytes = b"") -> Message:
    return Message(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        key=aggregate_id.encode(),
        value=value or f"{aggregate_id}:{offset}".encode(),
        headers=(("x-aggregate-id", aggregate_id.encode()),),
        aggregate_id=aggregate_id,
        timestamp_ms=int(time.time() * 1000),
    )


@dataclass
class _PartitionState:
    position: int = 0  # next offset to feed
    committed: int | None = None
    finished: set[int] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    in_flight: int = 0


class StandInControlTarget:
    """ControlTarget stand-in: real switch, simulated partitions (see module doc)."""

    def __init__(self, switch: PoolSwitch, partitions: int = 2, version: str = "test") -> None:
        self.switch = switch
        self.parts: dict[Partition, _PartitionState] = {
            (TOPIC, p): _PartitionState() for p in range(partitions)
        }
        self.version = version
        self.dead: list[DeadLetter] = []
        self.redriven: list[DeadLetter] = []
        self._subscribers: list[Callable[[DeadLetter], None]] = []
        self._ids = itertools.count(1)
        self._started = time.monotonic()
        self._draining = False
        self.finished = 0
        #: Calls (by method name) that fail with NotReadyError the next N times.
        self.unavailable: Counter[str] = Counter()

    def _maybe_unavailable(self, method: str) -> None:
        if self.unavailable[method] > 0:
            self.unavailable[method] -= 1
            raise NotReadyError(f"{method}: not ready (injected)")

    # ------------------------------------------------------- simulated intake
    async def feed(self, aggregate_id: str, partition: int = 0) -> asyncio.Future[object]:
        """Submit the partition's next offset for ``aggregate_id`` through the switch."""
        state = self.parts[(TOPIC, partition)]
        offset = state.position
        state.position += 1
        state.in_flight += 1
        completion = await self.switch.submit(message(aggregate_id, offset, partition))

        def done(fut: asyncio.Future[DeadLetter | None]) -> None:
            state.in_flight -= 1
            state.finished.add(offset)
            self.finished += 1
            if not fut.cancelled() and fut.result() is not None:
                self.record_dead_letter(fut.result())  # type: ignore[arg-type]

        completion.add_done_callback(done)
        return completion  # type: ignore[return-value]

    def record_dead_letter(self, dead: DeadLetter) -> DeadLetter:
        from dataclasses import replace

        dead = replace(dead, id=f"dl-{next(self._ids)}")
        self.dead.append(dead)
        for callback in list(self._subscribers):
            callback(dead)
        return dead

    def _commit(self, partitions: Sequence[Partition]) -> list[CommittedOffset]:
        out = []
        for tp in partitions:
            state = self.parts[tp]
            nxt = state.committed or 0
            while nxt in state.finished:
                nxt += 1
            if nxt:
                state.committed = nxt
                out.append(CommittedOffset(tp[0], tp[1], nxt))
        return out

    def _scope(self, partitions: Sequence[Partition] | None) -> list[Partition]:
        if partitions is None:
            return list(self.parts)
        unknown = [tp for tp in partitions if tp not in self.parts]
        if unknown:
            raise UnknownPartitionError(unknown)
        return list(partitions)

    # --------------------------------------------------------- ControlTarget
    def status(self) -> ServiceStatus:
        self._maybe_unavailable("status")
        partitions = []
        for (topic, p), st in sorted(self.parts.items()):
            partitions.append(
                PartitionStatus(
                    topic=topic,
                    partition=p,
                    committed=st.committed,
                    position=st.position,
                    high_watermark=st.position,
                    lag=st.position - (st.committed or 0),
                    paused=bool(st.reasons),
                    paused_reasons=tuple(sorted(st.reasons)),
                    in_flight=st.in_flight,
                )
            )
        pools = tuple(
            PoolStatus(
                mode=mode,
                size=pool.size,
                capacity=pool.capacity,
                in_flight=pool.in_flight,
                restarts=getattr(pool, "restarts", 0),
            )
            for mode, pool in self.switch.pools.items()
        )
        return ServiceStatus(
            mode=self.switch.mode,
            rollout_percent=self.switch.rollout_percent,
            generation=self.switch.generation,
            since=self.switch.since,
            partitions=tuple(partitions),
            in_flight=self.switch.in_flight,
            pools=pools,
            restarts=sum(p.restarts for p in pools),
            dead_letters=len(self.dead),
            uptime_s=time.monotonic() - self._started,
            version=self.version,
            draining=self._draining,
            group_id="test-group",
            instance="standin",
        )

    async def pause(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        self._maybe_unavailable("pause")
        scope = self._scope(partitions)
        for tp in scope:
            self.parts[tp].reasons.add("operator")
        return sorted(tp for tp, st in self.parts.items() if "operator" in st.reasons)

    async def resume(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        scope = self._scope(partitions)
        resumed = []
        for tp in scope:
            st = self.parts[tp]
            if st.reasons & {"operator", "drain"}:
                st.reasons -= {"operator", "drain"}
                resumed.append(tp)
        return resumed

    async def drain(
        self,
        *,
        timeout: float,
        partitions: Sequence[Partition] | None = None,
        resume_after: bool = False,
        progress: Callable[[DrainProgress], None] | None = None,
    ) -> DrainResult:
        if self._draining:
            raise PreconditionError("a drain is already running")
        scope = self._scope(partitions)
        self._draining = True
        started = time.monotonic()
        finished_before = self.finished
        for tp in scope:
            self.parts[tp].reasons.add("drain")

        def remaining() -> int:
            return sum(self.parts[tp].in_flight for tp in scope)

        try:
            async with asyncio.timeout(timeout):
                while remaining():
                    if progress is not None:
                        progress(
                            DrainProgress(
                                self.finished - finished_before,
                                remaining(),
                                time.monotonic() - started,
                            )
                        )
                    await asyncio.sleep(0.01)
        except TimeoutError:
            result = DrainResult(
                finished=self.finished - finished_before,
                took_s=time.monotonic() - started,
                committed=tuple(self._commit(scope)),
                remaining=remaining(),
                partitions=tuple(scope),
                resumed=resume_after,
            )
            raise DrainIncompleteError(result, timeout) from None
        finally:
            self._draining = False
            if resume_after:
                for tp in scope:
                    self.parts[tp].reasons.discard("drain")
        return DrainResult(
            finished=self.finished - finished_before,
            took_s=time.monotonic() - started,
            committed=tuple(self._commit(scope)),
            remaining=0,
            partitions=tuple(scope),
            resumed=resume_after,
        )

    def select_dead_letters(
        self, filter: DeadLetterFilter, limit: int | None = None
    ) -> list[DeadLetter]:
        found = [d for d in self.dead if filter.matches(d)]
        return found[-limit:] if limit else found

    def subscribe_dead_letters(self, callback: Callable[[DeadLetter], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def redrive(
        self, *, ids: Sequence[str] = (), filter: DeadLetterFilter | None = None
    ) -> RedriveResult:
        if ids:
            chosen = [d for d in self.dead if d.id in ids]
            missing = [i for i in ids if i not in {d.id for d in chosen}]
        else:
            assert filter is not None
            chosen = [d for d in self.dead if filter.matches(d)]
            missing = []
        for d in chosen:
            self.dead.remove(d)
            self.redriven.append(d)
        return RedriveResult(
            matched=len(chosen),
            republished=len(chosen),
            failed=len(missing),
            errors=dict.fromkeys(missing, "no such dead letter"),
        )
