"""The consumer in-process against the real embedded broker and the real pools.

The decoder here is a minimal stand-in (JSON ``aggregate_id``); the intake's
own rules are tested with the real decoder through the service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition

from pool import (
    ActorPool,
    ActorPoolOptions,
    DeadLetter,
    DeadLetterReason,
    KeyedWorkerPool,
    Message,
    NonRetryableError,
    PoolMode,
    PoolOptions,
    PoolSwitch,
    QueueFullError,
    RetryPolicy,
)
from server._broker import EmbeddedBroker
from server._consumer import (
    DLQ_RETRY,
    ConsumerOptions,
    EventConsumer,
    publish_until_acknowledged,
)
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.kafka_utils import aggregate_events, committed_offsets, produce


class JsonDecoder:
    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp_ms: int,
    ) -> Message | DeadLetter:
        envelope = json.loads(value or b"{}")
        msg = Message(
            topic, partition, offset, key, value or b"", tuple(headers),
            str(envelope.get("aggregate_id", "")), timestamp_ms, envelope,
        )  # fmt: skip
        if not msg.aggregate_id:
            return DeadLetter.from_exception(
                msg, DeadLetterReason.MISSING_AGGREGATE_ID, None,
                attempts=0, mode="intake", executor=-1, time=time.time(),
            )  # fmt: skip
        return msg


class MemorySink:
    """Fails while ``down``; records what it acknowledged."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.attempts = 0
        self.published: list[DeadLetter] = []

    async def publish(self, dead: DeadLetter) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("broker unavailable")
        self.published.append(dead)


