"""Intake: a consumed Kafka record becomes a :class:`pool.Message`, or an intake
:class:`pool.DeadLetter` (``mode="intake"``, ``executor=-1``) with a reason.

This runs once per event at 100k events/s, so it avoids pydantic and any
per-event allocation it can: one compiled regex, JSON decoding (msgspec's, in
one C pass) only when the value looks like a JSON object, a single pass over
the headers, and the ``Message`` built without the frozen dataclass's
``__init__`` (``pool._message.make_message``).

The rules, in the order they apply:

1. **Size.** A value longer than ``max_value_bytes`` is dead-lettered with
   ``oversized-value`` without being parsed (its aggregate ID, if the headers
   or key give a valid one, is kept on the dead letter).
2. **Envelope.** The value is taken as a JSON object when its first
   non-whitespace byte is ``{``. Otherwise (binary, text, JSON array, empty,
   a tombstone) it is *not an envelope*: ``envelope=None`` and the event is
   routed by header or key.

   - A ``{``-value that does not parse as JSON (or not as UTF-8) is
     dead-lettered ``malformed-envelope``.
   - A JSON object with none of the envelope marker fields (``event_id``,
     ``aggregate_id``, ``event_type``, ``event_version``) is plain JSON, not
     an envelope: ``envelope=None``, routed by header or key.
   - A JSON object with at least one marker field *claims* to be an envelope
     and must be valid, else ``malformed-envelope``: ``event_id``,
     ``event_type`` non-empty strings; ``event_version`` an integer > 0 (not a
     bool); ``timestamp`` a non-empty string or a number >= 0; ``aggregate_id``
     a string when present; ``trace_id``, ``correlation_id``, ``tenant_id``
     strings or null when present; ``payload`` any JSON (optional). Unknown
     fields are allowed (forward compatibility). A valid envelope is passed on
     as ``Message.envelope`` (the parsed dict).
3. **Aggregate ID.** Candidates in order: the envelope's ``aggregate_id``,
   the headers ``X-Aggregate-ID``, ``x-aggregate-id``, ``Aggregate-ID``,
   ``aggregate-id`` (exact names; the first occurrence of a repeated header),
   then the Kafka key. Each is trimmed; a missing or blank candidate is
   skipped. The **first non-blank candidate decides**: it must be at most 256
   characters of ``[A-Za-z0-9:_\\-./]``, else the event is dead-lettered
   ``invalid-aggregate-id`` (a header or key that is not UTF-8 is invalid,
   never a crash). An explicit bad ID is not silently replaced by a later
   source.
4. **No ID at all.** Policy ``route-by-offset`` (default): the aggregate ID is
   ``"{topic}/{partition}/{offset}"`` (unique, so such events run in
   parallel, unordered among themselves); policy ``dead-letter``: dead letter
   ``missing-aggregate-id``.

Header values that are ``None`` (Kafka null headers) become ``b""``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from pool import DeadLetter, DeadLetterReason, Message
from pool._message import make_message
from server._errors import ServiceError

__all__ = [
    "AGGREGATE_ID_HEADERS",
    "Decoder",
    "IntakeError",
    "IntakeOptions",
    "InvalidAggregateIdError",
    "MalformedEnvelopeError",
    "MissingAggregateIdError",
    "OversizedValueError",
    "is_valid_aggregate_id",
]

#: Header names that carry the aggregate ID, in priority order.
AGGREGATE_ID_HEADERS: Final = ("X-Aggregate-ID", "x-aggregate-id", "Aggregate-ID", "aggregate-id")
_HEADER_RANK: Final = {name: rank for rank, name in enumerate(AGGREGATE_ID_HEADERS)}

MAX_AGGREGATE_ID_LENGTH: Final = 256
_VALID_ID = re.compile(r"[A-Za-z0-9:_\-./]{1,256}")
_VALID_ID_MATCH = _VALID_ID.fullmatch
_VALID_IDS_MAX: Final = 65536

_ENVELOPE_MARKERS: Final = ("event_id", "aggregate_id", "event_type", "event_version")
_OPTIONAL_STRINGS: Final = ("trace_id", "correlation_id", "tenant_id")
_WHITESPACE: Final = frozenset(b" \t\r\n")
_LBRACE: Final = ord("{")

MissingIdPolicy = Literal["route-by-offset", "dead-letter"]


class IntakeError(ServiceError):
    """Root of the reasons intake rejects a record (used as the dead letter's error type)."""

    reason: DeadLetterReason


class OversizedValueError(IntakeError):
    reason = DeadLetterReason.OVERSIZED_VALUE


class MalformedEnvelopeError(IntakeError):
    reason = DeadLetterReason.MALFORMED_ENVELOPE


class InvalidAggregateIdError(IntakeError):
    reason = DeadLetterReason.INVALID_AGGREGATE_ID


class MissingAggregateIdError(IntakeError):
    reason = DeadLetterReason.MISSING_AGGREGATE_ID


def is_valid_aggregate_id(candidate: str) -> bool:
    """Whether an (already trimmed) ID is non-empty, <= 256 chars of ``[A-Za-z0-9:_\\-./]``."""
    return _VALID_ID_MATCH(candidate) is not None


@dataclass(frozen=True, slots=True)
class IntakeOptions:
    max_value_bytes: int = 1024 * 1024
    missing_id_policy: MissingIdPolicy = "route-by-offset"

    def __post_init__(self) -> None:
        if self.max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be >= 1, got {self.max_value_bytes}")
        if self.missing_id_policy not in ("route-by-offset", "dead-letter"):
            raise ValueError(f"unknown missing_id_policy {self.missing_id_policy!r}")


def _options_from(source: Any) -> IntakeOptions:
    if source is None:
        return IntakeOptions()
    if isinstance(source, IntakeOptions):
        return source
    intake = getattr(source, "intake", source)  # Settings or IntakeSettings
    return IntakeOptions(
        max_value_bytes=intake.max_value_bytes, missing_id_policy=intake.missing_id_policy
    )


# msgspec's JSON decoder, untyped: dicts, lists, str, int, float, bool, None,
# as json.loads gives them.
_MSGSPEC_DECODE: Final[Callable[[bytes], Any]] = msgspec.json.Decoder().decode


def _loads(value: bytes) -> Any:
    """``json.loads(value)`` for a value whose first non-whitespace byte is ``{``.

    msgspec's decoder (one C pass, ~0.5 µs for a typical envelope against
    ~1.9 µs for ``json.loads``) accepts strict JSON (RFC 8259) in strict
    UTF-8 only, and gives for it what ``json.loads`` gives: the same types,
    the last of repeated keys, integers of any size. Everything it refuses
    goes to ``json.loads`` itself, so results and error messages there are
    exactly its own: what is not JSON at all, and what only Python's json
    reads (``NaN``, ``Infinity``, numbers beyond a float's range, lone
    surrogates, UTF-16/32 text). The one difference is at the recursion
    limit: msgspec nests a few levels deeper (about 995 instead of 990
    objects or arrays in each other, less the caller's stack) before it
    gives up with ``RecursionError`` as ``json.loads`` does.
    ``tests/server/test_intake_fast_path.py`` checks both agree.
    """
    try:
        return _MSGSPEC_DECODE(value)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return json.loads(value)


def _preview(data: bytes | str, limit: int = 80) -> str:
    text = data if isinstance(data, str) else data[:limit].decode("utf-8", "backslashreplace")
    return repr(text[:limit]) + ("..." if len(data) > limit else "")


def _envelope_ok(obj: dict[str, Any]) -> bool:
    """``_envelope_problem(obj) is None``, straight-line for the hot path.

    ``obj`` comes from ``_loads``, so every value is exactly ``str``,
    ``int``, ``float``, ``bool``, ``None``, ``list`` or ``dict``: ``type(v) is
    str`` equals ``isinstance(v, str)`` here, and ``type(v) is int`` excludes
    ``bool`` as the rules want; ``not s or s.isspace()`` is ``not s.strip()``
    without a copy. The tests check both agree on every rule.
    """
    get = obj.get
    value: Any = get("event_id")
    if type(value) is not str or not value or value.isspace():
        return False
    value = get("event_type")
    if type(value) is not str or not value or value.isspace():
        return False
    value = get("event_version")
    if type(value) is not int or value <= 0:
        return False
    value = get("timestamp")
    kind = type(value)
    if kind is str:
        if not value or value.isspace():
            return False
    elif kind is int or kind is float:
        if not value >= 0:  # NaN is not >= 0
            return False
    else:
        return False
    # absent and null are both fine
    value = get("aggregate_id")
    if value is not None and type(value) is not str:
        return False
    value = get("trace_id")
    if value is not None and type(value) is not str:
        return False
    value = get("correlation_id")
    if value is not None and type(value) is not str:
        return False
    value = get("tenant_id")
    return value is None or type(value) is str


def _envelope_problem(obj: dict[str, Any]) -> str | None:
    """Why a JSON object claiming to be an envelope is invalid, or None when it is valid."""
    problems = []
    for name in ("event_id", "event_type"):
        value = obj.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be a non-empty string")
    version = obj.get("event_version")
    if type(version) is not int or version <= 0:
        problems.append(f"event_version must be an integer > 0, got {version!r}"[:120])
    ts = obj.get("timestamp")
    if isinstance(ts, str):
        if not ts.strip():
            problems.append("timestamp must not be empty")
    elif isinstance(ts, bool) or not isinstance(ts, int | float) or not ts >= 0:  # NaN is not >= 0
        problems.append("timestamp must be a string or a number >= 0")
    if "aggregate_id" in obj and not isinstance(obj["aggregate_id"], str | None):
        problems.append("aggregate_id must be a string")
    problems.extend(
        f"{name} must be a string or null"
        for name in _OPTIONAL_STRINGS
        if name in obj and not isinstance(obj[name], str | None)
    )
    return "; ".join(problems) if problems else None


class Decoder:
    """Turns consumed records into pool messages or intake dead letters. Never raises.

    ``source`` is an :class:`IntakeOptions`, the service ``Settings`` or its
    ``intake`` section (anything with ``max_value_bytes`` and
    ``missing_id_policy``). ``clock`` gives the dead letters' wall time.
    """

    __slots__ = ("_clock", "_dead_letter_missing", "_max_value_bytes", "_valid_ids", "options")

    def __init__(self, source: Any = None, *, clock: Callable[[], float] = time.time) -> None:
        self.options = _options_from(source)
        self._max_value_bytes = self.options.max_value_bytes
        self._dead_letter_missing = self.options.missing_id_policy == "dead-letter"
        self._clock = clock
        # Aggregate IDs that passed the check: a set lookup instead of the
        # regular expression for an aggregate seen before (cleared when full).
        self._valid_ids: set[str] = set()

    def decode_record(self, record: Any) -> Message | DeadLetter:
        """:meth:`decode` for an ``aiokafka`` ``ConsumerRecord``."""
        return self.decode(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            record.headers,
            record.timestamp,
        )

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        timestamp_ms: int | None,
    ) -> Message | DeadLetter:
        if value is None:
            value = b""
        if timestamp_ms is None:
            timestamp_ms = -1

        # One pass over the headers: normalise them, find the best ID header.
        id_headers: dict[int, bytes] | None = None  # rank -> first value, only when present
        hdrs: tuple[tuple[str, bytes], ...] = ()
        if headers:  # most records have none (aiokafka gives an empty tuple)
            clean = True
            for name, hvalue in headers:
                if hvalue is None:
                    clean = False
                    continue
                r = _HEADER_RANK.get(name)
                if r is not None:
                    if id_headers is None:
                        id_headers = {r: hvalue}
                    elif r not in id_headers:
                        id_headers[r] = hvalue
            if clean and type(headers) is tuple:
                hdrs = headers
            else:
                hdrs = tuple((n, b"" if v is None else v) for n, v in headers)

        # 1. size
        if len(value) > self._max_value_bytes:
            agg = self._fallback_id(id_headers, key)
            return self._dead(
                OversizedValueError(
                    f"value is {len(value)} bytes, over the {self._max_value_bytes}-byte limit"
                ),
                topic, partition, offset, key, value, hdrs, agg, timestamp_ms, None,
            )  # fmt: skip

        # 2. envelope
        envelope: dict[str, Any] | None = None
        if value and (
            value[0] == _LBRACE or (value[0] in _WHITESPACE and value.lstrip()[:1] == b"{")
        ):
            try:  # ``_loads(value)`` written out: one call less
                parsed = _MSGSPEC_DECODE(value)
            except (msgspec.DecodeError, RecursionError):
                try:
                    parsed = json.loads(value)
                except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                    return self._dead(
                        MalformedEnvelopeError(f"value is not valid JSON: {str(exc)[:200]}"),
                        topic, partition, offset, key, value, hdrs,
                        self._fallback_id(id_headers, key), timestamp_ms, None,
                    )  # fmt: skip
            if type(parsed) is dict and (
                "event_id" in parsed
                or "aggregate_id" in parsed
                or "event_type" in parsed
                or "event_version" in parsed
            ):  # any of _ENVELOPE_MARKERS, without a generator per event
                if not _envelope_ok(parsed):
                    problem = _envelope_problem(parsed)
                    if problem is not None:
                        return self._dead(
                            MalformedEnvelopeError(f"invalid envelope: {problem}"),
                            topic, partition, offset, key, value, hdrs,
                            self._fallback_id(id_headers, key), timestamp_ms, None,
                        )  # fmt: skip
                envelope = parsed

        # 3. aggregate ID: the first non-blank candidate decides
        source = ""
        candidate: str | None = None
        if envelope is not None:
            env_id = envelope.get("aggregate_id")
            if env_id is not None:
                env_id = env_id.strip()
                if env_id:
                    candidate, source = env_id, "envelope aggregate_id"
        if candidate is None and id_headers is not None:
            for rank in sorted(id_headers):
                raw = id_headers[rank]
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    return self._dead(
                        InvalidAggregateIdError(
                            f"header {AGGREGATE_ID_HEADERS[rank]} is not UTF-8: {_preview(raw)}"
                        ),
                        topic, partition, offset, key, value, hdrs, "", timestamp_ms, envelope,
                    )  # fmt: skip
                if text:
                    candidate, source = text, f"header {AGGREGATE_ID_HEADERS[rank]}"
                    break
        if candidate is None and key:
            try:
                text = key.decode("utf-8").strip()
            except UnicodeDecodeError:
                return self._dead(
                    InvalidAggregateIdError(f"key is not UTF-8: {_preview(key)}"),
                    topic, partition, offset, key, value, hdrs, "", timestamp_ms, envelope,
                )  # fmt: skip
            if text:
                candidate, source = text, "key"

        if candidate is not None:
            valid_ids = self._valid_ids
            if candidate in valid_ids:  # checked before (its hash is the pool's too)
                pass
            elif _VALID_ID_MATCH(candidate) is None:
                why = (
                    f"longer than {MAX_AGGREGATE_ID_LENGTH} characters ({len(candidate)})"
                    if len(candidate) > MAX_AGGREGATE_ID_LENGTH
                    else "characters outside [A-Za-z0-9:_\\-./]"
                )
                return self._dead(
                    InvalidAggregateIdError(f"{source} {_preview(candidate)}: {why}"),
                    topic, partition, offset, key, value, hdrs, "", timestamp_ms, envelope,
                )  # fmt: skip
            else:
                if len(valid_ids) >= _VALID_IDS_MAX:
                    valid_ids.clear()
                valid_ids.add(candidate)
            aggregate_id = candidate
        elif self._dead_letter_missing:
            return self._dead(
                MissingAggregateIdError(
                    "no aggregate ID in the envelope, the headers "
                    f"({', '.join(AGGREGATE_ID_HEADERS)}) or the key"
                ),
                topic, partition, offset, key, value, hdrs, "", timestamp_ms, envelope,
            )  # fmt: skip
        else:
            aggregate_id = f"{topic}/{partition}/{offset}"

        return make_message(
            topic, partition, offset, key, value, hdrs, aggregate_id, timestamp_ms, envelope
        )

    @staticmethod
    def _fallback_id(id_headers: dict[int, bytes] | None, key: bytes | None) -> str:
        """Best-effort valid ID for a dead letter rejected before ID extraction."""
        raws = [id_headers[r] for r in sorted(id_headers)] if id_headers else []
        for raw in (*raws, key):
            if raw:
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    continue
                if text:
                    return text if _VALID_ID_MATCH(text) else ""
        return ""

    def _dead(
        self,
        error: IntakeError,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        headers: tuple[tuple[str, bytes], ...],
        aggregate_id: str,
        timestamp_ms: int,
        envelope: dict[str, Any] | None,
    ) -> DeadLetter:
        message = Message(
            topic, partition, offset, key, value, headers, aggregate_id, timestamp_ms, envelope
        )
        return DeadLetter(
            message=message,
            reason=error.reason,
            error_type=type(error).__name__,
            error_message=str(error),
            traceback="",
            attempts=0,
            mode="intake",
            executor=-1,
            time=self._clock(),
        )
