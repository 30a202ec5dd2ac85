"""The service process: settings -> handler -> pools -> switch -> DLQ sink ->
/metrics -> gRPC control plane -> fleet control (the control topic read to its
end and applied) -> consumer, started and stopped in order.

:class:`Service` implements :class:`server._control.ControlTarget`, so the
gRPC servicer drives it directly.

Shutdown (``stop()``, idempotent; what SIGTERM/SIGINT trigger): health
NOT_SERVING -> stop fetching -> wait for in-flight events up to
``pool.drainTimeoutS`` -> commit -> leave the group -> stop fleet control
(this replica's report tombstoned) -> close the pools and the dead-letter sink
-> stop gRPC -> stop /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from pool import (
    ActorPool,
    ActorPoolOptions,
    DeadLetter,
    Handler,
    KeyedWorkerPool,
    PoolOptions,
    PoolSwitch,
    PrometheusPoolMetrics,
    RetryPolicy,
)
from server._config import Settings
from server._consumer import DRAIN, OPERATOR, ConsumerOptions, EventConsumer
from server._consumer_metrics import ConsumerMetrics
from server._control import (
    CommittedOffset,
    ControlTarget,
    DeadLetterFilter,
    DrainIncompleteError,
    DrainProgress,
    DrainResult,
    NotReadyError,
    Partition,
    PoolStatus,
    PreconditionError,
    RedriveResult,
    ServiceStatus,
    UnknownPartitionError,
)
from server._dlq import DeadLetterSink
from server._errors import ServiceError
from server._fleet import FleetControl
from server._fleet_metrics import FleetMetrics
from server._fleet_service import build_fleet
from server._handlers import load_handler
from server._intake import Decoder
from server._process_metrics import AsyncioTasksCollector
from server._switch_metrics import SwitchMetrics
from server._version import version

log = structlog.get_logger("server.service")


class ServiceStartError(ServiceError, RuntimeError):
    """The service could not start for an operational reason — no Kafka broker
    answered, the ``/metrics`` port is taken — rather than a bug. The message
    names what failed and where, in one line; the cause is chained. Retriable:
    a later start may find the broker up and the port free."""

    retriable = True


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the running service listens (real ports, also when configured as 0)."""

    bootstrap_servers: str
    grpc_address: str | None
    metrics_address: str | None
    topics: tuple[str, ...]
    group_id: str


