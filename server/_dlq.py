"""The dead-letter sink: publish dead letters to Kafka, remember the recent ones,
stream them to subscribers, and redrive them to their original topic.

- :meth:`DeadLetterSink.publish` returns only once the broker acknowledged the
  record (``acks="all"``): the consumer then counts the offset as finished.
  The record goes to ``topic_template.format(topic=original_topic)`` with the
  original key and value and the original headers followed by ``dlq-*``
  headers (see :data:`DLQ_HEADERS`).
- Each acknowledged dead letter gets an ID: a decimal string, strictly
  increasing in acknowledgement order (by default it starts at the start-up
  time in milliseconds x 1000, so IDs keep increasing across restarts).
- The ring keeps the newest ``ring_size`` dead letters in memory.
- :meth:`add_listener` calls a callback for every new dead letter; it is the
  one fan-out, which the gRPC dead-letter stream uses too (through the
  service's ``subscribe_dead_letters``).
- :meth:`subscribe` yields the backlog after an ID, then live records, through
  a bounded per-subscriber buffer (a
  :class:`~server._dlq_subscription.DeadLetterSubscription` over the
  listeners): a slow reader loses the oldest buffered records (counted in
  ``skipped``), it never slows publishing.
- :meth:`redrive` republishes original key/value/headers to the original
  topic and forgets the republished dead letters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from pool import DeadLetter
from server._control import DeadLetterFilter, RedriveResult
from server._dlq_subscription import DeadLetterListener, DeadLetterSubscription
from server._errors import ServiceError
from server._logging import event_fields

log = structlog.get_logger("server.dlq")

__all__ = [
    "DLQ_HEADERS",
    "DLQ_OMITTED_HEADER",
    "DeadLetterSink",
    "DeadLetterSinkError",
    "DeadLetterSubscription",
    "dead_letter_headers",
]

#: Headers added to each record on the dead-letter topic (after the original ones).
DLQ_HEADERS: Final = (
    "dlq-reason",  # DeadLetterReason value, e.g. "retries-exhausted"
    "dlq-error-type",  # exception class name ("" when none)
    "dlq-error-message",  # str(exception), truncated to 1 KiB (UTF-8 safe)
    "dlq-traceback",  # last 4 KiB of the traceback ("" when none)
    "dlq-original-topic",
    "dlq-original-partition",
    "dlq-original-offset",
    "dlq-original-timestamp",  # ms since the epoch, as consumed
    "dlq-aggregate-id",
    "dlq-attempts",
    "dlq-mode",  # "keyed", "actor" or "intake"
    "dlq-executor",  # executor index, -1 for intake
    "dlq-time",  # when it became a dead letter, ms since the epoch
)
#: Added (last) only when the record was too large to publish whole: what was left
#: out and why. The original stays at dlq-original-topic/-partition/-offset while
#: retention lasts, and whole in the in-memory ring (stream, redrive).
DLQ_OMITTED_HEADER: Final = "dlq-omitted"

ERROR_MESSAGE_LIMIT: Final = 1024
TRACEBACK_LIMIT: Final = 4096


class DeadLetterSinkError(ServiceError):
    """The sink is not started, or is closed."""


def _nothing() -> None:
    pass


def _truncate_head(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode("utf-8", "ignore").encode() + b"..."


def _truncate_tail(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    return b"..." + data[-(limit - 3) :].decode("utf-8", "ignore").encode()


def dead_letter_headers(dead: DeadLetter) -> list[tuple[str, bytes]]:
    """The original headers followed by the ``dlq-*`` headers describing ``dead``."""
    msg = dead.message
    return [
        *msg.headers,
        ("dlq-reason", str(dead.reason).encode()),
        ("dlq-error-type", dead.error_type.encode("utf-8", "backslashreplace")),
        ("dlq-error-message", _truncate_head(dead.error_message, ERROR_MESSAGE_LIMIT)),
        ("dlq-traceback", _truncate_tail(dead.traceback, TRACEBACK_LIMIT)),
        ("dlq-original-topic", msg.topic.encode()),
        ("dlq-original-partition", str(msg.partition).encode()),
        ("dlq-original-offset", str(msg.offset).encode()),
        ("dlq-original-timestamp", str(msg.timestamp_ms).encode()),
        ("dlq-aggregate-id", msg.aggregate_id.encode()),
        ("dlq-attempts", str(dead.attempts).encode()),
        ("dlq-mode", dead.mode.encode()),
        ("dlq-executor", str(dead.executor).encode()),
        ("dlq-time", str(round(dead.time * 1000)).encode()),
    ]


class DeadLetterSink:
    """Publishes dead letters to the dead-letter topic and keeps the recent ones.

    Pass ``bootstrap_servers`` (the sink creates and owns an
    ``AIOKafkaProducer`` with ``acks="all"`` and ``enable_idempotence=False``,
    which Tansu needs) or an already started ``producer`` (not stopped by the
    sink). ``start()``/``stop()`` are idempotent; ``async with`` works.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        producer: Any = None,
        topic_template: str = "{topic}.dlq",
        ring_size: int = 10_000,
        client_id: str = "kafka-actor-pool-dlq",
        producer_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        id_base: int | None = None,
    ) -> None:
        if (bootstrap_servers is None) == (producer is None):
            raise ValueError("pass exactly one of bootstrap_servers and producer")
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, got {ring_size}")
        topic_template.format(topic="t")  # fail early on a bad template
        self._bootstrap = bootstrap_servers
        self._producer: Any = producer
        self._owns_producer = producer is None
        self._producer_options = dict(producer_options or {})
        self._client_id = client_id
        self.topic_template = topic_template
        self.ring_size = ring_size
        self._ring: OrderedDict[str, DeadLetter] = OrderedDict()
        #: key -> (callback, on_close): the one fan-out of new dead letters.
        self._listeners: dict[int, tuple[DeadLetterListener, Callable[[], None] | None]] = {}
        self._listener_ids = 0
        self._clock = clock
        self._next_id = id_base if id_base is not None else int(clock() * 1000) * 1000
        self._started = producer is not None
        self._closed = False
        self.published = 0
        self.redriven = 0

    @classmethod
    def from_settings(cls, settings: Any, bootstrap_servers: str, **kwargs: Any) -> DeadLetterSink:
        """Build from the service ``Settings`` (``deadLetter.topicTemplate``, ``ringSize``)."""
        return cls(
            bootstrap_servers,
            topic_template=settings.dead_letter.topic_template,
            ring_size=settings.dead_letter.ring_size,
            client_id=f"{settings.kafka.consumer.client_id}-dlq",
            **kwargs,
        )

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the owned producer. Idempotent. When that fails (no broker answers)
        the producer is stopped again before the error is raised."""
        if self._closed:
            raise DeadLetterSinkError("the dead-letter sink is closed")
        if self._started:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=False,
            **self._producer_options,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._started = True

    async def stop(self) -> None:
        """End every subscription and stop the owned producer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for _, on_close in listeners:
            if on_close is not None:
                on_close()
        if self._owns_producer and self._producer is not None:
            await self._producer.stop()

    close = stop

    async def __aenter__(self) -> DeadLetterSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _require_producer(self) -> Any:
        if self._closed:
            raise DeadLetterSinkError("the dead-letter sink is closed")
        if not self._started or self._producer is None:
            raise DeadLetterSinkError("the dead-letter sink is not started")
        return self._producer

    # -- publishing ----------------------------------------------------------------

    def topic_for(self, topic: str) -> str:
        return self.topic_template.format(topic=topic)

    async def publish(self, dead: DeadLetter) -> DeadLetter:
        """Publish ``dead`` and wait for the broker's acknowledgement.

        Returns the dead letter with its ``id`` set, after it is in the ring
        and handed to subscribers. Raises the producer's error (a
        ``KafkaError``) when the broker did not acknowledge: nothing is
        recorded then, and the caller may retry.
        """
        producer = self._require_producer()
        msg = dead.message
        topic = self.topic_for(msg.topic)
        headers = dead_letter_headers(dead)
        try:
            await producer.send_and_wait(topic, value=msg.value, key=msg.key, headers=headers)
        except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:
            # Too large for the producer or the broker, now and on every retry (an
            # oversized-value dead letter is over the intake limit by definition):
            # publish it without the value, then also without the key and the original
            # headers, rather than hold its offset (and the partition's commits) for ever.
            await self._publish_reduced(producer, topic, dead, headers, exc)
        recorded = self._record(dead)
        log.error(
            "deadletter.published",
            **event_fields(msg),
            id=recorded.id,
            reason=str(dead.reason),
            error_type=dead.error_type,
            error=dead.error_message[:200],
            attempts=dead.attempts,
            mode=dead.mode,
            dlq_topic=self.topic_for(msg.topic),
        )
        return recorded

    @staticmethod
    async def _publish_reduced(
        producer: Any,
        topic: str,
        dead: DeadLetter,
        headers: list[tuple[str, bytes]],
        error: Exception,
    ) -> None:
        msg = dead.message
        dlq_headers = headers[len(msg.headers) :]
        why = (
            f"too large to publish whole ({type(error).__name__}); value was {len(msg.value)} bytes"
        )
        try:
            await producer.send_and_wait(
                topic,
                value=b"",
                key=msg.key,
                headers=[*headers, (DLQ_OMITTED_HEADER, f"value: {why}".encode())],
            )
        except (MessageSizeTooLargeError, RecordListTooLargeError):
            omitted = f"value, key and original headers: {why}, key {len(msg.key or b'')} bytes"
            await producer.send_and_wait(
                topic,
                value=b"",
                key=None,
                headers=[*dlq_headers, (DLQ_OMITTED_HEADER, omitted.encode())],
            )
        log.warning("deadletter.reduced", **event_fields(msg), error=repr(error)[:200])

    def _record(self, dead: DeadLetter) -> DeadLetter:
        self._next_id += 1
        recorded = dataclasses.replace(dead, id=str(self._next_id))
        self._ring[recorded.id] = recorded
        while len(self._ring) > self.ring_size:
            self._ring.popitem(last=False)
        self.published += 1
        for listener, _ in list(self._listeners.values()):
            try:
                listener(recorded)
            except Exception:
                log.exception("deadletter.listener_failed", id=recorded.id)
        return recorded

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ring)

    def get(self, dead_letter_id: str) -> DeadLetter | None:
        return self._ring.get(dead_letter_id)

    def recent(self) -> list[DeadLetter]:
        """Every dead letter held in memory, oldest first."""
        return list(self._ring.values())

    def select(
        self,
        filter: DeadLetterFilter | None = None,
        *,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters in memory matching ``filter`` and ``ids`` (when given),
        oldest first; with ``limit``, the newest ``limit`` of them. Never blocks."""
        if ids is not None:
            wanted = [self._ring[i] for i in dict.fromkeys(ids) if i in self._ring]
            wanted.sort(key=lambda d: int(d.id))
            found = wanted if filter is None else [d for d in wanted if filter.matches(d)]
        elif filter is None:
            found = list(self._ring.values())
        else:
            found = [d for d in self._ring.values() if filter.matches(d)]
        if limit is not None:
            found = found[-limit:] if limit > 0 else []
        return found

    def subscribe(
        self,
        after_id: str | None = None,
        *,
        topic: str | None = None,
        aggregate_id: str | None = None,
        error_type: str | None = None,
        reason: str | None = None,
        follow: bool = True,
        buffer: int = 1000,
    ) -> DeadLetterSubscription:
        """Iterate dead letters with an ID greater than ``after_id`` (all held in
        memory when ``None``) matching the filters, then, with ``follow``, new
        ones as they are published. Raises ``ValueError`` for a non-numeric
        ``after_id`` or ``buffer < 1``."""
        after = -1
        if after_id:
            try:
                after = int(after_id)
            except ValueError:
                raise ValueError(f"after_id must be a dead-letter ID, got {after_id!r}") from None
        flt = DeadLetterFilter(
            topic=topic or "",
            aggregate_id=aggregate_id or "",
            error_type=error_type or "",
            reason=reason or "",
        )
        return DeadLetterSubscription.open(
            lambda: [d for d in self._ring.values() if int(d.id) > after and flt.matches(d)],
            (lambda sub: self.add_listener(sub.push, on_close=sub.close)) if follow else None,
            flt.matches,
            buffer=buffer,
        )

    @property
    def subscriber_count(self) -> int:
        """Listeners and following subscriptions registered now."""
        return len(self._listeners)

    def add_listener(
        self, callback: DeadLetterListener, *, on_close: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Call ``callback`` synchronously for every dead letter recorded from now on
        (it must not block; exceptions are logged), and ``on_close`` when the
        sink stops (at once when it is stopped already). Returns an idempotent
        unsubscribe function."""
        if self._closed:
            if on_close is not None:
                on_close()
            return _nothing
        self._listener_ids += 1
        key = self._listener_ids
        self._listeners[key] = (callback, on_close)

        def unsubscribe() -> None:
            self._listeners.pop(key, None)

        return unsubscribe

    # -- redrive -------------------------------------------------------------------

    async def redrive(
        self, dead_letters: Iterable[DeadLetter]
    ) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
        """Republish each dead letter's original key, value and headers to its
        original topic, concurrently, waiting for every acknowledgement.

        Returns ``(republished, failed)``; ``failed`` pairs each dead letter
        with the error text. Republished dead letters are removed from memory.
        """
        producer = self._require_producer()
        items = list(dead_letters)
        results = await asyncio.gather(
            *(
                producer.send_and_wait(
                    d.message.topic,
                    value=d.message.value,
                    key=d.message.key,
                    headers=list(d.message.headers),
                )
                for d in items
            ),
            return_exceptions=True,
        )
        republished: list[DeadLetter] = []
        failed: list[tuple[DeadLetter, str]] = []
        for dead, result in zip(items, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed.append((dead, f"{type(result).__name__}: {result}"))
            else:
                republished.append(dead)
                self._ring.pop(dead.id, None)
        self.redriven += len(republished)
        if items:
            log.warning(
                "deadletter.redriven",
                republished=len(republished),
                failed=len(failed),
                ids=[d.id for d in republished][:50],
            )
        return republished, failed

    async def redrive_matching(
        self, *, ids: Sequence[str] = (), filter: DeadLetterFilter | None = None
    ) -> RedriveResult:
        """:meth:`redrive` the dead letters selected by ``ids`` (else ``filter``)."""
        chosen = self.select(filter, ids=ids) if ids else self.select(filter)
        republished, failed = await self.redrive(chosen)
        return RedriveResult(
            matched=len(chosen),
            republished=len(republished),
            failed=len(failed),
            errors={d.id: err for d, err in failed},
        )
