"""``make_message`` builds exactly the ``Message`` that ``Message(...)`` builds."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import Message
from pool._message import make_message

fields_strategy = st.tuples(
    st.text(max_size=5),
    st.integers(min_value=0, max_value=2**31),
    st.integers(min_value=0, max_value=2**62),
    st.one_of(st.none(), st.binary(max_size=5)),
    st.binary(max_size=5),
    st.lists(st.tuples(st.text(max_size=3), st.binary(max_size=3)), max_size=2).map(tuple),
    st.text(max_size=5),
    st.integers(min_value=-1, max_value=2**41),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
)


@settings(max_examples=200, deadline=None)
@given(fields_strategy)
def test_make_message_equals_the_constructor(args: tuple[Any, ...]) -> None:
    made, built = make_message(*args), Message(*args)
    assert type(made) is Message
    assert made == built
    assert repr(made) == repr(built)
    assert dataclasses.astuple(made) == dataclasses.astuple(built)
    for field in dataclasses.fields(Message):
        assert getattr(made, field.name) is getattr(built, field.name)


def test_a_made_message_is_a_frozen_slotted_dataclass_like_any_other() -> None:
    args = ("t", 1, 2, b"k", b"v", (("h", b"x"),), "agg-1", 3, None)
    made = make_message(*args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.topic = "other"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        made.extra = 1  # type: ignore[attr-defined]
    assert not hasattr(made, "__dict__")
    assert hash(made) == hash(Message(*args))
    assert dataclasses.replace(made, offset=9) == Message(
        "t", 1, 9, b"k", b"v", args[5], "agg-1", 3
    )
    assert pickle.loads(pickle.dumps(made)) == made
    assert copy.deepcopy(made) == made
    assert make_message(*args[:-1], {"a": 1}).envelope == {"a": 1}
