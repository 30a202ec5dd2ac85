"""Session fixtures: one embedded Tansu broker for the whole run, torn down for sure."""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Iterator

import pytest

from server._broker import EmbeddedBroker

_topic_counter = itertools.count()

#: Type of the ``make_topic`` fixture: ``await make_topic(partitions=3, prefix="t")``.
MakeTopic = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded broker, started once per session; its log is in the tmp dir."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(log_path=log_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def make_topic(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> MakeTopic:
    """Create a uniquely named topic with N partitions; returns its name."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]

    async def _make(partitions: int = 1, prefix: str | None = None) -> str:
        name = f"{prefix or base}-{os.getpid()}-{next(_topic_counter)}"
        await broker.create_topics({name: partitions})
        return name

    return _make
