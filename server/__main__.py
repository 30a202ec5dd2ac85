"""``pool-server`` / ``python -m server``: run the service.

With ``--embedded`` (or no brokers configured) the embedded Tansu broker is
started on loopback and the configured topics (and their dead-letter topics)
are created on it; with ``--demo`` a demo producer feeds them. SIGTERM and
SIGINT stop it gracefully (see :mod:`server._service`); exit status 0 then,
2 for a configuration error (the handler is imported and checked with the
configuration, before anything starts; or the embedded broker wanted without
the ``embedded`` extra installed), 1 for a failure.

Expected failures — no broker answering, a port in use, the embedded broker
not starting — end with one line naming what failed (``service.failed`` with
``error=...``); their traceback only at ``--log-level debug``. Anything else is
a bug and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import sys
import traceback
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import prometheus_client
import structlog
from aiokafka.errors import KafkaConnectionError

from pool import Handler
from server._broker import (
    EMBEDDED_EXTRA_MISSING,
    BrokerError,
    EmbeddedBroker,
    embedded_broker_available,
)
from server._config import DEFAULT_HANDLER, ConfigError, Settings, load_settings
from server._demo_producer import DemoProducer
from server._grpc import GrpcConfigError
from server._handlers import HandlerLoadError, load_handler
from server._logging import configure_logging
from server._service import Endpoints, Service, ServiceStartError

_T = TypeVar("_T")

log = structlog.get_logger("server.main")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pool-server`` console script."""
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        if len(exc.errors) == 1:
            sys.stderr.write(f"pool-server: invalid configuration: {exc}\n")
        else:
            sys.stderr.write(f"pool-server: invalid configuration:\n{exc}\n")
        return 2
    if settings.use_embedded_broker and not embedded_broker_available():
        sys.stderr.write(f"pool-server: {EMBEDDED_EXTRA_MISSING}\n")
        return 2
    fmt = settings.log.format
    configure_logging(settings.log.level, None if fmt == "auto" else fmt == "json")
    # No `_created` series: ~2 500 per replica at the default pool sizes, unused
    # by the dashboard and the rules.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    # The handler is part of the configuration: a typo in it ends here, before
    # the broker, the consumer or the control plane start.
    try:
        handler = load_handler(settings.pool.handler)
    except HandlerLoadError as exc:
        sys.stderr.write(f"pool-server: {exc}\n")
        if settings.log.level == "debug":
            traceback.print_exception(exc)
        return 2
    try:
        return run_loop(run(settings, handler))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop where it is installed, else on asyncio's loop.

    ``POOL_EVENT_LOOP=asyncio`` forces the standard loop (debugging, comparison).
    """
    if os.environ.get("POOL_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def run(settings: Settings, handler: Handler | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status.

    ``handler`` is the loaded ``settings.pool.handler`` (loaded here when not given).
    """
    if handler is None:
        handler = load_handler(settings.pool.handler)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    broker: EmbeddedBroker | None = None
    broker_failed = False
    bootstrap = ",".join(settings.kafka.brokers)
    try:
        if settings.use_embedded_broker:
            broker = EmbeddedBroker()
            await asyncio.to_thread(broker.start)
            bootstrap = broker.bootstrap
            topics = dict.fromkeys(settings.kafka.topics, settings.embedded.partitions)
            for t in settings.kafka.topics:
                topics[settings.dead_letter.topic_for(t)] = 1
            await broker.create_topics(topics)
        await _serve(settings, bootstrap, handler, stop, embedded=broker is not None)
    except _EXPECTED as exc:
        broker_failed = isinstance(exc, BrokerError | KafkaConnectionError)
        _log_failure(settings, bootstrap, exc)
        return 1
    except Exception as exc:
        log.exception("service.failed", error=repr(exc))
        return 1
    else:
        return 0
    finally:
        if broker is not None:
            await asyncio.to_thread(functools.partial(broker.stop, keep_log=broker_failed))


#: Failures of the environment rather than bugs: logged as one line.
_EXPECTED = (ServiceStartError, GrpcConfigError, BrokerError, KafkaConnectionError)


def _log_failure(settings: Settings, bootstrap: str, exc: Exception) -> None:
    """One ``service.failed`` line naming what failed; the traceback at debug level."""
    error = (
        f"cannot connect to Kafka at {bootstrap} ({exc})"
        if isinstance(exc, KafkaConnectionError)
        else str(exc)
    )
    if settings.log.level == "debug":
        log.error("service.failed", error=error, exc_info=exc)
    else:
        log.error("service.failed", error=error)


async def _serve(
    settings: Settings, bootstrap: str, handler: Handler, stop: asyncio.Event, *, embedded: bool
) -> None:
    """Run the service (and the demo producer) until ``stop`` is set or the service fails."""
    if settings.pool.handler == DEFAULT_HANDLER:
        from server import demo as demo_handler

        demo_handler.configure(settings)
    demo: DemoProducer | None = None
    async with Service(settings, bootstrap_servers=bootstrap, handler=handler) as service:
        try:
            if settings.demo.enabled:
                demo = DemoProducer(
                    bootstrap,
                    settings.kafka.topics,
                    rate=settings.demo.rate,
                    aggregates=settings.demo.aggregates,
                )
                await demo.start()
            assert service.endpoints is not None
            _tune_gc()
            _banner(settings, service.endpoints, embedded=embedded)
            waiter = asyncio.ensure_future(service.wait())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)
            log.info("service.stopping", reason="signal" if stopper in done else "failure")
            if waiter in done:
                waiter.result()  # re-raise the consumer's failure
        finally:
            if demo is not None:
                await demo.stop()


def _tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes: at tens of thousands of events per second
    the default thresholds (a young collection every 700 allocations, full ones
    rescanning every queued event) cost more than the consumer itself (measured:
    ~50k -> ~100k events/s with a no-op handler). Start-up objects are frozen
    out of the collector's view; events are acyclic and freed by refcounting."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _banner(settings: Settings, ep: Endpoints, *, embedded: bool) -> None:
    lines = [
        "",
        "pool-server is running",
        f"  mode       {settings.mode} (rollout {settings.kafka.actor_pool.rollout_percent:g}%)",
        f"  broker     {ep.bootstrap_servers}" + (" (embedded Tansu)" if embedded else ""),
        f"  topics     {', '.join(ep.topics)}  group {ep.group_id}",
        f"  handler    {settings.pool.handler}",
    ]
    if settings.demo.enabled:
        lines.append(
            f"  demo       {settings.demo.rate:g} events/s over "
            f"{settings.demo.aggregates} aggregates"
        )
    if ep.metrics_address:
        lines.append(f"  metrics    http://{ep.metrics_address}/metrics")
    if ep.grpc_address:
        lines.append(f"  gRPC       {ep.grpc_address} (actorpool.control.v1.PoolControl)")
    lines.append("  (partitions show up once the consumer has joined its group: a few seconds)")
    lines.append("look at it:")
    if ep.metrics_address:
        lines.append(f"  curl -s http://{ep.metrics_address}/metrics | grep kafka_eventbus_")
    if ep.grpc_address:
        lines.append(f"  .venv/bin/poolctl --target {ep.grpc_address} status")
    lines.append("stop it with Ctrl-C (SIGINT) or SIGTERM: it drains and commits first.")
    sys.stdout.write("\n".join(lines) + "\n\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
