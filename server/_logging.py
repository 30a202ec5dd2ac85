"""Structured logging for the service: structlog key/value events, one line each.

Call :func:`configure_logging` once at start-up (``pool-server`` does). After it:

- every line is a structlog event (``log.info("pool.switched", from_mode=..., took_ms=...)``)
  with ``timestamp`` (ISO 8601, UTC), ``level``, ``logger`` and ``event``;
- the output is JSON lines when stderr is not a terminal (containers, CI, files)
  and a readable, coloured console rendering when it is;
- stdlib ``logging`` records (aiokafka, grpc, asyncio) go through the same
  processors, so they come out in the same format with the same keys;
- context bound with ``structlog.contextvars`` (the gRPC interceptor binds the
  request ID, method and caller per request) is merged into every line.

Lines about one event carry its ``topic``, ``partition``, ``offset`` and
``aggregate_id``: build them with :func:`event_fields` or :func:`bind_event`.

**No per-event INFO lines, anywhere.** At thousands of events per second a line
per event is the bottleneck and the bill. Per-event facts belong in metrics;
the log gets state changes (assignment, switch, drain, pause), failures
(a handler error at WARNING with the event's coordinates, a dead letter at
ERROR) and DEBUG lines that are off by default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import IO, Any, Final, Protocol

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

__all__ = ["LEVELS", "bind_event", "configure_logging", "event_fields"]

#: Accepted level names (case-insensitive) and their stdlib numbers.
LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _EventLike(Protocol):
    """What :func:`event_fields` reads: :class:`pool.Message` satisfies it."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def aggregate_id(self) -> str: ...


class _OurHandler(logging.StreamHandler[IO[str]]):
    """Marks the root handler installed here, so reconfiguring replaces only it."""


_FIRST_KEYS: Final = ("timestamp", "level", "logger", "event")


def _keys_first(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, logger and event first, so JSON lines read left to right."""
    head = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    head.update(event_dict)
    return head


def _level_number(level: str) -> int:
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        names = ", ".join(k for k in LEVELS if k != "warn")
        raise ValueError(f"unknown log level {level!r}: expected one of {names}") from None


def configure_logging(
    level: str = "info",
    json: bool | None = None,
    *,
    stream: IO[str] | None = None,
) -> None:
    """Configure structlog and stdlib logging for the whole process.

    ``level``: debug, info, warning, error or critical (case-insensitive);
    ``ValueError`` names the bad value otherwise. ``json``: ``True`` for JSON
    lines, ``False`` for the console renderer, ``None`` (default) to choose by
    whether ``stream`` is a terminal. ``stream`` defaults to ``sys.stderr``
    (read at call time). Calling it again replaces the previous configuration.
    """
    levelno = _level_number(level)
    out: IO[str] = sys.stderr if stream is None else stream
    if json is None:
        isatty = getattr(out, "isatty", None)
        json = not (callable(isatty) and isatty())

    # Run on structlog events and on stdlib records alike.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: list[Processor]
    # Tracebacks without frame locals, in both renderings: locals make one line
    # several kilobytes (the settings, the whole service object) and may carry
    # secrets such as the gRPC tokens.
    if json:
        renderer = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.UnicodeDecoder(),
            _keys_first,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=bool(out.isatty()), exception_formatter=structlog.dev.plain_traceback
            )
        ]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure_logging() (tests, reload) takes effect
        # for loggers created at import time too. Logging is off the hot path.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = _OurHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)


def event_fields(event: _EventLike) -> dict[str, Any]:
    """The keys every log line about one event carries.

    ``topic``, ``partition``, ``offset`` and ``aggregate_id``; use as
    ``log.warning("handler.failed", **event_fields(message), error=...)``.
    """
    return {
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "aggregate_id": event.aggregate_id,
    }


def bind_event(logger: Any, event: _EventLike) -> Any:
    """Return ``logger`` bound to the event's topic, partition, offset and aggregate ID.

    Works with any structlog logger (``structlog.get_logger()``, a bound one);
    the original logger is unchanged.
    """
    return logger.bind(**event_fields(event))
