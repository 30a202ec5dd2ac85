"""Intake's hot-path shortcuts give exactly what the plain code gives.

``_loads`` must equal ``json.loads`` (value or exception, message included) and
``_envelope_ok`` must equal ``_envelope_problem(...) is None``, for any input.
``_loads`` decodes with msgspec and leaves what msgspec refuses to
``json.loads``: the tests below aim at where the two JSON readers could differ
(numbers, strings and their bytes, whitespace, repeated keys, nesting), and
compare parsed values exactly (types, key order, float bits).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server._intake import _MSGSPEC_DECODE, _envelope_ok, _envelope_problem, _loads

FIELDS = (
    "event_id",
    "aggregate_id",
    "event_type",
    "event_version",
    "timestamp",
    "trace_id",
    "correlation_id",
    "tenant_id",
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "\t\n", "x", " e-1 "]),
    st.text(max_size=5),
)
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=2), st.just({}))


def outcome(fn: Any, value: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(value)
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


def same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    # NaN != NaN: compare the JSON text of parsed values instead.
    if a[0] == b[0] == "ok":
        return json.dumps(a[1], sort_keys=True) == json.dumps(b[1], sort_keys=True)
    return a == b


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))
def test_envelope_fast_check_agrees_with_the_explained_rules(obj: dict[str, Any]) -> None:
    # Round trip through JSON so the values are what json.loads gives intake.
    parsed = json.loads(json.dumps(obj))
    assert _envelope_ok(parsed) == (_envelope_problem(parsed) is None), parsed


def test_envelope_fast_check_on_the_edge_cases() -> None:
    good = {"event_id": "e", "event_type": "T", "event_version": 1, "timestamp": 0}
    assert _envelope_ok(good)
    for name, bad in [
        ("timestamp", math.nan),
        ("timestamp", -0.5),
        ("timestamp", True),
        ("timestamp", " "),
        ("event_version", True),
        ("event_version", 1.0),
        ("event_id", " "),
        ("aggregate_id", 3),
        ("tenant_id", []),
    ]:
        obj = good | {name: bad}
        assert not _envelope_ok(obj), obj
        assert _envelope_problem(obj) is not None, obj
    assert _envelope_ok(good | {"aggregate_id": None, "trace_id": None, "timestamp": "t"})


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40).map(lambda b: b"{" + b),
        st.dictionaries(st.text(max_size=4), json_values, max_size=3).map(
            lambda d: json.dumps(d).encode()
        ),
        st.tuples(
            st.dictionaries(st.text(max_size=4), json_scalars, max_size=3),
            st.sampled_from(["", " ", "\n", "x", "}", " {}"]),
            st.sampled_from(["utf-8", "utf-16-le", "utf-32-le"]),
        ).map(lambda t: (json.dumps(t[0]) + t[1]).encode(t[2])),
    )
)
def test_loads_equals_json_loads(value: bytes) -> None:
    assert same(outcome(_loads, value), outcome(json.loads, value)), value


def test_loads_edge_cases_equal_json_loads() -> None:
    for value in [
        b"{",
        b"{}",
        b"{} ",
        b"{}x",
        b'{"a":1}\n',
        b'{"a":NaN}',
        b'{"a":"\xff"}',
        b'{"a":"\\ud800"}',
        '{"a":1}'.encode("utf-16-le"),
        b"{" * 100_000,
        b'{"a":' * 100_000,
    ]:
        assert same(outcome(_loads, value), outcome(json.loads, value)), value[:20]


def exactly(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """Same outcome; parsed values with the same types, key order and float bits.

    ``repr`` tells ``1`` from ``1.0`` and ``True``, ``-0.0`` from ``0.0``,
    keeps key order and prints a float's shortest round-trip digits (NaN as
    ``nan``, which never compares equal).
    """
    if a[0] == b[0] == "ok":
        return repr(a[1]) == repr(b[1])
    return a == b


json_docs = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=400, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=6), json_docs, max_size=5),
    ensure_ascii=st.booleans(),
    spaced=st.sampled_from([None, 0, 2, "\t", "\r\n "]),
)
def test_loads_is_json_loads_on_json_texts(doc: Any, ensure_ascii: bool, spaced: Any) -> None:
    value = json.dumps(doc, ensure_ascii=ensure_ascii, indent=spaced).encode()
    assert exactly(outcome(_loads, value), outcome(json.loads, value)), value
    assert exactly(outcome(_MSGSPEC_DECODE, value), outcome(json.loads, value)), (
        "strict JSON is msgspec's, not the fallback's"
    )


NUMBER = r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?"


@settings(max_examples=500, deadline=None)
@given(number=st.one_of(st.from_regex(NUMBER, fullmatch=True), st.from_regex(r"[-+0-9.eE]{1,12}")))
def test_loads_is_json_loads_on_numbers(number: str) -> None:
    # Valid numbers (float rounding, exponents out of range, -0) and near misses.
    for value in (f'{{"n":{number}}}'.encode(), f'{{"n":[{number}, {number}]}}'.encode()):
        assert exactly(outcome(_loads, value), outcome(json.loads, value)), value


@settings(max_examples=500, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=12),
        st.text(max_size=8).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(
            st.sampled_from(
                [b"\\", b'\\"', b"\\u", b"d800", b"DC00", b"00e9", b"\\n", b"\\/", b"\\x",
                 b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x00", b"\x1f", b"\x7f",
                 b"\xc2\x85", b"\xe2\x80\xa8", b"a"]
            ),
            max_size=6,
        ).map(b"".join),
    ),
    as_key=st.booleans(),
)  # fmt: skip
def test_loads_is_json_loads_on_string_bytes(raw: bytes, as_key: bool) -> None:
    # Bytes inside a string: control characters, escapes, invalid and
    # surrogate UTF-8 (json.loads decodes with surrogatepass, msgspec refuses).
    value = b'{"' + raw + b'":1}' if as_key else b'{"s":"' + raw + b'"}'
    assert exactly(outcome(_loads, value), outcome(json.loads, value)), value


def test_loads_is_json_loads_on_the_readers_edges() -> None:
    values = [
        b'{"a":1,"b":2,"a":3}',  # the last value, at the first key's place
        b'{"b":{"x":1},"a":[],"b":{"y":2}}',
        b'{"a":-0,"b":-0.0,"c":0e0,"d":1E+2,"e":1e-400,"f":1e400,"g":-1e400}',
        b'{"a":1.7976931348623157e308,"b":1.7976931348623159e308,"c":5e-324,"d":2.4e-324}',
        b'{"a":9007199254740993,"b":18446744073709551616,"c":-9223372036854775809}',
        b'{"a":0.1000000000000000055511151231257827,"b":123456789012345678901234567890e-10}',
        b'{"a":NaN}',
        b'{"a":-Infinity}',
        b'{"a":nan}',
        b'{"a":"\\ud800"}',
        b'{"a":"\\ud83d\\ude00","\\u00e9":"\\/"}',
        b' \t\r\n{ "a" :\t1 ,\n"b":[ ] } \r\n\t',
        b"{\x0b}",
        b"{\x0c}",
        b'{"a":1}\x0c',
        b'{"a":1}\xc2\xa0',
        b"\xef\xbb\xbf{}",
        b'{"a":true,"b":false,"c":null}',
        b'{"a":True}',
        b'{"a":tru}',
        b"{'a':1}",
        b'{"a":1,}',
        b'{"a":[1,]}',
        b'{"a":01}',
        b'{"a":1.}',
        b'{"a":.5}',
        b'{"a":+1}',
        b'{"a" 1}',
        b'{"a":1"b":2}',
        '{"a":1}'.encode("utf-16"),
        '{"a":1}'.encode("utf-32-le"),
        b'{"a":' + b"9" * 4300 + b"}",
        b'{"a":' + b"9" * 4301 + b"}",
        b'{"a":-' + b"9" * 4301 + b"}",
        b'{"a":0.' + b"9" * 5000 + b"}",
        b'{"a":' + b"[" * 500 + b"]" * 500 + b"}",
        b'{"a":' * 500 + b"1" + b"}" * 500,
        b"[" * 100_000,
    ]
    values += [b'{"a":"' + bytes([c]) + b'"}' for c in range(0x20)]
    for value in values:
        assert exactly(outcome(_loads, value), outcome(json.loads, value)), value[:40]


def test_loads_gives_up_on_deep_nesting_like_json_loads() -> None:
    # Near Python's recursion limit msgspec nests a few levels deeper than
    # json.loads (see _loads); well past it both fail the same way. The limit
    # is read, not assumed: other tests in the same process may have raised it.
    depth = sys.getrecursionlimit() + 100
    for value in (
        b'{"a":' * depth + b"1" + b"}" * depth,
        b'{"a":' + b"[" * depth + b"]" * depth + b"}",
    ):
        got, want = outcome(_loads, value), outcome(json.loads, value)
        assert got == want
        assert got[0] == "RecursionError"
