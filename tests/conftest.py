"""Session fixtures and the test lanes.

Fixtures: one embedded Tansu broker for the whole run, torn down for sure.

Markers (registered in pyproject.toml): ``campaign`` is applied here to every
test under ``tests/bench/``; ``prometheus`` and ``process`` to every test using
a ``prometheus`` fixture (a real Prometheus server, tests/deploy/). Tests that
start the service as a process carry ``process`` themselves, and the promtool
tests ``prometheus``. ``make test-fast`` runs ``-m "not process and not campaign"``.

The ``prometheus`` tests need the ``prometheus`` and ``promtool`` binaries
(``make test`` installs them when it can do so without a prompt). When they are
missing the tests are skipped, with one line in the summary; under ``CI=true``
the run stops with an error instead, so CI never passes without them.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from server._broker import EmbeddedBroker

_topic_counter = itertools.count()

TESTS = Path(__file__).resolve().parent
PROMETHEUS_BINARIES = ("prometheus", "promtool")
PROMETHEUS_HINT = "apt-get install prometheus, or run `make test` as root"
PROMETHEUS_MISSING = f"prometheus/promtool not installed: {PROMETHEUS_HINT}"


def missing_prometheus_binaries() -> list[str]:
    return [b for b in PROMETHEUS_BINARIES if shutil.which(b) is None]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(TESTS / "bench"):
            item.add_marker(pytest.mark.campaign)
        if "prometheus" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.prometheus)
            item.add_marker(pytest.mark.process)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under CI=true the Prometheus tests must run: no binaries is an error, not a skip."""
    missing = missing_prometheus_binaries()
    if missing and in_ci() and any(i.get_closest_marker("prometheus") for i in session.items):
        raise pytest.UsageError(
            f"CI=true: the Prometheus tests must run, but {' and '.join(missing)} not installed: "
            f"{PROMETHEUS_HINT}"
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Skipped from here, before the fixtures start anything, so that every
    # such skip folds into the same single summary line.
    if item.get_closest_marker("prometheus") and missing_prometheus_binaries():
        pytest.skip(PROMETHEUS_MISSING)


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