class Recorder:
    """Handler recording (aggregate, seq) and the concurrency it saw."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.count = 0
        self.running = 0
        self.max_running = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.running_by_agg: dict[str, int] = defaultdict(int)
        self.overlap = False

    async def __call__(self, message: Message) -> None:
        agg = message.aggregate_id
        self.running += 1
        self.running_by_agg[agg] += 1
        self.overlap |= self.running_by_agg[agg] > 1
        self.max_running = max(self.max_running, self.running)
        try:
            gate = self.gates.get(agg)
            if gate is not None:
                await gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            assert message.envelope is not None
            if message.envelope.get("poison"):
                raise NonRetryableError("poison")
            self.seen[agg].append(message.envelope["payload"]["seq"])
            self.count += 1
        finally:
            self.running -= 1
            self.running_by_agg[agg] -= 1


async def _running(
    broker: EmbeddedBroker,
    topic: str,
    handler: Callable[[Message], Any],
    *,
    group: str,
    sink: MemorySink | None = None,
    size: int = 64,
    queue: int = 1000,
    **options: Any,
) -> AsyncIterator[tuple[EventConsumer, PoolSwitch]]:
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)
    keyed = KeyedWorkerPool(handler, PoolOptions(size=size, capacity=queue, retry=retry))
    actor = ActorPool(handler, ActorPoolOptions(size=size, capacity=queue, retry=retry))
    switch = PoolSwitch(keyed, actor, mode=PoolMode.KEYED)
    opts = ConsumerOptions(
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        topics=(topic,),
        commit_interval_s=options.pop("commit_interval_s", 0.1),
        session_timeout_ms=2000,  # the broker waits half of it for a group to form
        heartbeat_interval_ms=500,
        **options,
    )
    consumer = EventConsumer(
        opts, decoder=JsonDecoder(), dispatcher=switch, dead_letters=sink or MemorySink()
    )
    async with switch:
        await consumer.start()
        try:
            yield consumer, switch
        finally:
            await consumer.shutdown(timeout=5.0)
            await switch.close(timeout=2.0)


def running(*args: Any, **kwargs: Any) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(_running)(*args, **kwargs)


async def test_every_event_is_handled_in_aggregate_order_and_committed(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    events = aggregate_events(aggregates=50, per_aggregate=40, partitions=4)
    ends = await produce(broker.bootstrap, topic, events)
    rec = Recorder()
    async with running(broker, topic, rec, group=f"{topic}-g") as (consumer, _):
        await assert_eventually(lambda: rec.count == len(events), timeout=20)
        await assert_eventually(
            lambda: all(s.committed == ends[s.partition] for s in consumer.partition_status()),
            timeout=5,
            message="every offset committed",
        )
    assert not rec.overlap
    for agg, seqs in rec.seen.items():
        assert seqs == list(range(40)), agg
    committed = await committed_offsets(broker.bootstrap, f"{topic}-g", topic, 4)
    assert committed == ends


async def test_a_partition_is_handled_in_parallel(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    events = aggregate_events(aggregates=100, per_aggregate=1, partitions=1)
    await produce(broker.bootstrap, topic, events)
    rec = Recorder(delay=0.05)
    async with running(broker, topic, rec, group=f"{topic}-g", size=128):
        started = time.monotonic()
        await assert_eventually(lambda: rec.count == 100, timeout=10)
        took = time.monotonic() - started
    # Serial would be 100 x 50 ms = 5 s; the consumer never waits per event.
    assert rec.max_running >= 20, rec.max_running
    assert took < 2.5, took


async def test_commit_never_passes_an_unfinished_event(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    # offsets 0..9: aggregate a-3 (offset 3) blocks; the others finish.
    await produce(
        broker.bootstrap, topic, [(0, None, json.dumps({"aggregate_id": f"a-{i}",
                                  "payload": {"seq": 0}}).encode()) for i in range(10)]
    )  # fmt: skip
    rec = Recorder()
    rec.gates["a-3"] = asyncio.Event()
    tp = TopicPartition(topic, 0)
    async with running(broker, topic, rec, group=f"{topic}-g") as (consumer, _):
        await assert_eventually(lambda: rec.count == 9, timeout=10)
        await assert_eventually(lambda: consumer.partition_status()[0].committed == 3)
        await consumer.commit()
        assert consumer.partition_status()[0].committed == 3
        assert (await committed_offsets(broker.bootstrap, f"{topic}-g", topic, 1))[0] == 3
        rec.gates["a-3"].set()
        await assert_eventually(lambda: consumer.partition_status()[0].committed == 10)
    assert tp.partition == 0


async def test_full_queue_pauses_only_its_partition_and_drops_nothing(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    slow = [(0, b"slow", json.dumps({"aggregate_id": "slow", "payload": {"seq": i}}).encode())
            for i in range(30)]  # fmt: skip
    rec = Recorder()
    rec.gates["slow"] = asyncio.Event()
    async with running(broker, topic, rec, group=f"{topic}-g", size=4, queue=5) as (consumer, _):
        await consumer.wait_assigned(10)
        await produce(broker.bootstrap, topic, slow)

        def p0_backpressured() -> bool:
            st = {s.partition: s for s in consumer.partition_status()}
            return "backpressure" in st[0].paused_reasons

        await assert_eventually(p0_backpressured, message="partition 0 paused by backpressure")
        sample = consumer.metrics.registry.get_sample_value
        paused_metric = "kafka_eventbus_consumer_paused_partitions"
        await assert_eventually(lambda: sample(paused_metric, {"reason": "backpressure"}) == 1)
        # Partition 1 keeps flowing while partition 0 waits (aggregates away from 'slow').
        # (Aggregates that share the slow one's executor would wait behind it: by
        # design, so the other partition's traffic avoids that executor.)
        probe = KeyedWorkerPool(rec, PoolOptions(size=4))
        slow_index = probe.executor_for("slow")
        names = [f"other-{i}" for i in range(300) if probe.executor_for(f"other-{i}") != slow_index]
        others = [
            (1, b"x", json.dumps({"aggregate_id": name, "payload": {"seq": 0}}).encode())
            for name in names[:200]
        ]
        await produce(broker.bootstrap, topic, others)
        await assert_eventually(lambda: rec.count == 200, timeout=10, message="partition 1 flows")
        st = {s.partition: s for s in consumer.partition_status()}
        assert not st[1].paused
        assert st[0].paused
        rec.gates["slow"].set()
        await assert_eventually(lambda: rec.count == 230, timeout=10, message="nothing dropped")
        await assert_eventually(lambda: not consumer.partition_status()[0].paused)
        await assert_eventually(lambda: sample(paused_metric, {"reason": "backpressure"}) == 0)
    assert rec.seen["slow"] == list(range(30))


async def test_dead_letter_offset_finishes_only_after_the_sink_acknowledges(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await produce(broker.bootstrap, topic, [
        (0, None, json.dumps({"aggregate_id": "a", "payload": {"seq": 0}}).encode()),
        (
            0,
            None,
            json.dumps({"aggregate_id": "b", "poison": True, "payload": {"seq": 0}}).encode(),
        ),
        (0, None, json.dumps({"payload": {"seq": 0}}).encode()),  # no aggregate ID
        (0, None, json.dumps({"aggregate_id": "a", "payload": {"seq": 1}}).encode()),
    ])  # fmt: skip
    sink = MemorySink(down=True)
    rec = Recorder()
    async with running(
        broker,
        topic,
        rec,
        group=f"{topic}-g",
        sink=sink,
        dlq_retry=RetryPolicy(initial_backoff=0.2, max_backoff=0.4),
    ) as (consumer, _):
        await assert_eventually(lambda: rec.count == 2)
        await assert_eventually(lambda: sink.attempts >= 4)
        await consumer.commit()
        # The sink is failing: offsets 1 and 2 are unfinished, so the commit stays at 1.
        assert consumer.partition_status()[0].committed == 1
        assert consumer.partition_status()[0].in_flight == 2
        sink.down = False
        await assert_eventually(lambda: len(sink.published) == 2, timeout=10)
        await assert_eventually(lambda: consumer.partition_status()[0].committed == 4)
    reasons = sorted(str(d.reason) for d in sink.published)
    assert reasons == ["missing-aggregate-id", "non-retryable"]


async def test_a_failing_dead_letter_publish_is_retried_with_growing_backoff() -> None:
    # Pure: the publish fails five times, then succeeds; the sleeps are recorded.
    dead = JsonDecoder().decode("t", 0, 7, None, b"{}", (), 0)
    assert isinstance(dead, DeadLetter)
    sink = MemorySink(down=True)
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) == 5:
            sink.down = False

    retry = RetryPolicy(initial_backoff=0.5, max_backoff=5.0, multiplier=2.0, jitter=0.2)
    failures = await publish_until_acknowledged(
        sink.publish, dead, retry, rand=lambda: 0.5, sleep=sleep
    )
    assert failures == 5
    assert sink.attempts == 6
    assert sink.published == [dead]
    assert slept == [0.5, 1.0, 2.0, 4.0, 5.0]  # doubling, capped; rand 0.5 = no jitter
    # rand 0.0: each delay at the bottom of its +-20 % jitter.
    slept.clear()
    sink.down, sink.attempts = True, 0
    await publish_until_acknowledged(sink.publish, dead, retry, rand=lambda: 0.0, sleep=sleep)
    assert slept == pytest.approx([0.4, 0.8, 1.6, 3.2, 4.0])
    assert DLQ_RETRY.backoff(1, 0.5) == 0.5  # the consumer's default starts as before


async def test_in_flight_never_exceeds_the_bound(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    events = aggregate_events(aggregates=200, per_aggregate=2, partitions=2)
    await produce(broker.bootstrap, topic, events)
    rec = Recorder(delay=0.002)
    peak = 0
    async with running(
        broker, topic, rec, group=f"{topic}-g", max_in_flight=50, resume_fraction=0.5
    ) as (consumer, _):

        def done() -> bool:
            nonlocal peak
            peak = max(peak, consumer.in_flight)
            return rec.count == len(events)

        await assert_eventually(done, timeout=20, interval=0.002)
    assert 0 < peak <= 50


async def test_operator_pause_and_backpressure_are_kept_apart(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    rec = Recorder()
    async with running(broker, topic, rec, group=f"{topic}-g") as (consumer, _):
        await consumer.wait_assigned(10)
        tp0 = TopicPartition(topic, 0)
        assert consumer.hold("operator", [tp0]) == [tp0]
        await produce(broker.bootstrap, topic, aggregate_events(10, 1, 2))
        await assert_eventually(lambda: rec.count == 5, message="partition 1 flows")
        with pytest.raises(AssertionError):
            await assert_eventually(lambda: rec.count > 5, timeout=0.5)
        st = {s.partition: s for s in consumer.partition_status()}
        assert st[0].paused_reasons == ("operator",)
        assert consumer.release(["operator"], [tp0]) == [tp0]
        await assert_eventually(lambda: rec.count == 10)


async def test_lag_of_a_paused_partition_counts_the_events_waiting_behind_the_pause(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    # Found by the reliability campaign: a paused partition is not fetched, so
    # its high watermark froze and GetStatus / the lag gauge said 0 while
    # events piled up behind an operator (or backpressure) pause.
    topic = await make_topic(partitions=2)
    rec = Recorder()
    async with running(broker, topic, rec, group=f"{topic}-g") as (consumer, _):
        await consumer.wait_assigned(10)
        tp0 = TopicPartition(topic, 0)
        consumer.hold("operator", [tp0])
        events = aggregate_events(10, 3, 2)
        await produce(broker.bootstrap, topic, [e for e in events if e[0] == 1])
        # One batch per event: Tansu lists the end offset of a partition as the
        # last batch's base offset + 1 (Kafka: the last offset + 1).
        for event in (e for e in events if e[0] == 0):
            await produce(broker.bootstrap, topic, [event])
        await assert_eventually(lambda: rec.count == 15, message="partition 1 flows")

        def paused_status() -> Any:
            return {s.partition: s for s in consumer.partition_status()}[0]

        await assert_eventually(lambda: paused_status().lag == 15, timeout=5)
        assert paused_status().high_watermark == 15
        assert paused_status().paused_reasons == ("operator",)
        consumer.release(["operator"], [tp0])
        await assert_eventually(lambda: rec.count == 30)
        await assert_eventually(lambda: paused_status().lag == 0, timeout=5)


async def test_redeliveries_after_a_rebalance_are_counted_and_nothing_is_lost(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    group = f"{topic}-g"
    await produce(
        broker.bootstrap, topic,
        [(0, None, json.dumps({"aggregate_id": f"a-{i}", "payload": {"seq": 0}}).encode())
         for i in range(10)],
    )  # fmt: skip
    rec = Recorder()
    rec.gates["a-2"] = asyncio.Event()
    async with running(broker, topic, rec, group=group, revoke_timeout_s=0.3) as (a, _):
        await assert_eventually(lambda: rec.count == 9, timeout=10)
        await assert_eventually(lambda: a.partition_status()[0].committed == 2)
        # B joins with intake held (it never fetches), then leaves: the partition
        # comes back to A from the committed offset 2, below what A dispatched.
        b_switch = PoolSwitch(
            KeyedWorkerPool(rec, PoolOptions(size=4)), ActorPool(rec, ActorPoolOptions(size=4))
        )
        b = EventConsumer(
            ConsumerOptions(
                bootstrap_servers=broker.bootstrap, group_id=group, topics=(topic,),
                session_timeout_ms=2000, heartbeat_interval_ms=500,
            ),
            decoder=JsonDecoder(), dispatcher=b_switch, dead_letters=MemorySink(),
        )  # fmt: skip
        b.hold("operator", None)
        async with b_switch:
            await b.start()
            sample = a.metrics.registry.get_sample_value
            await assert_eventually(
                lambda: (sample("kafka_eventbus_consumer_rebalance_partitions_total",
                                {"event": "revoked"}) or 0) >= 1,
                timeout=15,
            )  # fmt: skip
            await b.shutdown(timeout=1)
        labels = {"topic": topic, "partition": "0"}
        await assert_eventually(
            lambda: sample("kafka_eventbus_consumer_redeliveries_total", labels) == 8, timeout=15
        )
        rec.gates["a-2"].set()
        await assert_eventually(lambda: a.partition_status()[0].committed == 10, timeout=10)
    assert sorted(rec.seen) == [f"a-{i}" for i in range(10)]


async def test_backpressure_and_mode_switches_together_keep_order_and_commit_everything(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    ends = await produce(broker.bootstrap, topic, aggregate_events(30, 40, 4))
    rec = Recorder(delay=0.0005)
    async with running(
        broker, topic, rec, group=f"{topic}-g", size=8, queue=3, max_in_flight=300
    ) as (consumer, switch):
        full = [0]
        dispatch_nowait = switch.dispatch_nowait

        def counting(message: Message) -> None:
            try:
                dispatch_nowait(message)
            except QueueFullError:
                full[0] += 1
                raise

        switch.dispatch_nowait = counting
        modes = [(PoolMode.ACTOR, 50.0), (PoolMode.KEYED, 100.0), (PoolMode.ACTOR, 100.0)]
        switches = 0
        while rec.count < 1200 and switches < 200:
            mode, rollout = modes[switches % len(modes)]
            await switch.set_rollout(rollout)
            await switch.set_mode(mode)
            switches += 1
            await asyncio.sleep(0.01)  # pacing the switches, not synchronising
        await assert_eventually(lambda: rec.count == 1200, timeout=20)
        await assert_eventually(
            lambda: {s.partition: s.committed for s in consumer.partition_status()} == ends
        )
    assert full[0] > 0, "the queues never filled: the test did not exercise backpressure"
    assert switches >= 5
    assert not rec.overlap
    assert all(seqs == list(range(40)) for seqs in rec.seen.values())


async def test_an_assignment_arriving_while_the_consumer_closes_is_ignored(
    broker: EmbeddedBroker, make_topic: MakeTopic, caplog: pytest.LogCaptureFixture
) -> None:
    # Closed right after start (a service stopped at once): aiokafka completes the
    # group join inside close() and hands the assignment to our listener.
    topic = await make_topic(partitions=2)
    rec = Recorder()
    keyed = KeyedWorkerPool(rec, PoolOptions(size=2, capacity=10))
    actor = ActorPool(rec, ActorPoolOptions(size=2, capacity=10))
    caplog.set_level(logging.WARNING, logger="aiokafka")
    async with PoolSwitch(keyed, actor, mode=PoolMode.KEYED) as switch:
        for n, delay in enumerate((0.0, 0.2)):
            opts = ConsumerOptions(
                bootstrap_servers=broker.bootstrap,
                group_id=f"{topic}-g{n}",
                topics=(topic,),
                session_timeout_ms=2000,
                heartbeat_interval_ms=500,
            )
            consumer = EventConsumer(
                opts, decoder=JsonDecoder(), dispatcher=switch, dead_letters=MemorySink()
            )
            await consumer.start()
            await asyncio.sleep(delay)
            await consumer.close()
            assert consumer.assignment == []
            assert consumer.failure is None
    failed = [r.getMessage() for r in caplog.records if "failed on partition" in r.getMessage()]
    assert failed == []
