"""``grpc.health.v1.Health``: SERVING only when ready, not draining, not stopping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

__all__ = ["HEALTH_SERVICE_NAME", "HealthState"]

HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthState:
    """The health service's answer for ``names`` ("" is the whole server).

    SERVING only when ``ready``, no drain running (``draining`` counts them)
    and not ``stopping``; :meth:`update` publishes the current answer.
    """

    def __init__(self, servicer: health_aio.HealthServicer, names: Sequence[str]) -> None:
        self.servicer = servicer
        self.names = tuple(names)
        self.ready = False
        self.draining = 0
        self.stopping = False

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining and not self.stopping

    async def update(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)
