"""Dead-letter records: the traceback text, the log line."""

from __future__ import annotations

import asyncio
import re
import traceback
from collections.abc import Callable

import pytest
import structlog

from pool import Message, NonRetryableError
from pool._deadletter import format_exception
from tests.pool.conftest import PoolFactory, msg

_MARKERS = re.compile(r"^[ |]*[\^~]+\s*$")


def _fail(depth: int) -> None:
    if depth:
        _fail(depth - 1)
    else:
        raise ValueError("the bottom " + str(depth))


def _caught(fn: Callable[[], object]) -> Exception:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def _chained() -> None:
    try:
        _fail(2)
    except ValueError as exc:
        try:
            raise KeyError("while handling") from exc
        except KeyError:
            raise RuntimeError("and then") from None


def _context() -> None:
    try:
        _fail(1)
    except ValueError:
        raise RuntimeError("during handling")  # noqa: B904 - implicit context on purpose


def _group() -> None:
    raise ExceptionGroup("two", [_caught(lambda: _fail(1)), _caught(_context)])


def _expected(exc: BaseException) -> str:
    lines = "".join(traceback.format_exception(exc)).splitlines(keepends=True)
    return "".join(line for line in lines if not _MARKERS.match(line))


def test_the_traceback_is_the_standard_one_without_position_markers() -> None:
    for fn in (lambda: _fail(3), _chained, _context, _group):
        exc = _caught(fn)
        text = format_exception(exc)
        assert text == _expected(exc)
        assert "^" not in text
    # The standard text of these does have markers: the comparison is not empty.
    standard = "".join(traceback.format_exception(_caught(_group))).splitlines()
    assert any(_MARKERS.match(line) for line in standard)


def test_the_chain_is_kept() -> None:
    text = format_exception(_caught(_context))
    assert "ValueError: the bottom 0" in text
    assert "During handling of the above exception" in text
    assert text.rstrip().endswith("RuntimeError: during handling")


@pytest.mark.parametrize("log_dead_letters", [True, False])
async def test_each_dead_letter_is_logged_as_a_warning_unless_turned_off(
    pool_factory: PoolFactory, log_dead_letters: bool
) -> None:
    async def handler(m: Message) -> None:
        raise NonRetryableError("rejected")

    pool = pool_factory(handler, size=2, log_dead_letters=log_dead_letters)
    with structlog.testing.capture_logs() as logs:
        async with pool:
            dead = await asyncio.wait_for(await pool.submit(msg("a", 7)), 5)
    assert dead is not None
    lines = [e for e in logs if e["event"] == "pool.dead_letter"]
    assert [(e["log_level"], e["offset"], e["reason"]) for e in lines] == [
        ("warning" if log_dead_letters else "debug", 7, "non-retryable")
    ]
