"""The bad-input campaign's fast, deterministic parts: its corpus and random
records against the intake rules, in-process and through the real service."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.campaigns.bad_input import (
    MAX_VALUE_BYTES,
    Case,
    corpus,
    expected_outcome,
    produce_cases,
    random_cases,
)
from pool import DeadLetter, Message
from server._broker import EmbeddedBroker
from server._intake import Decoder, IntakeOptions
from server._service import Service
from tests.conftest import MakeTopic
from tests.helpers import assert_eventually
from tests.server.test_service import service_settings


class Recorder:
    """Remembers ``(aggregate_id, offset)``; accepts any payload (the corpus has odd ones)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    async def __call__(self, message: Message) -> None:
        self.events.append((message.aggregate_id, message.offset))


def _decoded(decoder: Decoder, topic: str, offset: int, case: Case) -> tuple[str, str]:
    # What the consumer hands the decoder: header names already decoded (leniently).
    headers = [
        (k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else k, v)
        for k, v in case.headers
    ]
    item = decoder.decode(topic, 0, offset, case.key, case.value, headers, 0)
    if isinstance(item, DeadLetter):
        return ("dead", str(item.reason))
    return ("handled", item.aggregate_id)


def test_the_decoder_gives_every_corpus_and_random_record_its_defined_outcome() -> None:
    cases = corpus() + random_cases(300, 11)
    for policy in ("dead-letter", "route-by-offset"):
        decoder = Decoder(IntakeOptions(max_value_bytes=MAX_VALUE_BYTES, missing_id_policy=policy))
        wrong = [
            (offset, case.name, want, got)
            for offset, case in enumerate(cases)
            if (got := _decoded(decoder, "t", offset, case))
            != (
                want := expected_outcome(
                    "t", 0, offset, case, max_value_bytes=MAX_VALUE_BYTES, policy=policy
                )
            )
        ]
        assert not wrong, wrong[:5]


async def test_the_corpus_through_the_service_each_outcome_once_everything_committed(
    broker: EmbeddedBroker, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await broker.create_topics({f"{topic}.dlq": 1})
    cases = corpus()
    recorder = Recorder()
    settings = service_settings(
        broker.bootstrap, topic, f"{topic}-g",
        f"intake.maxValueBytes={MAX_VALUE_BYTES}",
        "intake.missingIdPolicy=dead-letter",
    )  # fmt: skip
    async with Service(settings, bootstrap_servers=broker.bootstrap, handler=recorder) as svc:
        await svc.consumer.wait_assigned(10)
        offsets = await produce_cases(broker.bootstrap, topic, cases)
        end = offsets[-1] + 1
        await assert_eventually(
            lambda: svc.status().partitions[0].committed == end, timeout=20, message="committed"
        )
        assert svc.consumer.failure is None
    want = {
        o: expected_outcome(topic, 0, o, c, max_value_bytes=MAX_VALUE_BYTES, policy="dead-letter")
        for o, c in zip(offsets, cases, strict=True)
    }
    dead = await _dead_letters(
        broker.bootstrap, f"{topic}.dlq", sum(w[0] == "dead" for w in want.values())
    )
    got: dict[int, list[tuple[str, str]]] = {}
    for record in dead:
        h = dict(record.headers)
        got.setdefault(int(h["dlq-original-offset"]), []).append(("dead", h["dlq-reason"].decode()))
    for agg, offset in recorder.events:
        got.setdefault(offset, []).append(("handled", agg))
    wrong = {
        o: (cases[i].name, want[o], got.get(o))
        for i, o in enumerate(offsets)
        if got.get(o) != [want[o]]
    }
    assert not wrong


async def _dead_letters(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        out: list[Any] = []

        async def enough() -> bool:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                out.extend(records)
            return len(out) >= count

        await assert_eventually(enough, timeout=10, message=f"{count} dead letters")
        return out
    finally:
        await consumer.stop()
