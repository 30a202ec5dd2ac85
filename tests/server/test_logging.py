"""server._logging: JSON lines off a terminal, console on one, stdlib routed, context merged."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from pool import Message
from server._logging import bind_event, configure_logging, event_fields


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _message() -> Message:
    return Message(
        topic="orders",
        partition=3,
        offset=42,
        key=b"order-7",
        value=b"{}",
        headers=(),
        aggregate_id="order-7",
        timestamp_ms=1_700_000_000_000,
    )


def test_json_line_has_timestamp_level_logger_event_and_keys() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    structlog.get_logger("server.test").info("pool.switched", from_mode="keyed", took_ms=3.5)
    (line,) = _lines(out)
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]
    assert line["event"] == "pool.switched"
    assert line["level"] == "info"
    assert line["logger"] == "server.test"
    assert line["from_mode"] == "keyed"
    assert line["took_ms"] == 3.5
    ts = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() is not None
    assert ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - ts).total_seconds()) < 60


def test_stdlib_records_are_rendered_by_the_same_processors() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    logging.getLogger("aiokafka.consumer").warning("heartbeat failed for group %s", "g1")
    (line,) = _lines(out)
    assert line["event"] == "heartbeat failed for group g1"
    assert line["level"] == "warning"
    assert line["logger"] == "aiokafka.consumer"
    assert "timestamp" in line


def test_contextvars_are_merged_into_structlog_and_stdlib_lines() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    structlog.contextvars.bind_contextvars(request_id="req-1", method="SetPoolMode")
    structlog.get_logger().info("rpc.done")
    logging.getLogger("grpc").warning("from grpc")
    structlog.contextvars.clear_contextvars()
    structlog.get_logger().info("after")
    first, second, third = _lines(out)
    assert first["request_id"] == "req-1"
    assert first["method"] == "SetPoolMode"
    assert second["request_id"] == "req-1"
    assert "request_id" not in third


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("warning", json=True, stream=out)
    structlog.get_logger().info("dropped")
    structlog.get_logger().debug("dropped")
    logging.getLogger("aiokafka").info("dropped")
    structlog.get_logger().warning("kept")
    logging.getLogger("aiokafka").error("kept too")
    assert [line["event"] for line in _lines(out)] == ["kept", "kept too"]


def test_debug_level_emits_debug_lines() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", json=True, stream=out)
    structlog.get_logger().debug("event.dispatched")
    assert [line["level"] for line in _lines(out)] == ["debug"]


def test_unknown_level_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose", stream=io.StringIO())


def test_event_fields_and_bind_event_carry_coordinates() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    msg = _message()
    assert event_fields(msg) == {
        "topic": "orders",
        "partition": 3,
        "offset": 42,
        "aggregate_id": "order-7",
    }
    log = structlog.get_logger("server.consumer")
    bind_event(log, msg).warning("handler.failed", error="boom")
    log.info("unbound")
    bound, unbound = _lines(out)
    assert bound["topic"] == "orders"
    assert bound["partition"] == 3
    assert bound["offset"] == 42
    assert bound["aggregate_id"] == "order-7"
    assert bound["error"] == "boom"
    assert "offset" not in unbound


def test_exceptions_are_structured_in_json() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        structlog.get_logger().exception("handler.crashed")
    (line,) = _lines(out)
    assert line["level"] == "error"
    (exc,) = line["exception"]
    assert exc["exc_type"] == "RuntimeError"
    assert exc["exc_value"] == "kaput"


def _log_a_failure_with_a_secret_local() -> None:
    token = "s3cret-admin-token"
    try:
        raise RuntimeError(f"kaput after {len(token)} characters")
    except RuntimeError:
        structlog.get_logger().exception("handler.crashed")


def test_json_tracebacks_carry_no_frame_locals() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    _log_a_failure_with_a_secret_local()
    (line,) = _lines(out)
    (exc,) = line["exception"]
    assert exc["frames"]
    assert [frame for frame in exc["frames"] if "locals" in frame] == []
    assert "s3cret" not in out.getvalue()


def test_console_tracebacks_are_plain_without_locals() -> None:
    out = _Tty()
    configure_logging("info", json=False, stream=out)
    _log_a_failure_with_a_secret_local()
    text = out.getvalue()
    assert "Traceback (most recent call last):" in text
    assert "RuntimeError: kaput after 18 characters" in text
    assert "s3cret" not in text


def test_auto_mode_is_json_off_a_terminal_and_console_on_one() -> None:
    pipe = io.StringIO()
    configure_logging("info", stream=pipe)
    structlog.get_logger().info("auto.json", n=1)
    assert _lines(pipe)[0]["event"] == "auto.json"

    tty = _Tty()
    configure_logging("info", stream=tty)
    structlog.get_logger().info("auto.console", n=1)
    text = tty.getvalue()
    assert "auto.console" in text
    assert "n" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_reconfiguring_replaces_the_previous_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=first)
    configure_logging("info", json=True, stream=second)
    structlog.get_logger().info("once")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


def test_a_real_process_with_piped_stderr_writes_json_lines() -> None:
    code = (
        "import logging, structlog\n"
        "from server._logging import configure_logging\n"
        "configure_logging()\n"
        "structlog.get_logger('svc').info('service.started', grpc='127.0.0.1:1')\n"
        "logging.getLogger('aiokafka').warning('rebalance')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["service.started", "rebalance"]
    assert lines[0]["grpc"] == "127.0.0.1:1"
    assert lines[1]["logger"] == "aiokafka"
    assert proc.stdout == ""
