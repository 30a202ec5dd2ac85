"""Intake: records become messages or intake dead letters, by docs/intake-and-config.md."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import DeadLetter, DeadLetterReason, Message
from server._config import load_settings
from server._intake import (
    AGGREGATE_ID_HEADERS,
    Decoder,
    IntakeOptions,
    is_valid_aggregate_id,
)


def envelope(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "event_id": "e-1",
        "aggregate_id": "order-1",
        "event_type": "OrderPlaced",
        "event_version": 1,
        "timestamp": "2026-11-25T10:00:00Z",
        "payload": {"amount": 3},
    }
    for name, value in fields.items():
        if value is ...:
            base.pop(name, None)
        else:
            base[name] = value
    return json.dumps(base).encode()


def decode(
    value: bytes | None,
    *,
    key: bytes | None = None,
    headers: Any = (),
    decoder: Decoder | None = None,
    offset: int = 7,
) -> Message | DeadLetter:
    return (decoder or Decoder()).decode("orders", 3, offset, key, value, headers, 1234)


def as_message(result: Message | DeadLetter) -> Message:
    assert isinstance(result, Message), f"expected a Message, got {result!r}"
    return result


def as_dead(result: Message | DeadLetter, reason: DeadLetterReason) -> DeadLetter:
    assert isinstance(result, DeadLetter), f"expected a DeadLetter, got {result!r}"
    assert result.reason is reason, result.error_message
    assert result.mode == "intake"
    assert result.executor == -1
    assert result.attempts == 0
    assert result.error_type
    assert result.error_message
    return result


# -- valid events ------------------------------------------------------------------


def test_valid_envelope_gives_message_with_envelope_and_coordinates() -> None:
    value = envelope(trace_id="t", correlation_id=None, tenant_id="acme")
    msg = as_message(decode(value, key=b"ignored", headers=(("h", b"v"),)))
    assert msg.aggregate_id == "order-1"
    assert msg.envelope is not None
    assert msg.envelope["event_type"] == "OrderPlaced"
    assert msg.envelope["payload"] == {"amount": 3}
    assert (msg.topic, msg.partition, msg.offset, msg.timestamp_ms) == ("orders", 3, 7, 1234)
    assert msg.key == b"ignored"
    assert msg.value == value
    assert msg.headers == (("h", b"v"),)


def test_envelope_with_leading_whitespace_is_parsed() -> None:
    msg = as_message(decode(b" \n\t" + envelope()))
    assert msg.envelope is not None


def test_envelope_number_timestamp_and_extra_fields_are_accepted() -> None:
    msg = as_message(decode(envelope(timestamp=1700000000123, schema="v9")))
    assert msg.envelope is not None
    assert msg.envelope["schema"] == "v9"


def test_id_order_envelope_then_headers_then_key() -> None:
    headers = (
        ("aggregate-id", b"h4"),
        ("Aggregate-ID", b"h3"),
        ("x-aggregate-id", b"h2"),
        ("X-Aggregate-ID", b"h1"),
    )
    assert as_message(decode(envelope(), headers=headers, key=b"k")).aggregate_id == "order-1"
    no_env_id = envelope(aggregate_id=...)
    assert as_message(decode(no_env_id, headers=headers, key=b"k")).aggregate_id == "h1"
    # Drop the best header one at a time: the next one in priority order takes over.
    remaining = list(headers)
    for expected in ("h1", "h2", "h3", "h4", "k"):
        got = as_message(decode(b"raw", headers=tuple(remaining), key=b"k")).aggregate_id
        assert got == expected, (remaining, got)
        if remaining:
            remaining.pop()


@pytest.mark.parametrize("name", AGGREGATE_ID_HEADERS)
def test_each_header_name_is_recognised(name: str) -> None:
    assert as_message(decode(b"raw", headers=((name, b"agg-7"),), key=b"k")).aggregate_id == (
        "agg-7"
    )


def test_other_header_spellings_are_not_ids() -> None:
    msg = as_message(decode(b"raw", headers=(("X-AGGREGATE-ID", b"no"),), key=b"k"))
    assert msg.aggregate_id == "k"


def test_first_occurrence_of_a_repeated_header_wins() -> None:
    headers = (("x-aggregate-id", b"first"), ("x-aggregate-id", b"second"))
    assert as_message(decode(b"raw", headers=headers)).aggregate_id == "first"


def test_ids_are_trimmed_and_blank_candidates_skipped() -> None:
    assert as_message(decode(b"raw", key=b"  spaced  ")).aggregate_id == "spaced"
    env = envelope(aggregate_id="   ")
    assert as_message(decode(env, headers=(("X-Aggregate-ID", b" "),), key=b"k")).aggregate_id == (
        "k"
    )
    headers = (("X-Aggregate-ID", b""), ("aggregate-id", b"lower"))
    assert as_message(decode(b"raw", headers=headers)).aggregate_id == "lower"


def test_valid_id_charset_and_length_boundary() -> None:
    ok = "Az09:_-./" * 28 + "abcd"  # 256 characters
    assert len(ok) == 256
    assert is_valid_aggregate_id(ok)
    assert as_message(decode(b"raw", key=ok.encode())).aggregate_id == ok
    assert not is_valid_aggregate_id(ok + "x")
    assert not is_valid_aggregate_id("")


@pytest.mark.parametrize(
    "value",
    [b"plain text", b"\x00\xff\xfe binary", b"[1, 2, 3]", b'"a string"', b"42", b"", None],
)
def test_non_envelope_values_route_by_key(value: bytes | None) -> None:
    msg = as_message(decode(value, key=b"agg-1"))
    assert msg.envelope is None
    assert msg.aggregate_id == "agg-1"
    assert msg.value == (value or b"")


def test_json_object_without_envelope_fields_is_not_an_envelope() -> None:
    msg = as_message(decode(b'{"amount": 5, "currency": "EUR"}', key=b"agg-2"))
    assert msg.envelope is None
    assert msg.aggregate_id == "agg-2"


def test_null_header_values_become_empty_bytes() -> None:
    msg = as_message(decode(b"raw", key=b"k", headers=[("h", None), ("g", b"x")]))
    assert msg.headers == (("h", b""), ("g", b"x"))


def test_list_headers_are_normalised_to_a_tuple() -> None:
    msg = as_message(decode(b"raw", key=b"k", headers=[("h", b"v")]))
    assert msg.headers == (("h", b"v"),)


# -- no ID: the policy -------------------------------------------------------------


def test_missing_id_routes_by_offset_by_default() -> None:
    msg = as_message(decode(b"raw"))
    assert msg.aggregate_id == "orders/3/7"
    assert is_valid_aggregate_id(msg.aggregate_id)


def test_missing_id_dead_letter_policy() -> None:
    decoder = Decoder(IntakeOptions(missing_id_policy="dead-letter"), clock=lambda: 99.0)
    dead = as_dead(decode(b"raw", decoder=decoder), DeadLetterReason.MISSING_AGGREGATE_ID)
    assert dead.time == 99.0
    assert dead.error_type == "MissingAggregateIdError"
    assert dead.message.offset == 7
    assert dead.message.value == b"raw"
    # a valid envelope without aggregate_id and nothing else: also missing
    no_id = envelope(aggregate_id=...)
    as_dead(decode(no_id, decoder=decoder), DeadLetterReason.MISSING_AGGREGATE_ID)


def test_decoder_takes_settings_or_their_intake_section() -> None:
    settings_ = load_settings(
        ["--set", "intake.missingIdPolicy=dead-letter", "--set", "intake.maxValueBytes=10"], {}
    )
    for source in (settings_, settings_.intake):
        decoder = Decoder(source)
        assert decoder.options == IntakeOptions(10, "dead-letter")


# -- invalid IDs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"key": b"has space"}, "key"),
        ({"key": b"x" * 257}, "longer than 256"),
        ({"key": "caf\u00e9".encode()}, "outside"),
        ({"key": b"\xff\xfe"}, "key is not UTF-8"),
        ({"headers": (("X-Aggregate-ID", b"a;b"),)}, "header X-Aggregate-ID"),
        ({"headers": (("aggregate-id", b"\xc3\x28"),)}, "header aggregate-id is not UTF-8"),
    ],
)
def test_invalid_ids_are_dead_lettered(kwargs: dict[str, Any], fragment: str) -> None:
    dead = as_dead(decode(b"raw", **kwargs), DeadLetterReason.INVALID_AGGREGATE_ID)
    assert fragment in dead.error_message
    assert dead.message.aggregate_id == ""


def test_invalid_envelope_id_is_not_replaced_by_the_key() -> None:
    dead = as_dead(
        decode(envelope(aggregate_id="bad id!"), key=b"good"), DeadLetterReason.INVALID_AGGREGATE_ID
    )
    assert "envelope aggregate_id" in dead.error_message
    assert dead.message.envelope is not None  # the parsed envelope travels with it


def test_invalid_header_id_is_not_replaced_by_the_key() -> None:
    as_dead(
        decode(b"raw", headers=(("x-aggregate-id", b"no way"),), key=b"good"),
        DeadLetterReason.INVALID_AGGREGATE_ID,
    )


# -- malformed envelopes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b'{"event_id": "e", truncated', "not valid JSON"),
        (b"{\xff\xfe}", "not valid JSON"),
        (b"{" * 100_000, "not valid JSON"),
        (envelope(event_id=...), "event_id must be a non-empty string"),
        (envelope(event_id=""), "event_id must be a non-empty string"),
        (envelope(event_type=5), "event_type must be a non-empty string"),
        (envelope(event_version=0), "event_version must be an integer > 0"),
        (envelope(event_version="1"), "event_version must be an integer > 0"),
        (envelope(event_version=True), "event_version must be an integer > 0"),
        (envelope(event_version=1.0), "event_version must be an integer > 0"),
        (envelope(timestamp=...), "timestamp must be a string or a number"),
        (envelope(timestamp=""), "timestamp must not be empty"),
        (envelope(timestamp=-1), "timestamp must be a string or a number >= 0"),
        (envelope(aggregate_id=12), "aggregate_id must be a string"),
        (envelope(trace_id=1), "trace_id must be a string or null"),
        (envelope(tenant_id=[]), "tenant_id must be a string or null"),
        (b'{"aggregate_id": "a-1"}', "event_id must be a non-empty string"),
    ],
)
def test_malformed_envelopes_are_dead_lettered(value: bytes, fragment: str) -> None:
    dead = as_dead(decode(value, key=b"k-1"), DeadLetterReason.MALFORMED_ENVELOPE)
    assert fragment in dead.error_message
    assert dead.error_type == "MalformedEnvelopeError"
    assert dead.message.value == value
    assert dead.message.aggregate_id == "k-1"  # best effort from headers/key


def test_malformed_envelope_lists_every_problem() -> None:
    dead = as_dead(
        decode(envelope(event_id=..., event_version=-3)), DeadLetterReason.MALFORMED_ENVELOPE
    )
    assert "event_id" in dead.error_message
    assert "event_version" in dead.error_message


# -- oversized ---------------------------------------------------------------------


def test_oversized_value_is_dead_lettered_without_parsing() -> None:
    decoder = Decoder(IntakeOptions(max_value_bytes=64))
    big = envelope(payload="x" * 100)
    assert len(big) > 64
    dead = as_dead(
        decode(big, decoder=decoder, headers=(("X-Aggregate-ID", b"agg-9"),)),
        DeadLetterReason.OVERSIZED_VALUE,
    )
    assert dead.message.envelope is None
    assert dead.message.aggregate_id == "agg-9"
    assert "over the 64-byte limit" in dead.error_message
    # at the limit it passes
    exact = b"x" * 64
    assert as_message(decode(exact, decoder=decoder, key=b"k")).value == exact


def test_default_limit_is_one_mebibyte() -> None:
    assert as_message(decode(b"x" * (1 << 20), key=b"k"))
    as_dead(decode(b"x" * ((1 << 20) + 1), key=b"k"), DeadLetterReason.OVERSIZED_VALUE)


# -- never raises ------------------------------------------------------------------

_header_names = st.sampled_from([*AGGREGATE_ID_HEADERS, "trace", "X-AGGREGATE-ID", ""])
_header_values = st.one_of(st.none(), st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(
    key=st.one_of(st.none(), st.binary(max_size=300)),
    value=st.one_of(st.none(), st.binary(max_size=400), st.binary().map(lambda b: b"{" + b)),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=6),
    policy=st.sampled_from(["route-by-offset", "dead-letter"]),
    offset=st.integers(min_value=0, max_value=2**62),
)
def test_never_raises_on_arbitrary_bytes(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
    policy: str,
    offset: int,
) -> None:
    decoder = Decoder(IntakeOptions(max_value_bytes=256, missing_id_policy=policy))  # type: ignore[arg-type]
    result = decoder.decode("t", 0, offset, key, value, headers, 0)
    if isinstance(result, Message):
        assert is_valid_aggregate_id(result.aggregate_id)
    else:
        assert result.mode == "intake"
        assert result.reason in DeadLetterReason
        assert result.message.offset == offset
    assert all(isinstance(v, bytes) for _, v in result_headers(result))


@settings(max_examples=300, deadline=None)
@given(
    doc=st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                st.sampled_from(
                    ["event_id", "aggregate_id", "event_type", "event_version", "timestamp",
                     "trace_id", "tenant_id", "payload", "other"]
                ),
                children,
                max_size=8,
            ),
        ),
        max_leaves=20,
    )
)  # fmt: skip
def test_never_raises_on_arbitrary_json(doc: Any) -> None:
    value = json.dumps(doc).encode()
    result = Decoder().decode("t", 1, 2, b"fallback", value, (), 0)
    if isinstance(result, Message) and result.envelope is not None:
        assert result.envelope == json.loads(value)
    elif isinstance(result, DeadLetter):
        assert result.reason in (
            DeadLetterReason.MALFORMED_ENVELOPE,
            DeadLetterReason.INVALID_AGGREGATE_ID,
        )


def result_headers(result: Message | DeadLetter) -> tuple[tuple[str, bytes], ...]:
    return result.headers if isinstance(result, Message) else result.message.headers


def test_decode_record_reads_a_consumer_record() -> None:
    class Record:
        topic, partition, offset, key = "orders", 1, 5, b"k"
        value, headers, timestamp = b"v", (("a", b"b"),), 77

    msg = as_message(Decoder().decode_record(Record()))
    assert (msg.topic, msg.partition, msg.offset, msg.aggregate_id, msg.timestamp_ms) == (
        "orders",
        1,
        5,
        "k",
        77,
    )


def test_an_envelope_timestamp_of_nan_is_malformed() -> None:
    """``NaN`` is not a number >= 0 (it passed ``ts < 0``; found by the bad-input campaign)."""
    value = envelope().replace(b'"2026-11-25T10:00:00Z"', b"NaN")
    dead = as_dead(decode(value), DeadLetterReason.MALFORMED_ENVELOPE)
    assert "timestamp must be a string or a number >= 0" in dead.error_message
    as_message(decode(envelope().replace(b'"2026-11-25T10:00:00Z"', b"Infinity")))
