"""Is a replica that has not applied a fleet state yet provably gone?

A fleet call waits for every live replica; a replica killed with ``kill -9``
leaves its last report behind, live until it is three heartbeats old. Instead
of waiting that long, the replica waiting probes the gRPC address from the
report (:func:`probe_gone`) and stops waiting only on proof that the process
that made the report is no longer there:

- **connection refused** at the address: nothing listens there (a replica's
  gRPC server is up from before its first report until after its tombstone);
- **another process answers there**: every replica registers a health
  service named after its instance (:func:`identity_service`) before its
  first report; ``NOT_FOUND`` (or ``UNIMPLEMENTED``: no health service at
  all) for that name means the address is held by someone else now.

Anything else proves nothing and the replica is still waited for: a connect
or health check timing out (a live replica with a saturated event loop, a
stopped process, a network partition), host or network unreachable, any
other status, including ``NOT_SERVING`` (a replica stopping: it still follows
the topic until its tombstone).

An address names one process only where the prober sees the same network: a
loopback (``127.0.0.1``) or unspecified (``0.0.0.0``) address only on the
same host, so such addresses are probed only when the report's host name is
the prober's. With TLS on the control plane, only the connect is probed (the
identity check would need client credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["IDENTITY_SERVICE_PREFIX", "identity_service", "probe_gone"]

#: Health service names ``<prefix><instance>``: which replica serves an address.
IDENTITY_SERVICE_PREFIX: Final = "actorpool.control.v1.FleetReplica/"
#: Answers to the identity check that prove the instance is not at the address.
_NOT_THERE: Final = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)


def identity_service(instance: str) -> str:
    """The health service name a replica registers for itself."""
    return IDENTITY_SERVICE_PREFIX + instance


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def dial_target(address: str, *, same_host: bool) -> tuple[str, int] | None:
    """Where to probe the replica that reported ``address`` (``None``: the
    address does not name one process from here)."""
    split = _split(address)
    if split is None:
        return None
    host, port = split
    if host in ("", "localhost"):
        return ("127.0.0.1", port) if same_host else None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port  # a DNS name: the same for every prober
    if ip.is_unspecified:
        if not same_host:
            return None
        return ("::1" if ip.version == 6 else "127.0.0.1"), port
    if ip.is_loopback and not same_host:
        return None
    return host, port


def _identity_check(target: str, service: str, timeout: float) -> grpc.StatusCode | None:
    """``grpc.health.v1.Health/Check`` for ``service`` (blocking; in a worker thread)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode | None = exc.code()
            return code
    return grpc.StatusCode.OK


async def probe_gone(
    address: str,
    instance: str,
    *,
    same_host: bool,
    tls: bool = False,
    timeout: float = 0.5,
) -> str | None:
    """Why the process of ``instance`` (which reported ``address``) is provably
    gone, or ``None`` when it may be alive (or the address proves nothing)."""
    dial = dial_target(address, same_host=same_host)
    if dial is None:
        return None
    host, port = dial
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return f"nothing listens at {address} (connection refused)"
    except (OSError, TimeoutError):
        return None  # unreachable or slow: not a proof
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    if tls:
        return None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    code = await asyncio.get_running_loop().run_in_executor(
        None, _identity_check, target, identity_service(instance), timeout
    )
    if code in _NOT_THERE:
        return f"{address} is served by another process ({instance} is not there)"
    return None