class Service:
    """The whole process as one object; ``async with Service(...)`` runs it.

    ``handler`` overrides ``settings.pool.handler`` (tests; ``pool-server`` passes
    the handler it loaded and checked with the configuration); ``registry``
    defaults to a fresh registry per service, served on ``/metrics``.
    ``grpc=False`` skips the control plane (in-process tests of the consumer).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        bootstrap_servers: str,
        handler: Handler | None = None,
        registry: CollectorRegistry | None = None,
        grpc: bool = True,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self._handler = handler
        self.registry = registry if registry is not None else _process_registry()
        self._grpc_enabled = grpc
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        self._switch: PoolSwitch | None = None
        self._sink: DeadLetterSink | None = None
        self._consumer: EventConsumer | None = None
        self._grpc: Any = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.endpoints: Endpoints | None = None
        self._started_at = time.monotonic()
        self._ready = False
        self._draining = False
        self._drain_lock = asyncio.Lock()
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        #: Fleet control (the control topic); ``None`` when disabled.
        self.fleet: FleetControl | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> Endpoints:
        s = self.settings
        handler = self._handler if self._handler is not None else load_handler(s.pool.handler)
        r = s.pool.retry
        retry = RetryPolicy(
            max_attempts=r.max_attempts,
            initial_backoff=r.initial_backoff,
            max_backoff=r.max_backoff,
            multiplier=r.multiplier,
            jitter=r.jitter,
        )
        pool_metrics = functools.partial(
            PrometheusPoolMetrics, registry=self.registry, per_executor=s.metrics.per_executor
        )
        p = s.pool
        keyed = KeyedWorkerPool(
            handler,
            PoolOptions(
                size=p.keyed.workers,
                capacity=p.keyed.queue_size,
                retry=retry,
                handler_timeout=p.handler_timeout_s,
                handler_threads=p.handler_threads,
                # The dead-letter sink logs each one once published (with its ID).
                log_dead_letters=False,
            ),
            metrics=pool_metrics("keyed", p.keyed.workers),
        )
        actor = ActorPool(
            handler,
            ActorPoolOptions(
                size=p.actor.actors,
                capacity=p.actor.inbox_size,
                max_restarts=p.actor.max_restarts,
                restart_window=p.actor.restart_window_s,
                retry=retry,
                handler_timeout=p.handler_timeout_s,
                handler_threads=p.handler_threads,
                log_dead_letters=False,
            ),
            metrics=pool_metrics("actor", p.actor.actors),
        )
        self._switch = PoolSwitch(
            keyed, actor, mode=s.mode, rollout_percent=s.kafka.actor_pool.rollout_percent
        )
        self._switch.start()
        self.switch_metrics = SwitchMetrics(self._switch, self.registry)
        self._switch.add_change_listener(self.switch_metrics.on_change)
        self._sink = DeadLetterSink.from_settings(s, self.bootstrap_servers)
        await self._connect("the dead-letter producer", AIOKafkaProducer, self._sink.start())
        c = s.kafka.consumer
        options = ConsumerOptions(
            bootstrap_servers=self.bootstrap_servers,
            group_id=c.group_id,
            topics=tuple(s.kafka.topics),
            client_id=c.client_id,
            commit_interval_s=c.commit_interval_ms / 1000,
            max_in_flight=c.max_in_flight,
            revoke_timeout_s=c.revoke_timeout_ms / 1000,
            max_records=c.max_poll_records,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            auto_offset_reset=c.auto_offset_reset,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=c.max_poll_interval_ms,
        )
        self._consumer = EventConsumer(
            options,
            decoder=Decoder(s),
            dispatcher=self._switch,
            dead_letters=self._sink,
            metrics=ConsumerMetrics(self.registry),
        )
        metrics_address = None
        if s.metrics.enabled:
            host, _, port = s.metrics.address.rpartition(":")
            try:
                self._http, self._http_thread = start_http_server(
                    int(port), addr=host, registry=self.registry
                )
            except OSError as exc:
                raise ServiceStartError(
                    f"cannot bind /metrics to {s.metrics.address}: {exc.strerror or exc}"
                ) from exc
            metrics_address = f"{host}:{self._http.server_address[1]}"
        grpc_address = None
        if self._grpc_enabled:
            grpc_address = await self._start_grpc()
        if s.control.enabled:
            # Before the first fetch: the fleet's desired state wins over the
            # configuration. Broker trouble does not fail the start here (the
            # replica runs degraded on its configuration and retries); no broker
            # at all failed above, at the dead-letter producer.
            self.fleet = build_fleet(self, grpc_address)
            FleetMetrics(self.fleet, self.registry, self._fleet_differences)
            await self.fleet.start()
        await self._connect("the consumer", AIOKafkaConsumer, self._consumer.start())
        self._ready = True
        if self._grpc is not None:
            await self._grpc.set_ready(True)
        self.endpoints = Endpoints(
            bootstrap_servers=self.bootstrap_servers,
            grpc_address=grpc_address,
            metrics_address=metrics_address,
            topics=tuple(s.kafka.topics),
            group_id=c.group_id,
        )
        log.info(
            "service.started",
            mode=str(s.mode),
            grpc=grpc_address,
            metrics=metrics_address,
            bootstrap=self.bootstrap_servers,
            topics=list(s.kafka.topics),
            group_id=c.group_id,
        )
        return self.endpoints

    async def _connect(self, who: str, client: type, start: Awaitable[None]) -> None:
        """Await ``start`` (a Kafka client connecting); no broker answering becomes a
        :class:`ServiceStartError` naming the brokers and the connect timeout."""
        try:
            await start
        except KafkaConnectionError as exc:
            timeout_ms = inspect.signature(client).parameters["request_timeout_ms"].default
            raise ServiceStartError(
                f"cannot connect to Kafka at {self.bootstrap_servers}: no broker answered "
                f"{who} (connect timeout {timeout_ms / 1000:g} s each)"
            ) from exc

    async def _start_grpc(self) -> str:
        from server._grpc import TlsFiles, start_grpc_server

        g = self.settings.grpc
        tls = None
        if g.tls.cert_file is not None and g.tls.key_file is not None:
            tls = TlsFiles(g.tls.cert_file, g.tls.key_file, g.tls.client_ca_file)
        self._grpc = await start_grpc_server(
            self,
            address=g.address,
            admin_token=g.admin_token or None,
            read_token=g.read_token or None,
            allow_insecure_remote=g.allow_insecure_remote,
            tls=tls,
            ready=False,
            registry=self.registry,
        )
        host = g.address.rpartition(":")[0]
        return f"{host}:{self._grpc.port}"

    async def __aenter__(self) -> Service:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Return when the service stopped, or raise a consumer task's failure."""
        if self._stopped.is_set():
            return
        consumer = self._consumer
        if consumer is None:
            await self._stopped.wait()
            return
        if consumer.failure is not None:
            raise consumer.failure
        stopped = asyncio.ensure_future(self._stopped.wait())
        failed = asyncio.ensure_future(consumer.failed())
        try:
            await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (stopped, failed):
                waiter.cancel()
            await asyncio.gather(stopped, failed, return_exceptions=True)
        if stopped.cancelled():  # it was not what ended the wait: the failure was
            raise failed.result()

    async def stop(self) -> None:
        """Graceful stop in the documented order. Idempotent; concurrent calls share it."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        started = time.monotonic()
        self._ready = False
        left = 0
        try:
            if self._grpc is not None:
                with contextlib.suppress(Exception):
                    await self._grpc.set_ready(False)
            consumer = self._consumer
            if consumer is not None:
                await consumer.stop_fetching()
                left = await consumer.wait_finished(self.settings.pool.drain_timeout_s)
                await consumer.commit()
                await consumer.close()
            if self.fleet is not None:
                await self.fleet.stop()
            if self._switch is not None:
                await self._switch.close(timeout=0 if left else 1.0)
            if self._sink is not None:
                await self._sink.stop()
            if self._grpc is not None:
                await self._grpc.stop(grace=2.0)
        finally:
            if self._http is not None:
                await asyncio.to_thread(self._http.shutdown)
                self._http.server_close()
                if self._http_thread is not None:
                    self._http_thread.join(timeout=5)
                self._http = None
            self._stopped.set()
            log.info(
                "service.stopped",
                unfinished=left,
                took_ms=round((time.monotonic() - started) * 1000, 1),
            )

    # -------------------------------------------------------- ControlTarget

    @property
    def switch(self) -> PoolSwitch:
        if self._switch is None:
            raise NotReadyError("the service is not started")
        return self._switch

    @property
    def consumer(self) -> EventConsumer:
        if self._consumer is None:
            raise NotReadyError("the service is not started")
        return self._consumer

    @property
    def grpc_server(self) -> Any:
        """The running control plane (a ``GrpcServerHandle``), or ``None``."""
        return self._grpc

    @property
    def dead_letter_sink(self) -> DeadLetterSink:
        if self._sink is None:
            raise NotReadyError("the service is not started")
        return self._sink

    def status(self) -> ServiceStatus:
        switch = self._switch
        consumer = self._consumer
        pools: list[PoolStatus] = []
        restarts = 0
        if switch is not None:
            for mode, pool in switch.pools.items():
                pool_restarts = int(getattr(pool, "restarts", 0))
                restarts += pool_restarts
                pools.append(
                    PoolStatus(
                        mode=mode,
                        size=pool.size,
                        capacity=pool.capacity,
                        in_flight=pool.in_flight,
                        restarts=pool_restarts,
                    )
                )
        s = self.settings
        return ServiceStatus(
            mode=switch.mode if switch is not None else s.mode,
            rollout_percent=(
                switch.rollout_percent if switch is not None else s.kafka.actor_pool.rollout_percent
            ),
            generation=switch.generation if switch is not None else 0,
            since=switch.since if switch is not None else time.time(),
            partitions=consumer.partition_status() if consumer is not None else (),
            in_flight=consumer.in_flight if consumer is not None else 0,
            pools=tuple(pools),
            restarts=restarts,
            dead_letters=self._sink.published if self._sink is not None else 0,
            uptime_s=time.monotonic() - self._started_at,
            version=version(),
            ready=self._ready,
            draining=self._draining,
            group_id=s.kafka.consumer.group_id,
            instance=self.instance,
        )

    def _fleet_differences(self) -> list[str]:
        """How this replica differs from the fleet's desired state."""
        if self.fleet is None or self._consumer is None or self._switch is None:
            return []
        return self.fleet.own_differences()

    def _check_ready(self) -> EventConsumer:
        if not self._ready or self._consumer is None:
            raise NotReadyError("the service is starting or stopping")
        return self._consumer

    def _resolve(self, partitions: Sequence[Partition] | None) -> list[TopicPartition] | None:
        consumer = self._check_ready()
        if partitions is None:
            return None
        tps = [TopicPartition(t, p) for t, p in partitions]
        owned = set(consumer.assignment)
        unknown = [tp for tp in tps if tp not in owned]
        if unknown:
            raise UnknownPartitionError([(tp.topic, tp.partition) for tp in unknown])
        return tps

    async def pause(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        tps = self._resolve(partitions)
        paused = self.consumer.hold(OPERATOR, tps)
        log.info("consumer.paused", partitions=_names(paused))
        return [(tp.topic, tp.partition) for tp in paused]

    async def resume(self, partitions: Sequence[Partition] | None = None) -> list[Partition]:
        tps = self._resolve(partitions)
        resumed = self.consumer.release((OPERATOR, DRAIN), tps)
        log.info("consumer.resumed", partitions=_names(resumed))
        return [(tp.topic, tp.partition) for tp in resumed]

    async def drain(
        self,
        *,
        timeout: float,
        partitions: Sequence[Partition] | None = None,
        resume_after: bool = False,
        progress: Callable[[DrainProgress], None] | None = None,
    ) -> DrainResult:
        tps = self._resolve(partitions)
        if self._drain_lock.locked():
            raise PreconditionError("a drain is already running")
        consumer = self.consumer
        async with self._drain_lock:
            self._draining = True
            started = time.monotonic()
            finished_before = consumer.finished_total
            try:
                held = consumer.hold(DRAIN, tps)
                left = await consumer.wait_finished(timeout, tps, progress)
                await consumer.commit(tps)
                # Report where every drained partition now stands (also those an
                # interval commit had already brought up to date).
                wanted = None if tps is None else set(tps)
                committed = [
                    CommittedOffset(p.topic, p.partition, p.committed)
                    for p in consumer.partition_status()
                    if p.committed is not None
                    and (wanted is None or TopicPartition(p.topic, p.partition) in wanted)
                ]
                resumed = False
                if resume_after:
                    consumer.release((DRAIN,), tps)
                    resumed = True
            finally:
                self._draining = False
            result = DrainResult(
                finished=consumer.finished_total - finished_before,
                took_s=time.monotonic() - started,
                committed=tuple(committed),
                remaining=left,
                partitions=tuple((tp.topic, tp.partition) for tp in held),
                resumed=resumed,
            )
            self.switch_metrics.observe_drain(result.took_s, complete=not left)
            log.info(
                "service.drained",
                finished=result.finished,
                remaining=left,
                took_ms=round(result.took_s * 1000, 1),
                committed=len(committed),
            )
            if left:
                raise DrainIncompleteError(result, timeout)
            return result

    def select_dead_letters(
        self, filter: DeadLetterFilter, limit: int | None = None
    ) -> list[DeadLetter]:
        if self._sink is None:
            return []
        return self._sink.select(filter, limit=limit)

    def subscribe_dead_letters(self, callback: Callable[[DeadLetter], None]) -> Callable[[], None]:
        return self.dead_letter_sink.add_listener(callback)

    async def redrive(
        self, *, ids: Sequence[str] = (), filter: DeadLetterFilter | None = None
    ) -> RedriveResult:
        if not self._ready or self._sink is None:
            raise NotReadyError("the service is starting or stopping")
        return await self._sink.redrive_matching(ids=ids, filter=filter)


def _names(tps: Sequence[TopicPartition]) -> list[str]:
    return [f"{tp.topic}:{tp.partition}" for tp in tps]


def _process_registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and GC collectors (and the
    asyncio task count, when created on a running loop)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    with contextlib.suppress(RuntimeError):  # no running loop
        AsyncioTasksCollector(asyncio.get_running_loop(), registry=registry)
    return registry


def _conforms(service: Service) -> ControlTarget:
    """Static check (mypy): :class:`Service` is a :class:`ControlTarget`."""
    return service
