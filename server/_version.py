"""The service's version: read from the installed package's metadata, the one place
it is written being ``pyproject.toml``."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Final

__all__ = ["DISTRIBUTION", "version"]

#: The distribution name in ``pyproject.toml``.
DISTRIBUTION: Final = "kafka-actor-pool"


@functools.cache
def version() -> str:
    """The installed ``kafka-actor-pool`` version, ``"unknown"`` when it is not installed
    (running from a source tree that was never ``pip install``-ed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
