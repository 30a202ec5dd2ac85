"""Service configuration: YAML file, then environment, then command-line flags.

The shape lives under an ``eventbus:`` root with camelCase keys; the Go
original's keys stay valid (``eventbus.kafka.brokers``,
``eventbus.kafka.consumer.groupId``, ``eventbus.kafka.actorPool.enabled``).
Sources, each overriding the one before:

1. the YAML file (``--config FILE``, else ``$POOL_CONFIG``; optional);
2. the environment:
   - any key as ``EVENTBUS__<SECTION>__...__<KEY>``, segments separated by a
     double underscore and matched case-insensitively with ``_``/``-``
     ignored, e.g. ``EVENTBUS__KAFKA__BROKERS=a:9092,b:9092`` or
     ``EVENTBUS__POOL__ACTOR__INBOX_SIZE=500``;
   - ``KAFKA_USE_ACTOR_POOL=true|false`` (also 1/0, yes/no, on/off) sets
     ``eventbus.kafka.actorPool.enabled`` both ways, and wins over the
     general form;
3. flags (``--brokers``, ``--mode``, ..., and ``--set key.path=value``).

Values from the environment and ``--set`` are parsed as YAML scalars
(``true``, ``5``, ``[a, b]``); lists of brokers and topics also accept a
comma-separated string. Unknown keys are errors (typos do not pass
silently). Every validation error raises :class:`ConfigError` naming the key
path, e.g. ``eventbus.pool.actor.inboxSize: must be >= 1 (got 0)``.

With no brokers configured, the embedded broker is implied
(``embedded.enabled`` becomes true); with the embedded broker enabled,
configured brokers are ignored and the entry point uses the embedded one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator as _model_validator
from pydantic.alias_generators import to_camel

from pool import PoolMode
from server._errors import ServiceError
from server._version import version

__all__ = [
    "ConfigError",
    "ControlSettings",
    "DeadLetterSettings",
    "DemoSettings",
    "EmbeddedSettings",
    "GrpcSettings",
    "IntakeSettings",
    "KafkaSettings",
    "LogSettings",
    "MetricsSettings",
    "PoolSettings",
    "Settings",
    "build_arg_parser",
    "load_settings",
]

ENV_PREFIX = "EVENTBUS__"
ENV_CONFIG_FILE = "POOL_CONFIG"
ENV_USE_ACTOR_POOL = "KAFKA_USE_ACTOR_POOL"
DEFAULT_HANDLER = "server.demo:handle"

_TRUE = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "off", "n", "f"})


class ConfigError(ServiceError, ValueError):
    """The configuration is invalid. ``errors`` lists ``(key_path, message)``."""

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(f"{path}: {msg}" for path, msg in self.errors))


# -- the model -----------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
    )


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port!r}")
    return value


def host_is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, brackets stripped) is loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_is_loopback(address: str) -> bool:
    """Whether ``host:port`` binds only to the loopback interface."""
    return host_is_loopback(address.rpartition(":")[0].strip("[]"))


class ConsumerSettings(_Section):
    group_id: str = Field(default="kafka-actor-pool", min_length=1)
    client_id: str = Field(default="kafka-actor-pool", min_length=1)
    #: How often finished offsets are committed (also on revoke and shutdown).
    commit_interval_ms: int = Field(default=1000, ge=10)
    #: Bound on events dispatched and not yet finished, across partitions.
    max_in_flight: int = Field(default=20_000, ge=1)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_poll_records: int = Field(default=500, ge=1)
    #: How long the broker may hold a fetch when there is no data. Kafka answers
    #: as soon as data arrives; the embedded broker holds every fetch about half
    #: this long, so there it adds up to that to produce-to-handle latency
    #: (10 and 5 ms were measured: docs/performance.md).
    fetch_max_wait_ms: int = Field(default=20, ge=0, le=60_000)
    session_timeout_ms: int = Field(default=10_000, ge=500)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    #: On revoke, how long to wait for the revoked partitions' in-flight events.
    revoke_timeout_ms: int = Field(default=30_000, ge=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    @_model_validator(mode="after")
    def _check_timeouts(self) -> ConsumerSettings:
        if self.revoke_timeout_ms >= self.max_poll_interval_ms:
            raise ValueError("revokeTimeoutMs must be below maxPollIntervalMs")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeatIntervalMs must be below sessionTimeoutMs")
        return self


class ActorPoolSettings(_Section):
    #: The original's feature switch: true starts in ACTOR mode, false in KEYED.
    enabled: bool = False
    #: In ACTOR mode, the share of aggregates (sticky by hash) on the actor pool.
    rollout_percent: float = Field(default=100.0, ge=0.0, le=100.0)


class KafkaSettings(_Section):
    brokers: tuple[str, ...] = ()
    topics: tuple[str, ...] = ("events",)
    consumer: ConsumerSettings = ConsumerSettings()
    actor_pool: ActorPoolSettings = ActorPoolSettings()

    @field_validator("brokers", "topics", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("brokers")
    @classmethod
    def _check_brokers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for broker in value:
            _check_address(broker)
        return value

    @field_validator("topics")
    @classmethod
    def _check_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one topic is required")
        for topic in value:
            if not topic or len(topic) > 249 or not all(c.isalnum() or c in "._-" for c in topic):
                raise ValueError(f"invalid topic name {topic!r}")
        return value


class KeyedSettings(_Section):
    workers: int = Field(default=256, ge=1, le=65536)
    queue_size: int = Field(default=1000, ge=1)


class ActorSettings(_Section):
    actors: int = Field(default=256, ge=1, le=65536)
    inbox_size: int = Field(default=1000, ge=1)
    max_restarts: int = Field(default=3, ge=0)
    restart_window_s: float = Field(default=60.0, gt=0)


class RetrySettings(_Section):
    max_attempts: int = Field(default=3, ge=1)
    initial_backoff_ms: float = Field(default=100.0, ge=0)
    max_backoff_ms: float = Field(default=5000.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)

    @property
    def initial_backoff(self) -> float:
        """Seconds (what :class:`pool.RetryPolicy` takes)."""
        return self.initial_backoff_ms / 1000.0

    @property
    def max_backoff(self) -> float:
        """Seconds (what :class:`pool.RetryPolicy` takes)."""
        return self.max_backoff_ms / 1000.0


class PoolSettings(_Section):
    keyed: KeyedSettings = KeyedSettings()
    actor: ActorSettings = ActorSettings()
    retry: RetrySettings = RetrySettings()
    #: Import path ``package.module:callable`` of the handler.
    handler: str = DEFAULT_HANDLER
    #: Threads for plain (non-async) handlers.
    handler_threads: int = Field(default=32, ge=1, le=4096)
    #: Per-call handler timeout in seconds; null disables it.
    handler_timeout_s: float | None = Field(default=30.0, gt=0)
    #: Shutdown: how long to wait for in-flight events before committing and exiting.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    #: SetPoolMode/SetRollout default wait for aggregates in flight in the old pool.
    switch_wait_timeout_s: float = Field(default=5.0, ge=0)

    @field_validator("handler")
    @classmethod
    def _check_handler(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"must be 'package.module:callable', got {value!r}")
        return value


class IntakeSettings(_Section):
    max_value_bytes: int = Field(default=1024 * 1024, ge=1)
    #: No aggregate ID: route by ``topic/partition/offset``, or dead-letter it.
    missing_id_policy: Literal["route-by-offset", "dead-letter"] = "route-by-offset"


class DeadLetterSettings(_Section):
    #: Dead-letter topic for a source topic; ``{topic}`` is replaced.
    topic_template: str = "{topic}.dlq"
    #: Recent dead letters kept in memory for the gRPC stream.
    ring_size: int = Field(default=10_000, ge=1)

    @field_validator("topic_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            rendered = value.format(topic="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid template {value!r}: only {{topic}} is allowed") from exc
        if not rendered:
            raise ValueError("must not be empty")
        return value

    def topic_for(self, topic: str) -> str:
        return self.topic_template.format(topic=topic)


class TlsSettings(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    #: When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None

    @_model_validator(mode="after")
    def _check_pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("certFile and keyFile must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("clientCaFile requires certFile and keyFile")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class GrpcSettings(_Section):
    address: str = "127.0.0.1:50051"
    #: Bearer token for every call. With neither token set nothing is checked,
    #: which is allowed on a loopback address only.
    admin_token: str = ""
    #: Bearer token for read-only calls (a read token on a mutating call is
    #: PERMISSION_DENIED). With only this one set, mutating calls are refused.
    read_token: str = ""
    #: Allow a non-loopback address without TLS and authentication.
    allow_insecure_remote: bool = False
    tls: TlsSettings = TlsSettings()

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _check_address(value)

    @_model_validator(mode="after")
    def _check_remote(self) -> GrpcSettings:
        if address_is_loopback(self.address) or self.allow_insecure_remote:
            return self
        if not self.tls.enabled:
            raise ValueError(
                f"address {self.address} is not loopback: configure tls.certFile/keyFile "
                "or set allowInsecureRemote: true"
            )
        if not (self.admin_token or self.read_token or self.tls.client_ca_file):
            raise ValueError(
                f"address {self.address} is not loopback: set adminToken (and readToken) "
                "or tls.clientCaFile, or set allowInsecureRemote: true"
            )
        return self


class MetricsSettings(_Section):
    enabled: bool = True
    address: str = "127.0.0.1:2112"
    #: Export the pools' metrics per executor (``actor_id``/``worker_id`` labels):
    #: about 13 000 series with the default pool sizes, instead of one per pool.
    per_executor: bool = False

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _check_address(value)


class EmbeddedSettings(_Section):
    #: Start the embedded Tansu broker (implied when no brokers are configured).
    enabled: bool = False
    #: Partitions of each topic the service creates on the embedded broker.
    partitions: int = Field(default=8, ge=1, le=1024)


class DemoSettings(_Section):
    #: Run the demo producer in-process.
    enabled: bool = False
    #: Events per second the demo producer sends.
    rate: float = Field(default=1000.0, gt=0)
    aggregates: int = Field(default=1000, ge=1)
    #: The demo handler's simulated I/O latency and failure rate.
    latency_ms: float = Field(default=1.0, ge=0)
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)


class ControlSettings(_Section):
    """Fleet control: one desired state for every replica, in a compacted topic."""

    #: Follow the control topic (fleet-scope calls, state kept across restarts).
    enabled: bool = True
    #: The control topic; empty = ``<groupId>.control``.
    topic: str = ""
    #: How often this replica publishes its report (three missed = stale).
    heartbeat_ms: int = Field(default=5000, ge=50)
    #: Start-up: how long to try to read the control topic before running
    #: degraded on the configuration (and retrying).
    startup_timeout_ms: int = Field(default=10_000, ge=100)

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if value and (len(value) > 249 or not all(c.isalnum() or c in "._-" for c in value)):
            raise ValueError(f"invalid topic name {value!r}")
        return value


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: ``auto``: JSON when stderr is not a terminal, console otherwise.
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(_Section):
    """Everything under ``eventbus:``. Frozen; build it with :func:`load_settings`."""

    kafka: KafkaSettings = KafkaSettings()
    pool: PoolSettings = PoolSettings()
    intake: IntakeSettings = IntakeSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    grpc: GrpcSettings = GrpcSettings()
    metrics: MetricsSettings = MetricsSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    demo: DemoSettings = DemoSettings()
    log: LogSettings = LogSettings()
    control: ControlSettings = ControlSettings()

    @_model_validator(mode="before")
    @classmethod
    def _imply_embedded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kafka = data.get("kafka")
            brokers = kafka.get("brokers") if isinstance(kafka, dict) else None
            if not brokers:
                embedded = data.get("embedded")
                embedded = dict(embedded) if isinstance(embedded, dict) else {}
                embedded.setdefault("enabled", True)
                data = {**data, "embedded": embedded}
        return data

    @_model_validator(mode="after")
    def _need_a_broker(self) -> Settings:
        if not self.kafka.brokers and not self.embedded.enabled:
            raise ValueError(
                "no kafka.brokers configured and embedded.enabled is false: set one of them"
            )
        return self

    @property
    def mode(self) -> PoolMode:
        """Start-up mode: ACTOR when ``kafka.actorPool.enabled``, else KEYED."""
        return PoolMode.ACTOR if self.kafka.actor_pool.enabled else PoolMode.KEYED

    @property
    def use_embedded_broker(self) -> bool:
        return self.embedded.enabled

    @property
    def control_topic(self) -> str:
        """The fleet control topic (``<groupId>.control`` unless configured)."""
        return self.control.topic or f"{self.kafka.consumer.group_id}.control"


# -- key paths -------------------------------------------------------------------


def _norm(segment: str) -> str:
    return segment.replace("_", "").replace("-", "").lower()


def _section_model(model: type[BaseModel], alias: str) -> type[BaseModel] | None:
    for name, field in model.model_fields.items():
        if to_camel(name) == alias:
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                return ann
    return None


def _canonical(model: type[BaseModel], segment: str) -> str | None:
    wanted = _norm(segment)
    for name in model.model_fields:
        if _norm(name) == wanted:
            return to_camel(name)
    return None


def _canonicalize(model: type[BaseModel], data: Any, path: str) -> dict[str, Any]:
    """Rename keys (any case, snake or camel) to the model's camelCase aliases."""
    if not isinstance(data, Mapping):
        raise ConfigError([(path, f"must be a mapping, got {type(data).__name__}")])
    out: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    for key, value in data.items():
        canonical = _canonical(model, str(key))
        if canonical is None:
            errors.append((f"{path}.{key}", "unknown key"))
            continue
        sub = _section_model(model, canonical)
        if sub is not None and value is not None:
            try:
                value = _canonicalize(sub, value, f"{path}.{canonical}")
            except ConfigError as exc:
                errors.extend(exc.errors)
                continue
        out[canonical] = value
    if errors:
        raise ConfigError(errors)
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` (``eventbus.`` prefix optional) in ``data``, canonicalising keys."""
    parts = [p for p in dotted.strip().split(".") if p]
    if parts and _norm(parts[0]) == "eventbus":
        parts = parts[1:]
    if not parts:
        raise ConfigError([(source, f"empty key path {dotted!r}")])
    model: type[BaseModel] = Settings
    node = data
    shown = "eventbus"
    for i, part in enumerate(parts):
        canonical = _canonical(model, part)
        if canonical is None:
            raise ConfigError([(f"{shown}.{part}", f"unknown key (from {source})")])
        shown = f"{shown}.{canonical}"
        if i == len(parts) - 1:
            sub = _section_model(model, canonical)
            if sub is not None and isinstance(value, Mapping):
                value = _canonicalize(sub, value, shown)
            node[canonical] = value
            return
        sub = _section_model(model, canonical)
        if sub is None:
            raise ConfigError([(shown, f"is not a section (from {source})")])
        child = node.get(canonical)
        if not isinstance(child, dict):
            child = {}
            node[canonical] = child
        node = child
        model = sub


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- error messages ----------------------------------------------------------------


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    suffix = f" (got {got!r})" if not isinstance(got, Mapping) else ""
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}{suffix}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}{suffix}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}{suffix}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}{suffix}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer{suffix}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number{suffix}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false{suffix}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{suffix}"
    if kind == "string_too_short":
        return f"must not be empty{suffix}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping{suffix}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}{suffix}"


def _validate(data: Mapping[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
            if loc and loc[-1].isdigit():
                loc = loc[:-1]
            errors.append((".".join(["eventbus", *loc]), _describe(err)))
        raise ConfigError(errors) from None


# -- sources -----------------------------------------------------------------------


def _from_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([(f"--config {path}", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([(f"--config {path}", f"invalid YAML: {exc}")]) from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or "eventbus" not in doc:
        raise ConfigError([(f"--config {path}", "has no top-level 'eventbus:' section")])
    root = doc["eventbus"]
    if root is None:
        return {}
    return _canonicalize(Settings, root, "eventbus")


def parse_bool(text: str, key: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError([(key, f"must be true or false (got {text!r})")])


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in sorted(env):
        if name.upper().startswith(ENV_PREFIX):
            path = ".".join(p for p in name[len(ENV_PREFIX) :].split("__") if p)
            _set_path(data, path, _parse_scalar(env[name]), f"${name}")
    if ENV_USE_ACTOR_POOL in env and env[ENV_USE_ACTOR_POOL].strip():
        enabled = parse_bool(env[ENV_USE_ACTOR_POOL], ENV_USE_ACTOR_POOL)
        _set_path(data, "kafka.actorPool.enabled", enabled, f"${ENV_USE_ACTOR_POOL}")
    return data


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``pool-server`` command line."""
    p = argparse.ArgumentParser(
        prog="pool-server",
        description="Kafka consumer with a live-switchable keyed worker pool / actor pool, "
        "controlled over gRPC. Configuration: YAML file, then environment "
        f"({ENV_PREFIX}SECTION__KEY=value, {ENV_USE_ACTOR_POOL}=true|false), then these flags.",
    )
    p.add_argument("--version", action="version", version=f"pool-server {version()}")
    p.add_argument(
        "--config", metavar="FILE", help=f"YAML config file (default ${ENV_CONFIG_FILE})"
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start the embedded Tansu broker on loopback (implied when no brokers are set)",
    )
    p.add_argument(
        "--demo", action="store_true", default=None, help="run the demo producer in-process"
    )
    p.add_argument("--brokers", help="comma-separated bootstrap servers (host:port,...)")
    p.add_argument("--group-id", help="consumer group id")
    p.add_argument(
        "--topic", action="append", dest="topics", metavar="TOPIC", help="topic (repeatable)"
    )
    p.add_argument("--mode", choices=["keyed", "actor"], help="start-up pool mode")
    p.add_argument("--grpc-address", metavar="HOST:PORT", help="gRPC control plane address")
    p.add_argument("--metrics-address", metavar="HOST:PORT", help="/metrics address")
    p.add_argument("--handler", metavar="MODULE:CALLABLE", help="handler import path")
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info); debug adds the traceback of a start-up failure",
    )
    p.add_argument(
        "--set",
        action="append",
        dest="overrides",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="set any key, e.g. --set pool.actor.inboxSize=500 (repeatable)",
    )
    return p


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    simple = {
        "brokers": ("kafka.brokers", ns.brokers),
        "group-id": ("kafka.consumer.groupId", ns.group_id),
        "topic": ("kafka.topics", ns.topics),
        "grpc-address": ("grpc.address", ns.grpc_address),
        "metrics-address": ("metrics.address", ns.metrics_address),
        "handler": ("pool.handler", ns.handler),
        "log-level": ("log.level", ns.log_level),
        "embedded": ("embedded.enabled", ns.embedded),
        "demo": ("demo.enabled", ns.demo),
    }
    for flag, (path, value) in simple.items():
        if value is not None:
            _set_path(data, path, value, f"--{flag}")
    if ns.mode is not None:
        _set_path(data, "kafka.actorPool.enabled", ns.mode == "actor", "--mode")
    for item in ns.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([(f"--set {item}", "must be KEY.PATH=VALUE")])
        _set_path(data, key, _parse_scalar(value), f"--set {key}")
    return data


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from the YAML file, the environment, then ``argv``.

    ``argv`` defaults to no flags (not ``sys.argv``: the entry point passes
    it) and ``env`` to ``os.environ``. Raises :class:`ConfigError`; argparse
    errors (unknown flag, bad ``--mode``) exit via ``SystemExit`` as usual.
    """
    env = os.environ if env is None else env
    ns = build_arg_parser().parse_args(list(argv or []))
    return settings_from_namespace(ns, env)


def settings_from_namespace(ns: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Like :func:`load_settings` for an already parsed command line."""
    config_file = ns.config or env.get(ENV_CONFIG_FILE) or None
    data: dict[str, Any] = _from_file(config_file) if config_file else {}
    data = _merge(data, _from_env(env))
    data = _merge(data, _from_args(ns))
    return _validate(data)
