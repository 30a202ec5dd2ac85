"""Both Python clients against a real control-plane server on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from clients import (
    AsyncPoolControlClient,
    AuthError,
    ClientTls,
    DeadlineError,
    InvalidArgumentError,
    NotFoundError,
    PoolControlClient,
    RetryOptions,
    UnavailableError,
    dead_letter_filter,
    mode_name,
)
from pool import PoolMode
from tests.helpers import assert_eventually, find_free_port
from tests.server.grpc_harness import ADMIN, READER, Gate, control_server
from tests.server.tls_certs import Certs, make_certs

FAST_RETRY = RetryOptions(attempts=4, initial_backoff=0.01, max_backoff=0.05)


async def test_async_client_reads_and_mutates() -> None:
    gate = Gate(closed=True)
    async with (
        control_server(gate, admin_token=ADMIN, read_token=READER) as h,
        AsyncPoolControlClient(h.address, token=ADMIN) as client,
    ):
        await h.target.feed("agg-1")
        status = await client.status()
        assert mode_name(status.mode) == "keyed"
        assert status.in_flight == 1
        # agg-1 is held in the keyed pool: do not wait for it to hand over.
        switched = await client.set_mode("actor", request_id="m1", wait_timeout=0)
        assert mode_name(switched.result.mode) == "actor"
        assert switched.result.pending_aggregates == 1
        assert not switched.replayed
        assert (await client.set_mode(PoolMode.KEYED, request_id="m1")).replayed
        assert h.switch.mode is PoolMode.ACTOR
        assert (await client.set_rollout(40, wait_timeout=0)).result.rollout_percent == 40.0
        depth = await client.inbox_depth(aggregate_id="agg-1", top=3)
        assert depth.aggregate.depth == 1
        assert await client.pause([("events", 0)]) == [("events", 0)]
        assert await client.resume() == [("events", 0)]
        assert await client.health() == "SERVING"
        gate.open()


async def test_async_client_raises_typed_errors() -> None:
    async with control_server(admin_token=ADMIN, read_token=READER) as h:
        async with AsyncPoolControlClient(h.address, token=READER) as reader:
            assert (await reader.status()).version == "test"
            with pytest.raises(AuthError) as denied:
                await reader.set_mode("actor")
            assert denied.value.code.name == "PERMISSION_DENIED"
        async with AsyncPoolControlClient(h.address, token=ADMIN) as admin:
            with pytest.raises(InvalidArgumentError):
                await admin.set_rollout(250)
            with pytest.raises(NotFoundError):
                await admin.pause([("nope", 3)])
            with pytest.raises(ValueError, match="keyed"):
                await admin.set_mode("turbo")
        async with AsyncPoolControlClient(h.address) as anonymous:
            with pytest.raises(AuthError) as missing:
                await anonymous.status()
            assert missing.value.code.name == "UNAUTHENTICATED"


async def test_async_client_drain_reports_progress_and_partial_results() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h, AsyncPoolControlClient(h.address) as client:
        for n in range(3):
            await h.target.feed(f"agg-{n}")
        with pytest.raises(DeadlineError) as timed_out:
            await client.drain(0.2, resume_after=True)
        assert timed_out.value.partial is not None
        assert timed_out.value.partial.remaining == 3
        progress: list[int] = []

        async def release_when_reported() -> None:
            await assert_eventually(lambda: progress, message="drain progress reported")
            gate.open()

        releaser = asyncio.create_task(release_when_reported())
        result = await client.drain(5, on_progress=lambda p: progress.append(p.remaining))
        await releaser
        assert result.complete
        assert result.finished == 3
        assert progress[0] == 3


async def test_async_client_streams_and_redrives_dead_letters() -> None:
    async with control_server() as h, AsyncPoolControlClient(h.address) as client:
        for n in range(3):
            await (await h.target.feed(f"poison-{n}"))
        events = [e async for e in client.dead_letters()]
        assert [e.WhichOneof("event") for e in events] == ["dead_letter"] * 3 + ["backlog_end"]
        only = [
            e.dead_letter.aggregate_id
            async for e in client.dead_letters(filter=dead_letter_filter(aggregate_id="poison-2"))
            if e.HasField("dead_letter")
        ]
        assert only == ["poison-2"]
        ids = [e.dead_letter.id for e in events[:2]]
        redriven = await client.redrive(ids=ids)
        assert (redriven.matched, redriven.republished) == (2, 2)
        assert [d.aggregate_id for d in h.target.redriven] == ["poison-0", "poison-1"]


async def test_async_client_retries_unavailable_with_the_same_request_id() -> None:
    async with control_server() as h:
        h.target.unavailable["status"] = 2
        h.target.unavailable["pause"] = 1
        async with AsyncPoolControlClient(h.address, retry=FAST_RETRY) as client:
            assert (await client.status()).version == "test"
            with capture_logs() as logs:
                await client.pause()
            audits = [e for e in logs if e["event"] == "control.audit"]
            assert [a["outcome"] for a in audits] == ["UNAVAILABLE", "OK"]
            assert audits[0]["request_id"] == audits[1]["request_id"] != ""
        h.target.unavailable["status"] = 1
        no_retry = RetryOptions(attempts=1)
        async with AsyncPoolControlClient(h.address, retry=no_retry) as client:
            with pytest.raises(UnavailableError):
                await client.status()


async def test_async_client_reports_an_unreachable_server_as_unavailable() -> None:
    port = find_free_port()
    async with AsyncPoolControlClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await client.status(timeout=2)
        assert time.monotonic() - started < 5


async def test_sync_client_against_the_same_server() -> None:
    gate = Gate(closed=True)
    async with control_server(gate, admin_token=ADMIN) as h:
        await h.target.feed("poison-x")
        await h.target.feed("agg-1")

        def script() -> tuple[str, str, int, bool, list[str], int]:
            with PoolControlClient(h.address, token=ADMIN, retry=FAST_RETRY) as client:
                before = mode_name(client.status().mode)
                switched = client.set_mode("actor", request_id="s1", wait_timeout=0)
                after = mode_name(switched.result.mode)
                replayed = client.set_mode("keyed", request_id="s1").replayed
                depth = client.inbox_depth(aggregate_id="agg-1").aggregate.depth
                events: list[str] = [e.WhichOneof("event") or "" for e in client.dead_letters()]
                try:
                    client.drain(0.2)
                except DeadlineError as exc:
                    remaining = exc.partial.remaining if exc.partial else -1
                else:
                    remaining = 0
                return before, after, depth, replayed, events, remaining

        before, after, depth, replayed, events, remaining = await asyncio.to_thread(script)
        assert (before, after, depth, replayed) == ("keyed", "actor", 1, True)
        assert events == ["dead_letter", "backlog_end"]
        assert remaining == 1
        assert h.switch.mode is PoolMode.ACTOR

        def unauthorised() -> None:
            with PoolControlClient(h.address, token="wrong") as client:
                client.status()

        with pytest.raises(AuthError):
            await asyncio.to_thread(unauthorised)
        gate.open()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("client-certs"))


async def test_clients_speak_mutual_tls(certs: Certs) -> None:
    from server._grpc import TlsFiles

    tls = TlsFiles(certs.server_cert, certs.server_key, client_ca_file=certs.ca)
    async with control_server(tls=tls) as h:
        client_tls = ClientTls(
            ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
        )
        target = f"localhost:{h.handle.port}"
        async with AsyncPoolControlClient(target, tls=client_tls) as client:
            assert (await client.status()).version == "test"

        def sync_status() -> str:
            with PoolControlClient(target, tls=client_tls) as client:
                return client.status().version

        assert await asyncio.to_thread(sync_status) == "test"
