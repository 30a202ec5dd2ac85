"""The clients' version (``poolctl --version``): the installed package's metadata.

The same lookup as ``server._version``, kept here so the clients import nothing
from the server.
"""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["version"]


@functools.cache
def version() -> str:
    """The installed ``kafka-actor-pool`` version, ``"unknown"`` when it is not installed."""
    try:
        return metadata.version("kafka-actor-pool")
    except metadata.PackageNotFoundError:
        return "unknown"
