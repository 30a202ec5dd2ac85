"""The README shows what the code does: the ``make run`` banner is the one
``pool-server --embedded --demo`` prints with the default configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.__main__ import _banner
from server._config import load_settings
from server._service import Endpoints

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_banner() -> list[str]:
    blocks = re.findall(r"^```\w*\n(.*?)^```$", README.read_text(), re.S | re.M)
    (banner,) = [str(b) for b in blocks if b.startswith("pool-server is running")]
    return banner.splitlines()


def test_the_make_run_banner_is_what_pool_server_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = load_settings(["--embedded", "--demo"], {})
    broker = re.search(r"broker +(\S+)", "\n".join(readme_banner()))
    assert broker is not None
    endpoints = Endpoints(
        bootstrap_servers=broker[1],  # a free port, different on every run
        grpc_address=settings.grpc.address,
        metrics_address=settings.metrics.address,
        topics=settings.kafka.topics,
        group_id=settings.kafka.consumer.group_id,
    )
    _banner(settings, endpoints, embedded=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert printed == readme_banner()
