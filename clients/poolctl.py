"""``poolctl``: the operator CLI of the control API.

    poolctl [--target HOST:PORT]... [--token T] [--json] COMMAND [ARGS]

Commands: ``status``, ``fleet``, ``mode keyed|actor``, ``rollout N``,
``depth [--aggregate ID] [--top N]``, ``drain [--timeout S]``, ``pause``,
``resume``, ``dead-letters [--follow]``, ``redrive``. ``--deadline S`` bounds
each call (default 10 s); ``drain --timeout S`` is how long the drain may take.
Every command runs against every ``--target`` (concurrently) and reports each.

Fleet scope: ``mode``, ``rollout``, ``pause`` and ``resume`` act on the whole
consumer group by default (through the control topic; any replica will do),
and answer with one result per replica; ``--replica`` acts on the replica
called only; ``--expect-generation N`` writes only if the fleet is at
generation N. ``fleet`` shows the desired state and every replica's report.

Output: readable tables by default; ``--json`` prints the response as JSON for
scripts (one object for one target, ``{"targets": [...]}`` for several;
``dead-letters`` prints one JSON object per line): field names as in the
``.proto``, 64-bit integers as numbers, durations as seconds, timestamps as
RFC 3339 strings, enums as short names (``"KEYED"``). The shape of each
command's output is in docs/control-plane.md.

Exit codes (for several targets: the first failing target's code):

    0  ok
    1  unexpected error
    2  usage error, or the server rejected an argument (INVALID_ARGUMENT)
    3  unavailable: cannot connect, or the server is shutting down
    4  authentication or permission (UNAUTHENTICATED, PERMISSION_DENIED)
    5  failed precondition, or a timeout (a drain that did not finish in time),
       or a lost fleet compare-and-set (ABORTED)
    6  not found (e.g. a partition not assigned to that replica)
    130 interrupted (Ctrl-C)

Environment: ``POOLCTL_TARGET`` (comma-separated), ``POOLCTL_TOKEN``,
``POOLCTL_TLS_CA``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TextIO

import grpc
from actorpool.control.v1 import control_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message as ProtoMessage

from clients._client import (
    DEFAULT_TARGET,
    AsyncPoolControlClient,
    ClientTls,
    ControlClientError,
    DeadlineError,
    dead_letter_filter,
    mode_name,
    new_request_id,
)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_AUTH: Final = 4
EXIT_FAILED: Final = 5
EXIT_NOT_FOUND: Final = 6
EXIT_INTERRUPTED: Final = 130

_EXIT_BY_CODE: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_FAILED,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_FAILED,
    grpc.StatusCode.ABORTED: EXIT_FAILED,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
}


def exit_code_for(error: ControlClientError) -> int:
    return _EXIT_BY_CODE.get(error.code, EXIT_ERROR)


class UsageError(Exception):
    """A bad command line (exit 2)."""


# ------------------------------------------------------------- rendering


def to_dict(message: ProtoMessage) -> dict[str, Any]:
    """``message`` as JSON for scripts: every field under its ``.proto`` name;
    64-bit integers as numbers (not strings, as proto JSON has them); a
    ``Duration`` as seconds (a number); a ``Timestamp`` as an RFC 3339 string
    (UTC, ``Z``); an enum as its name without the type's prefix (``"KEYED"``);
    bytes as base64. A field that can be unset (``optional``, or a message) is
    ``null`` when unset; of a ``oneof``, only the member that is set appears."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        oneof = field.containing_oneof
        if field.is_repeated and entry is not None and entry.GetOptions().map_entry:
            of = entry.fields_by_name["value"].enum_type
            out[field.name] = {k: _json_value(of, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_json_value(field.enum_type, v) for v in value]
        elif not field.has_presence or message.HasField(field.name):
            out[field.name] = _json_value(field.enum_type, value)
        # Unset: null, but an unset member of a declared oneof is left out (the
        # synthetic oneof of a proto3 ``optional`` is named after its one field).
        elif oneof is None or oneof.name == f"_{field.name}":
            out[field.name] = None
    return out


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _EnumType(Protocol):
    """What :func:`enum_name` reads of an enum descriptor (pure-Python or upb)."""

    @property
    def name(self) -> str: ...
    @property
    def values_by_number(self) -> Mapping[int, _Named]: ...


def _json_value(enum: _EnumType | None, value: Any) -> Any:
    if isinstance(value, timestamp_pb2.Timestamp):
        return value.ToJsonString()
    if isinstance(value, duration_pb2.Duration):
        return value.ToNanoseconds() / 1e9
    if isinstance(value, ProtoMessage):
        return to_dict(value)
    if enum is not None:
        return enum_name(enum, value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def enum_name(enum: _EnumType, number: int) -> str | int:
    """``POOL_MODE_ACTOR`` of ``PoolMode`` → ``"ACTOR"``; an unknown number as is."""
    value = enum.values_by_number.get(number)
    if value is None:
        return number
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return value.name.removeprefix(prefix)


def plural(count: int, noun: str) -> str:
    """``1 dead letter``, ``2 dead letters``, ``0 events``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    when: dt.datetime = ts.ToDatetime(tzinfo=dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(d: Any) -> str:
    total = d.ToNanoseconds() / 1e9
    if total < 1:
        return f"{total * 1000:.1f}ms"
    if total < 120:
        return f"{total:.2f}s"
    minutes, secs = divmod(int(total), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _opt(message: Any, field: str) -> int | None:
    return getattr(message, field) if message.HasField(field) else None


def intake_state(s: pb.GetStatusResponse) -> tuple[str, str]:
    """The intake's state, from ``draining`` and the partitions' pause reasons,
    and a detail for people. States: ``draining`` (a drain is running),
    ``drained`` (every partition paused by a drain, until ``poolctl resume``),
    ``paused`` (every partition paused by a drain or the operator),
    ``partly paused`` (some), ``running`` (backpressure lifts by itself), and
    ``unassigned`` (no partitions)."""
    total = len(s.partitions)
    paused = [p for p in s.partitions if p.paused]
    held = sum(bool({"drain", "operator"} & set(p.paused_reasons)) for p in s.partitions)
    if s.draining:
        state = "draining"
    elif not total:
        state = "unassigned"
    elif all("drain" in p.paused_reasons for p in s.partitions):
        state = "drained"
    elif held == total:
        state = "paused"
    elif held:
        state = "partly paused"
    else:
        state = "running"
    if not paused:
        return state, ""
    reasons = sorted({r for p in paused for r in p.paused_reasons})
    detail = f"{len(paused)} of {plural(total, 'partition')} paused ({', '.join(reasons)})"
    if held:
        detail += "; `poolctl resume` restarts intake"
    return state, detail


def render_status(s: pb.GetStatusResponse) -> str:
    state, detail = intake_state(s)
    lines = [
        (
            f"mode        {mode_name(s.mode)}   rollout {s.rollout_percent:g}%   "
            f"generation {s.generation}   since {_time(s.since)}"
        ),
        f"intake      {state}" + (f": {detail}" if detail else ""),
        (
            f"ready       {_cell(s.ready)}   uptime {_duration(s.uptime)}   "
            f"version {s.version or '-'}"
        ),
        f"in flight   {s.in_flight}   dead letters {s.dead_letters}   restarts {s.restarts}",
    ]
    if s.group_id or s.instance:
        lines.append(f"group       {s.group_id or '-'}   instance {s.instance or '-'}")
    lines += [
        "",
        table(
            ["POOL", "SIZE", "CAPACITY", "IN FLIGHT", "RESTARTS"],
            [[mode_name(p.mode), p.size, p.capacity, p.in_flight, p.restarts] for p in s.pools],
        ),
        "",
    ]
    if s.partitions:
        lines.append(
            table(
                [
                    "TOPIC",
                    "PARTITION",
                    "COMMITTED",
                    "POSITION",
                    "HIGH WATERMARK",
                    "LAG",
                    "IN FLIGHT",
                    "PAUSED",
                ],
                [
                    [
                        p.topic,
                        p.partition,
                        _opt(p, "committed"),
                        _opt(p, "position"),
                        _opt(p, "high_watermark"),
                        _opt(p, "lag"),
                        p.in_flight,
                        ",".join(p.paused_reasons) if p.paused else "no",
                    ]
                    for p in s.partitions
                ],
            )
        )
    else:
        lines.append("no partitions assigned")
    return "\n".join(lines)


def render_switch(r: pb.SwitchResult, replayed: bool) -> str:
    text = (
        f"mode {mode_name(r.previous_mode)} -> {mode_name(r.mode)}   "
        f"rollout {r.previous_rollout_percent:g}% -> {r.rollout_percent:g}%   "
        f"generation {r.generation}   took {_duration(r.took)}   "
        f"waited aggregates {r.waited_aggregates}   pending {r.pending_aggregates}"
    )
    return text + ("   (replayed: already applied)" if replayed else "")


def rollout_note(r: pb.SwitchResult) -> str:
    """Said when the rollout was set while the service is not in ACTOR mode."""
    if r.mode == pb.POOL_MODE_ACTOR:
        return ""
    return (
        f"note: the service is in {mode_name(r.mode)} mode; the rollout takes effect in "
        f"actor mode (`poolctl mode actor`), where {r.rollout_percent:g}% of aggregates "
        "go to the actor pool"
    )


_OUTCOME_NAMES: Final = {
    pb.REPLICA_OUTCOME_APPLIED: "applied",
    pb.REPLICA_OUTCOME_PENDING: "pending",
    pb.REPLICA_OUTCOME_FAILED: "failed",
    pb.REPLICA_OUTCOME_DOWN: "down",
}


def render_fleet_result(f: pb.FleetResult, replayed: bool = False) -> str:
    head = (
        f"fleet generation {f.previous_generation} -> {f.generation}   "
        f"{'every live replica applied' if f.complete else 'NOT every replica applied'}   "
        f"took {_duration(f.took)}" + ("   (replayed: already written)" if replayed else "")
    )
    rows = [
        (
            r.instance,
            r.grpc_address,
            _OUTCOME_NAMES.get(r.outcome, "?"),
            r.applied_generation,
            _duration(r.took) if r.HasField("took") else "-",
            r.error,
        )
        for r in f.replicas
    ]
    return (
        head + "\n" + table(("REPLICA", "ADDRESS", "OUTCOME", "GENERATION", "TOOK", "ERROR"), rows)
    )


def render_fleet(f: pb.GetFleetStatusResponse) -> str:
    if not f.enabled:
        return "fleet control disabled on this replica (control.enabled: false)"
    lines = [f"control topic {f.topic}   answered by {f.instance}"]
    if f.degraded:
        lines.append(f"DEGRADED: {f.degraded_reason}")
    if f.HasField("desired"):
        d = f.desired
        paused = (
            "all"
            if d.paused_all
            else ", ".join(f"{p.topic}:{p.partition}" for p in d.paused) or "none"
        )
        lines.append(
            f"desired    generation {d.generation}   mode {mode_name(d.mode)}   "
            f"rollout {d.rollout_percent:g}%   paused {paused}"
        )
        lines.append(
            f"last write {d.change or '-'} by {d.caller_role or '-'} {d.caller_peer or ''} "
            f"through {d.writer or '-'} at {_time(d.time)}"
        )
    else:
        lines.append("desired    none yet: every replica runs on its configuration")
    rows = [
        (
            r.report.instance,
            r.report.grpc_address,
            r.report.applied_generation,
            mode_name(r.report.mode),
            f"{r.report.rollout_percent:g}%",
            len(r.report.assigned),
            r.report.lag,
            "down" if r.down else "stale" if r.stale else "diverged" if r.diverged else "ok",
            r.down_reason or "; ".join(r.differences) or r.report.last_error,
            _duration(r.age),
        )
        for r in f.replicas
    ]
    headers = (
        "REPLICA",
        "ADDRESS",
        "GENERATION",
        "MODE",
        "ROLLOUT",
        "PARTITIONS",
        "LAG",
        "STATE",
        "DETAIL",
        "AGE",
    )
    lines.append(table(headers, rows) if rows else "no replica reports")
    return "\n".join(lines)


def render_depth(d: pb.GetInboxDepthResponse) -> str:
    lines = [f"total depth {d.total}"]
    for p in d.pools:
        lines.append(
            f"\n{mode_name(p.mode)} pool ({'active' if p.active else 'draining'}): "
            f"total {p.total}, {plural(p.size, 'executor')} x capacity {p.capacity}"
        )
        lines.append(
            table(
                ["EXECUTOR", "DEPTH", "CAPACITY", "UTILIZATION"],
                [[e.index, e.depth, e.capacity, f"{e.utilization:.1%}"] for e in p.top],
            )
        )
    if d.HasField("aggregate"):
        a = d.aggregate
        lines.append(
            f"\naggregate {a.aggregate_id}: {mode_name(a.mode)} executor {a.executor}, "
            f"depth {a.depth}/{a.capacity}"
        )
    return "\n".join(lines)


def render_drain(r: pb.DrainResult) -> str:
    state = "complete" if r.complete else "INCOMPLETE"
    lines = [
        f"drain {state}: {plural(r.finished, 'event')} finished, {r.remaining} remaining, "
        f"took {_duration(r.took)}"
        + (", intake resumed" if r.resumed else ", intake paused until `poolctl resume`")
        + ("   (replayed)" if r.replayed else "")
    ]
    if r.committed:
        lines.append(
            table(
                ["TOPIC", "PARTITION", "COMMITTED"],
                [[c.topic, c.partition, c.offset] for c in r.committed],
            )
        )
    return "\n".join(lines)


def render_partitions(verb: str, parts: Sequence[tuple[str, int]]) -> str:
    if not parts:
        return f"{verb}: none"
    return f"{verb}: " + ", ".join(f"{t}[{p}]" for t, p in parts)


def render_dead_letter(d: pb.DeadLetter) -> str:
    error = f"{d.error_type}: {d.error_message}" if d.error_type else d.error_message
    return (
        f"{_time(d.time)}  {d.id}  {d.topic}[{d.partition}]@{d.offset}  "
        f"aggregate={d.aggregate_id}  reason={d.reason}  attempts={d.attempts}  {error}"
    )


def render_redrive(r: pb.RedriveDeadLettersResponse) -> str:
    matched = plural(r.matched, "dead letter")
    lines = [f"matched {matched}, republished {r.republished}, failed {r.failed}"]
    lines += [f"  {i}: {why}" for i, why in sorted(r.errors.items())]
    return "\n".join(lines)


def result_json(message: ProtoMessage) -> dict[str, Any]:
    """A command's ``--json`` result: the response as :func:`to_dict`; for
    ``status`` also ``"intake"``, the state :func:`intake_state` derives; for
    ``pause``/``resume`` on one replica only ``partitions``, and on the fleet
    also ``all_paused``, ``fleet`` and ``replayed``."""
    doc = to_dict(message)
    if isinstance(message, pb.GetStatusResponse):
        doc["intake"] = intake_state(message)[0]
    if isinstance(message, pb.PauseResponse | pb.ResumeResponse) and not message.HasField("fleet"):
        doc = {"partitions": doc["partitions"]}
    return doc


# -------------------------------------------------------------- arguments


def _partition(text: str) -> tuple[str, int]:
    topic, sep, number = text.rpartition(":")
    if not sep or not topic or not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected TOPIC:PARTITION, got {text!r}")
    return topic, int(number)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _percent(text: str) -> float:
    value = _number(text.rstrip("%"))
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be within 0..100, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _generation(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _count(low: int, high: int) -> Callable[[str], int]:
    """An integer within ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be within {low}..{high}, got {text!r}")
        return value

    return parse


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _since(text: str) -> float:
    """Epoch seconds from ``1700000000``, ``2026-11-25T10:00:00Z`` or ``15m`` (ago)."""
    match = _RELATIVE.match(text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return dt.datetime.now(dt.UTC).timestamp() - float(match.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch seconds, ISO 8601 or a duration like 15m, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def version() -> str:
    """The installed distribution's version (``pip install`` / ``pip install -e``)."""
    try:
        return importlib.metadata.version("kafka-actor-pool")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command."""
    d = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument(
        "--target",
        "--address",
        dest="target",
        action="append",
        default=d,
        metavar="HOST:PORT",
        help="replica to talk to; repeat for several (env POOLCTL_TARGET, default "
        f"{DEFAULT_TARGET})",
    )
    g.add_argument("--token", default=d, help="bearer token (env POOLCTL_TOKEN)")
    g.add_argument(
        "--json", action="store_true", default=d or False, help="JSON output, for scripts"
    )
    g.add_argument(
        "--deadline", type=_positive, default=d, help="per-call deadline in seconds (default 10)"
    )
    g.add_argument("--tls", action="store_true", default=d or False, help="use TLS")
    g.add_argument("--tls-ca", default=d, metavar="PEM", help="CA to trust (implies --tls)")
    g.add_argument("--tls-cert", default=d, metavar="PEM", help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=d, metavar="PEM", help="client key (mTLS)")
    g.add_argument("--tls-server-name", default=d, help="name expected in the server cert")
    return p


_REQUEST_ID_HELP: Final = (
    "idempotency key: a retry with the same ID is applied once (default: fresh)"
)


def _request_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-id", metavar="ID", help=_REQUEST_ID_HELP)


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_non_negative,
        default=None,
        metavar="S",
        help="how long to wait for aggregates in flight in the old pool to hand over, "
        "and on the fleet for every live replica to apply (default 5; 0 = return at once)",
    )


def _fleet_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_non_negative,
        default=None,
        metavar="S",
        help="on the fleet: how long to wait for every live replica to apply "
        "(default 5; 0 = return at once)",
    )


def _partitions(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument(
        "--partition",
        action="append",
        type=_partition,
        metavar="TOPIC:N",
        help=f"{scope} only this partition; repeat for several (default: all assigned)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolctl",
        description="Operate the Kafka actor-pool service over its gRPC control API.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage/invalid argument, 3 unavailable, "
        "4 auth, 5 failed precondition/timeout/conflict, 6 not found, 130 interrupted.",
        parents=[_common(suppress=False)],
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="show the version"
    )
    common = _common(suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "status", parents=[common], help="mode, rollout, intake, partitions, pools, counters"
    )

    p = sub.add_parser("mode", parents=[common], help="switch the pool mode atomically")
    p.add_argument(
        "mode", type=str.lower, choices=["keyed", "actor"], help="the pool new events go to"
    )
    _request_id(p)
    _wait(p)
    _scope_options(p)

    p = sub.add_parser(
        "rollout", parents=[common], help="share of aggregates on the actor pool in actor mode"
    )
    p.add_argument("percent", type=_percent, help="0..100 (a trailing %% is allowed)")
    _request_id(p)
    _wait(p)
    _scope_options(p)

    p = sub.add_parser("depth", parents=[common], help="inbox depth per executor")
    p.add_argument("--aggregate", default="", metavar="ID", help="where this aggregate goes")
    p.add_argument("--top", type=_count(0, 1000), default=10, metavar="N",
                   help="deepest executors to list, 0..1000 (default 10)")  # fmt: skip
    p.add_argument("--pool", type=str.lower, choices=["keyed", "actor"], help="only this pool")

    p = sub.add_parser("drain", parents=[common], help="pause intake, finish in-flight, commit")
    p.add_argument("--timeout", dest="drain_timeout", type=_positive, default=30.0, metavar="S",
                   help="how long the drain may take (default 30)")  # fmt: skip
    _partitions(p, "drain")
    p.add_argument("--resume", action="store_true", help="resume intake afterwards")
    _request_id(p)

    for name, text in (("pause", "stop fetching"), ("resume", "resume fetching")):
        p = sub.add_parser(name, parents=[common], help=f"{text} (all or listed partitions)")
        _partitions(p, name)
        _request_id(p)
        _fleet_wait(p)
        _scope_options(p)

    sub.add_parser(
        "fleet", parents=[common], help="the fleet's desired state and every replica's report"
    )

    p = sub.add_parser("dead-letters", parents=[common], help="show (and follow) dead letters")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming live ones")
    p.add_argument("--limit", type=_count(0, 2**31 - 1), default=0, metavar="N",
                   help="newest N of the backlog (0 = all)")  # fmt: skip
    _filters(p)

    p = sub.add_parser("redrive", parents=[common], help="republish dead letters")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--id", action="append", dest="ids", default=[], metavar="ID",
                       help="this dead letter (its id); repeat for several")  # fmt: skip
    which.add_argument("--all", action="store_true", help="every dead letter held (no filter)")
    _request_id(p)
    _filters(p)
    return parser


def _scope_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet").add_mutually_exclusive_group()
    g.add_argument(
        "--replica",
        action="store_true",
        help="act on the replica called only (default: the whole fleet, through the "
        "control topic, when the service has it enabled)",
    )
    g.add_argument(
        "--expect-generation",
        type=_generation,
        default=None,
        metavar="N",
        help="write to the fleet only if it is at generation N (compare-and-set)",
    )


def _filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (every one given must match)")
    g.add_argument("--topic", default="", help="original topic of the event")
    g.add_argument("--aggregate", default="", metavar="ID", help="aggregate ID of the event")
    g.add_argument("--error-type", default="", help="exception class name, e.g. ValueError")
    g.add_argument("--reason", default="", help="e.g. retries-exhausted, non-retryable")
    g.add_argument("--since", type=_since, default=None, help="epoch, ISO 8601 or 15m/2h ago")


# -------------------------------------------------------------- commands


@dataclass
class Outcome:
    target: str
    result: ProtoMessage | None = None
    text: str = ""
    error: ControlClientError | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.error is None else exit_code_for(self.error)


Command = Callable[
    [AsyncPoolControlClient, argparse.Namespace], Awaitable[tuple[ProtoMessage, str]]
]


async def cmd_status(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    s = await c.status()
    return s, render_status(s)


async def cmd_mode(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    r = await c.set_mode(a.mode, request_id=a.request_id, wait_timeout=a.wait, **_scope(a))
    return r, render_switch(r.result, r.replayed) + _fleet_text(r)


async def cmd_rollout(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    r = await c.set_rollout(a.percent, request_id=a.request_id, wait_timeout=a.wait, **_scope(a))
    note = rollout_note(r.result)
    if note and a.json:
        print(f"poolctl: {c.target}: {note}", file=sys.stderr)
    return r, render_switch(r.result, r.replayed) + (f"\n{note}" if note else "") + _fleet_text(r)


async def cmd_depth(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    d = await c.inbox_depth(
        aggregate_id=a.aggregate, top=a.top, pool=a.pool, omit_executors=not a.json
    )
    return d, render_depth(d)


async def cmd_drain(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    def progress(p: pb.DrainProgress) -> None:
        if not a.json:
            print(
                f"[{c.target}] draining: {plural(p.finished, 'event')} finished, "
                f"{p.remaining} remaining, {_duration(p.elapsed)}",
                file=sys.stderr,
            )

    r = await c.drain(
        a.drain_timeout,
        partitions=a.partition,
        resume_after=a.resume,
        request_id=a.request_id,
        on_progress=progress,
    )
    return r, render_drain(r)


async def cmd_pause(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    r = await c.pause_reply(a.partition, request_id=a.request_id, wait_timeout=a.wait, **_scope(a))
    parts = [(p.topic, p.partition) for p in r.partitions]
    if r.all_paused:
        text = "paused: every partition, now and later (fleet)"
    else:
        text = render_partitions("paused", parts)
    return r, text + _fleet_text(r)


async def cmd_resume(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    r = await c.resume_reply(a.partition, request_id=a.request_id, wait_timeout=a.wait, **_scope(a))
    parts = [(p.topic, p.partition) for p in r.partitions]
    return r, render_partitions("resumed", parts) + _fleet_text(r)


async def cmd_fleet(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    r = await c.fleet_status()
    return r, render_fleet(r)


def _scope(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "scope": "replica" if a.replica else None,
        "expected_generation": a.expect_generation,
    }


def _fleet_text(
    r: pb.SetPoolModeResponse | pb.SetRolloutResponse | pb.PauseResponse | pb.ResumeResponse,
) -> str:
    if not r.HasField("fleet"):
        return ""
    return "\n" + render_fleet_result(r.fleet, r.replayed)


def _filter_from(a: argparse.Namespace) -> pb.DeadLetterFilter:
    return dead_letter_filter(
        topic=a.topic,
        aggregate_id=a.aggregate,
        error_type=a.error_type,
        reason=a.reason,
        since=a.since,
    )


async def cmd_redrive(c: AsyncPoolControlClient, a: argparse.Namespace) -> tuple[ProtoMessage, str]:
    f = _filter_from(a)
    r = await c.redrive(
        ids=a.ids,
        filter=None if a.ids or f == pb.DeadLetterFilter() else f,
        all=a.all,
        request_id=a.request_id,
    )
    return r, render_redrive(r)


COMMANDS: Final[dict[str, Command]] = {
    "status": cmd_status,
    "mode": cmd_mode,
    "rollout": cmd_rollout,
    "depth": cmd_depth,
    "drain": cmd_drain,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "redrive": cmd_redrive,
    "fleet": cmd_fleet,
}

#: Commands with fleet scope: one request ID for every --target, so a fleet
#: write fanned out to several replicas is written once.
FLEET_COMMANDS: Final = frozenset({"mode", "rollout", "pause", "resume"})


async def stream_dead_letters(
    clients: Sequence[AsyncPoolControlClient], a: argparse.Namespace, out: TextIO
) -> list[Outcome]:
    several = len(clients) > 1

    async def one(c: AsyncPoolControlClient) -> Outcome:
        prefix = f"[{c.target}] " if several else ""
        try:
            async for event in c.dead_letters(
                follow=a.follow, filter=_filter_from(a), backlog_limit=a.limit
            ):
                kind = event.WhichOneof("event")
                if a.json:
                    line = {"target": c.target, **to_dict(event)}
                    print(json.dumps(line, sort_keys=True), file=out, flush=True)
                elif kind == "dead_letter":
                    print(prefix + render_dead_letter(event.dead_letter), file=out, flush=True)
                elif kind == "backlog_end":
                    note = f"{plural(event.backlog_end.count, 'dead letter')} in memory"
                    print(prefix + note + ("; following..." if a.follow else ""), file=sys.stderr)
                else:
                    print(
                        f"{prefix}reader too slow: skipped "
                        f"{plural(event.skipped.count, 'dead letter')} "
                        f"({event.skipped.total} in all)",
                        file=sys.stderr,
                    )
        except ControlClientError as error:
            return Outcome(c.target, error=error)
        return Outcome(c.target)

    return list(await asyncio.gather(*(one(c) for c in clients)))


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    targets: list[str] = args.target or [
        t.strip() for t in os.environ.get("POOLCTL_TARGET", DEFAULT_TARGET).split(",") if t.strip()
    ]
    token = args.token or os.environ.get("POOLCTL_TOKEN") or None
    ca = args.tls_ca or os.environ.get("POOLCTL_TLS_CA") or None
    tls = None
    if args.tls or ca or args.tls_cert:
        tls = ClientTls(
            ca_file=ca,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            server_name=args.tls_server_name,
        )
    clients = [
        AsyncPoolControlClient(t, token=token, tls=tls, timeout=args.deadline or 10.0)
        for t in targets
    ]
    try:
        if args.command == "dead-letters":
            outcomes = await stream_dead_letters(clients, args, out)
            for o in outcomes:
                if o.error is not None:
                    print(f"poolctl: {o.target}: {o.error}", file=sys.stderr)
            return next((o.exit_code for o in outcomes if o.exit_code), EXIT_OK)
        command = COMMANDS[args.command]

        async def one(c: AsyncPoolControlClient) -> Outcome:
            try:
                result, text = await command(c, args)
            except DeadlineError as error:
                partial = error.partial
                return Outcome(
                    c.target,
                    result=partial,
                    text=render_drain(partial) if partial is not None else "",
                    error=error,
                )
            except ControlClientError as error:
                return Outcome(c.target, error=error)
            return Outcome(c.target, result=result, text=text)

        outcomes = list(await asyncio.gather(*(one(c) for c in clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    report(outcomes, json_output=args.json, out=out)
    return next((o.exit_code for o in outcomes if o.exit_code), EXIT_OK)


def report(outcomes: Sequence[Outcome], *, json_output: bool, out: TextIO) -> None:
    several = len(outcomes) > 1
    if json_output:
        entries = []
        for o in outcomes:
            entry: dict[str, Any] = {"target": o.target, "ok": o.error is None}
            if o.result is not None:
                entry["result"] = result_json(o.result)
            if o.error is not None:
                entry["error"] = {"code": o.error.code.name, "message": o.error.details}
            entries.append(entry)
        if several:
            doc: Any = {"targets": entries}
        elif outcomes[0].error is None:
            doc = entries[0]["result"]
        else:
            doc = {k: v for k, v in entries[0].items() if k != "target"}
        print(json.dumps(doc, indent=2, sort_keys=True), file=out)
    else:
        for i, o in enumerate(outcomes):
            if several:
                print(("\n" if i else "") + f"== {o.target} ==", file=out)
            if o.text:
                print(o.text, file=out)
    for o in outcomes:
        if o.error is not None:
            print(f"poolctl: {o.target}: {o.error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    if args.command in FLEET_COMMANDS and not args.replica and not args.request_id:
        args.request_id = new_request_id()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:
        print(f"poolctl: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
