"""``python -m server`` failing to start, as real processes: the exit status and
what an operator reads on stderr.

A configuration error (the handler included) exits 2 with one line, before
anything starts. An expected operational failure (no broker answering, a port
in use, the embedded broker not starting) exits 1 with one ``service.failed``
line naming what failed, no traceback unless ``--log-level debug``, nothing left
open. A bug still gets its traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from server._broker import EmbeddedBroker, find_free_port

# They start the service as a process: the slow lane, not in make test-fast.
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
FREE_PORTS = ["--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"]


def _run(
    args: list[str], tmp_path: Path, *, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m server ARGS`` (or ``python -c CODE ARGS``) with its own temporary
    directory (``TMPDIR``), so the test sees every file it leaves there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **(env or {})}
    prefix = ["-c", code] if code is not None else ["-m", "server"]
    return subprocess.run(
        [sys.executable, *prefix, *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _failed(stderr: str) -> dict[str, Any]:
    (record,) = [r for r in _records(stderr) if r["event"] == "service.failed"]
    return record


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    proc = _run(["--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"pool-server {metadata.version('kafka-actor-pool')}\n"


@pytest.mark.parametrize(
    ("handler", "problem"),
    [
        ("no_such_pkg.handlers:handle", "module 'no_such_pkg.handlers' not found"),
        (
            "tests.server.recording_handler:nope",
            "'tests.server.recording_handler' has no attribute 'nope'",
        ),
        ("tests.server.recording_handler:_latency", "'_latency' is a float, not callable"),
    ],
)
def test_an_unusable_handler_exits_2_with_one_line_before_anything_starts(
    tmp_path: Path, handler: str, problem: str
) -> None:
    # --embedded: the broker would be the first thing to start.
    proc = _run(["--embedded", "--handler", handler, *FREE_PORTS], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"pool-server: handler {handler!r}: {problem}"]
    assert proc.stdout == ""
    assert list((tmp_path / "tmp").iterdir()) == []  # no broker log: no broker


def test_an_unreadable_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    proc = _run(["--config", str(missing)], tmp_path)
    assert proc.returncode == 2
    line = f"pool-server: invalid configuration: --config {missing}: cannot read: No such file"
    assert proc.stderr.splitlines() == [f"{line} or directory"]


def test_no_broker_answering_fails_with_one_line_naming_the_brokers_and_closes_its_clients(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    proc = _run(["--brokers", address, *FREE_PORTS, "--set", "log.format=json"], tmp_path)
    assert proc.returncode == 1
    assert "Unclosed" not in proc.stderr  # the dead-letter producer was stopped
    assert "Traceback" not in proc.stderr
    failed = _failed(proc.stderr)
    assert failed["level"] == "error"
    assert failed["error"] == (
        f"cannot connect to Kafka at {address}: no broker answered the dead-letter "
        "producer (connect timeout 40 s each)"
    )
    assert "exception" not in failed


def test_on_a_terminal_the_failure_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    address = f"127.0.0.1:{find_free_port()}"
    proc = _run(["--brokers", address, *FREE_PORTS, "--set", "log.format=console"], tmp_path)
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.splitlines() if "service.failed" in line]
    assert f"cannot connect to Kafka at {address}" in line
    assert "Traceback" not in proc.stderr
    assert "Unclosed" not in proc.stderr


def test_at_debug_level_the_failure_carries_its_traceback_without_frame_locals(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{find_free_port()}"
    args = ["--brokers", address, *FREE_PORTS, "--set", "log.format=json", "--log-level", "debug"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    failed = _failed(proc.stderr)
    types = [exc["exc_type"] for exc in failed["exception"]]
    assert types == ["ServiceStartError", "KafkaConnectionError"]
    frames = [frame for exc in failed["exception"] for frame in exc["frames"]]
    assert frames
    assert not [frame for frame in frames if "locals" in frame]
    assert len(json.dumps(failed)) < 4000


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--metrics-address", "cannot bind /metrics to 127.0.0.1:{port}: Address already in use"),
        ("--grpc-address", "cannot bind the control API to 127.0.0.1:{port}"),
    ],
)
def test_a_busy_port_fails_with_one_line_naming_the_address(
    broker: EmbeddedBroker, tmp_path: Path, taken_port: int, flag: str, message: str
) -> None:
    ports = dict(zip(FREE_PORTS[::2], FREE_PORTS[1::2], strict=True))
    ports[flag] = f"127.0.0.1:{taken_port}"
    args = [
        "--brokers", broker.bootstrap,
        "--topic", f"startup-{os.getpid()}",
        *(word for pair in ports.items() for word in pair),
        "--set", "log.format=json",
    ]  # fmt: skip
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    failed = _failed(proc.stderr)
    assert failed["error"].startswith(message.format(port=taken_port))
    assert "exception" not in failed
    assert "Unclosed" not in proc.stderr


def test_an_embedded_broker_that_does_not_start_names_its_log_and_keeps_it(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'tansu: cannot open the storage' >&2\nexit 3\n")
    fake.chmod(0o755)
    proc = _run(
        ["--embedded", *FREE_PORTS, "--set", "log.format=json"],
        tmp_path,
        env={"CALF_TANSU_BIN": str(fake)},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (log,) = (tmp_path / "tmp").glob("tansu-*.log")
    assert _failed(proc.stderr)["error"] == (
        f"embedded broker failed to start: exited with code 3 (its log: {log})"
    )
    assert "tansu: cannot open the storage" in log.read_text()


BUG = """
import sys
import server._dlq

async def start(self):
    raise ZeroDivisionError("a bug in start-up")

server._dlq.DeadLetterSink.start = start
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_is_still_logged_with_its_traceback(broker: EmbeddedBroker, tmp_path: Path) -> None:
    args = ["--brokers", broker.bootstrap, *FREE_PORTS, "--set", "log.format=json"]
    proc = _run(args, tmp_path, code=BUG)
    assert proc.returncode == 1
    failed = _failed(proc.stderr)
    assert failed["error"] == "ZeroDivisionError('a bug in start-up')"
    (exc,) = failed["exception"]
    assert exc["exc_type"] == "ZeroDivisionError"
    assert exc["frames"][-1]["name"] == "start"
