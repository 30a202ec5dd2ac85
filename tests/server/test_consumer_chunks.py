"""A large fetch is dispatched in chunks, the event loop served in between.

Against the real embedded broker and the real pools. A fetch's records are
observed where they leave the consumer (a dispatcher that forwards to the
``PoolSwitch``) and where they enter it (aiokafka's ``getmany``, wrapped).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from pool import (
    ActorPool,
    ActorPoolOptions,
    DeadLetter,
    KeyedWorkerPool,
    Message,
    PoolMode,
    PoolOptions,
    PoolSwitch,
)
from server._broker import EmbeddedBroker
from server._consumer import DISPATCH_CHUNK, ConsumerOptions, EventConsumer
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, committed_offsets, produce
from tests.server.test_consumer import JsonDecoder, MemorySink, Recorder


class Observed:
    """The consumer's dispatcher: forwards to the switch, noting for each event
    the loop turn it was dispatched in (a ``call_soon`` marker per turn) and
    the fetch (``getmany``) it came from."""

    def __init__(self, switch: PoolSwitch) -> None:
        self.switch = switch
        self.turn = 0
        self._marked = False
        #: (turn, fetch, aggregate, offset) per dispatched event
        self.events: list[tuple[int, int, str, int]] = []
        #: Records returned by each fetch; the events dispatched of the last one.
        self.fetch_sizes: list[int] = []
        self.of_last_fetch = 0
        #: Called after each dispatched event.
        self.on_dispatch: Callable[[], None] | None = None

    def watch(self, consumer: EventConsumer) -> None:
        """Record every ``getmany`` of ``consumer`` from now on."""
        aio = consumer._consumer
        getmany = aio.getmany

        async def counted(*args: Any, **kwargs: Any) -> Any:
            batches = await getmany(*args, **kwargs)
            if batches:
                self.fetch_sizes.append(sum(len(r) for r in batches.values()))
                self.of_last_fetch = 0
            return batches

        aio.getmany = counted

    @property
    def fetch_size(self) -> int:
        """Records of the fetch being dispatched."""
        return self.fetch_sizes[-1]

    def _next_turn(self) -> None:
        self.turn += 1
        self._marked = False

    def _note(self, message: Message) -> None:
        if not self._marked:
            self._marked = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        self.of_last_fetch += 1
        fetch = len(self.fetch_sizes) - 1
        self.events.append((self.turn, fetch, message.aggregate_id, message.offset))
        if self.on_dispatch is not None:
            self.on_dispatch()

    def dispatch_nowait(self, message: Message) -> None:
        self._note(message)
        self.switch.dispatch_nowait(message)

    async def dispatch(self, message: Message) -> None:
        self._note(message)
        await self.switch.dispatch(message)

    def add_finish_listener(self, listener: Callable[[Message, DeadLetter | None], None]) -> None:
        self.switch.add_finish_listener(listener)


@contextlib.asynccontextmanager
async def observed(
    broker: EmbeddedBroker, topic: str, handler: Recorder
) -> AsyncIterator[tuple[EventConsumer, Observed]]:
    keyed = KeyedWorkerPool(handler, PoolOptions(size=64, capacity=1000))
    actor = ActorPool(handler, ActorPoolOptions(size=64, capacity=1000))
    switch = PoolSwitch(keyed, actor, mode=PoolMode.KEYED)
    dispatcher = Observed(switch)
    opts = ConsumerOptions(
        bootstrap_servers=broker.bootstrap,
        group_id=f"{topic}-g",
        topics=(topic,),
        commit_interval_s=0.1,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    consumer = EventConsumer(
        opts, decoder=JsonDecoder(), dispatcher=dispatcher, dead_letters=MemorySink()
    )
    async with switch:
        await consumer.start()
        dispatcher.watch(consumer)  # before the group is joined: no fetch yet
        try:
            yield consumer, dispatcher
        finally:
            await consumer.shutdown(timeout=5.0)
            await switch.close(timeout=2.0)


def per_turn(events: Iterable[tuple[int, int, str, int]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for turn, *_ in events:
        counts[turn] = counts.get(turn, 0) + 1
    return counts


async def test_a_large_fetch_yields_to_the_loop_between_chunks(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    events = aggregate_events(aggregates=400, per_aggregate=10, partitions=4)
    ends = await produce(broker.bootstrap, topic, events)
    rec = Recorder()
    async with observed(broker, topic, rec) as (consumer, seen):
        await assert_eventually(lambda: rec.count == len(events), timeout=30)
        await assert_eventually(
            lambda: all(s.committed == ends[s.partition] for s in consumer.partition_status()),
            timeout=10,
        )
    assert max(seen.fetch_sizes) > 2 * DISPATCH_CHUNK, "no large fetch: the test proves nothing"
    # The records of one fetch spread over several loop turns, at most a chunk each.
    assert max(per_turn(seen.events).values()) <= DISPATCH_CHUNK
    assert not rec.overlap
    assert all(seqs == list(range(10)) for seqs in rec.seen.values())


async def test_a_pause_between_two_chunks_leaves_the_rest_to_be_fetched_again(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    events = aggregate_events(aggregates=200, per_aggregate=10, partitions=1)
    ends = await produce(broker.bootstrap, topic, events)
    rec = Recorder()
    async with observed(broker, topic, rec) as (consumer, seen):
        paused_at: list[int] = []

        def pause_in_a_large_fetch() -> None:
            # At the 10th event of the first fetch much larger than a chunk.
            if not paused_at and seen.fetch_size > DISPATCH_CHUNK + 20 and seen.of_last_fetch == 10:
                paused_at.append(len(seen.events))
                consumer.hold("operator", None)

        seen.on_dispatch = pause_in_a_large_fetch
        await assert_eventually(lambda: paused_at, timeout=20, message="a large fetch")
        # The chunk under way is finished; nothing after it while paused
        # (before chunks, the whole fetch was dispatched after the pause).
        await assert_eventually(lambda: rec.count == len(seen.events), timeout=10)
        held = len(seen.events)
        assert held - paused_at[0] < DISPATCH_CHUNK
        await asyncio.sleep(0.5)  # a pause: nothing may arrive meanwhile
        assert len(seen.events) == held
        consumer.release(["operator"], None)
        await assert_eventually(lambda: rec.count == len(events), timeout=20)
        await assert_eventually(
            lambda: all(s.committed == ends[s.partition] for s in consumer.partition_status()),
            timeout=10,
        )
    # Every event exactly once, in order: the rest was fetched again from the
    # first event not dispatched.
    assert len(seen.events) == len(events)
    assert [e[3] for e in seen.events] == list(range(len(events)))
    assert all(seqs == list(range(10)) for seqs in rec.seen.values())
    committed = await committed_offsets(broker.bootstrap, f"{topic}-g", topic, 1)
    assert committed == ends


async def test_stopping_between_two_chunks_dispatches_the_rest_of_the_fetch(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    events = aggregate_events(aggregates=200, per_aggregate=10, partitions=1)
    await produce(broker.bootstrap, topic, events)
    rec = Recorder()
    async with observed(broker, topic, rec) as (consumer, seen):
        stopping: list[asyncio.Task[None]] = []

        def stop_in_a_large_fetch() -> None:
            if not stopping and seen.fetch_size > DISPATCH_CHUNK + 20 and seen.of_last_fetch == 10:
                stopping.append(asyncio.ensure_future(consumer.stop_fetching()))

        seen.on_dispatch = stop_in_a_large_fetch
        await assert_eventually(lambda: stopping, timeout=20, message="a large fetch")
        await asyncio.wait_for(stopping[0], 10)
        # Stopped during the first yield of a fetch: it was still dispatched in
        # full (as every fetch before it), and nothing was fetched after it.
        assert len(per_turn(e for e in seen.events if e[1] == len(seen.fetch_sizes) - 1)) > 1
        dispatched = [
            sum(1 for e in seen.events if e[1] == f) for f in range(len(seen.fetch_sizes))
        ]
        assert dispatched == seen.fetch_sizes
        await assert_eventually(lambda: rec.count == len(seen.events), timeout=10)
    assert not rec.overlap
