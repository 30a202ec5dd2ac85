"""The ``server`` package's public names, imported lazily."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import server


def test_every_exported_name_resolves() -> None:
    for name in server.__all__:
        assert getattr(server, name) is not None, name


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = server.Nope


def test_importing_the_package_does_not_import_kafka_or_grpc() -> None:
    code = "import sys, server; print('aiokafka' in sys.modules, 'grpc' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["False", "False"]


def test_the_version_is_the_installed_package_metadata() -> None:
    assert server.version() == metadata.version("kafka-actor-pool")
