"""Intake's hot-path shortcuts give exactly what the plain code gives.

``_loads`` must equal ``json.loads`` (value or exception, message included) and
``_envelope_ok`` must equal ``_envelope_problem(...) is None``, for any input.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server._intake import _envelope_ok, _envelope_problem, _loads

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
