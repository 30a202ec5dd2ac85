"""The control plane over a real grpc.aio server on loopback and a real PoolSwitch."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import grpc
import pytest
from actorpool.control.v1 import control_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from pool import PoolMode, executor_index
from server._control import ServiceStatus
from server._grpc import SERVICE_NAME, GrpcConfigError, start_grpc_server
from tests.helpers import assert_eventually
from tests.server.control_standin import StandInControlTarget, make_switch
from tests.server.grpc_harness import ADMIN, READER, Gate, bearer, control_server


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def read_rest(stream: Any) -> list[Any]:
    """Read a server stream to its end with ``read()`` (the API the tests started with)."""
    out = []
    while (m := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc-stubs
        out.append(m)
    return out


async def code_of(awaitable: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value.code()


# ------------------------------------------------------------------ status


async def test_get_status_reports_mode_partitions_pools_and_version() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        for i in range(3):
            await h.target.feed(f"agg-{i}", partition=i % 2)
        status = await h.stub.GetStatus(pb.GetStatusRequest())
        assert status.mode == pb.POOL_MODE_KEYED
        assert status.rollout_percent == 100.0
        assert status.generation == 0
        assert status.in_flight == 3
        assert [(p.topic, p.partition, p.position) for p in status.partitions] == [
            ("events", 0, 2),
            ("events", 1, 1),
        ]
        assert not status.partitions[0].HasField("committed")
        assert status.partitions[0].lag == 2
        assert {p.mode: (p.size, p.capacity) for p in status.pools} == {
            pb.POOL_MODE_KEYED: (8, 100),
            pb.POOL_MODE_ACTOR: (8, 100),
        }
        assert status.version == "test"
        assert status.uptime.ToNanoseconds() > 0
        assert status.since.seconds > 0
        gate.open()


# ------------------------------------------------------------ mode switch


async def test_set_pool_mode_switches_and_reports_the_change() -> None:
    async with control_server() as h:
        reply = await h.stub.SetPoolMode(
            pb.SetPoolModeRequest(mode=pb.POOL_MODE_ACTOR, request_id="r1"), metadata=()
        )
        assert reply.result.previous_mode == pb.POOL_MODE_KEYED
        assert reply.result.mode == pb.POOL_MODE_ACTOR
        assert reply.result.generation == 1
        assert not reply.replayed
        assert h.switch.mode is PoolMode.ACTOR
        status = await h.stub.GetStatus(pb.GetStatusRequest())
        assert status.mode == pb.POOL_MODE_ACTOR
        assert status.generation == 1


@pytest.mark.parametrize("mode", [pb.POOL_MODE_UNSPECIFIED, 7])
async def test_set_pool_mode_rejects_unspecified_and_unknown_modes(mode: int) -> None:
    async with control_server() as h:
        request = pb.SetPoolModeRequest(request_id="r1")
        request.mode = mode  # type: ignore[assignment]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.SetPoolMode(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "POOL_MODE_KEYED or POOL_MODE_ACTOR" in (info.value.details() or "")
        assert h.switch.mode is PoolMode.KEYED
        assert h.switch.generation == 0


async def test_repeated_request_id_returns_the_first_answer_and_switches_nothing() -> None:
    async with control_server() as h:
        first = await h.stub.SetPoolMode(
            pb.SetPoolModeRequest(mode=pb.POOL_MODE_ACTOR, request_id="same")
        )
        again = await h.stub.SetPoolMode(
            pb.SetPoolModeRequest(mode=pb.POOL_MODE_KEYED, request_id="same")
        )
        assert again.replayed
        assert again.result == first.result
        assert h.switch.mode is PoolMode.ACTOR
        assert h.switch.generation == 1
        # A new request ID does switch.
        other = await h.stub.SetPoolMode(
            pb.SetPoolModeRequest(mode=pb.POOL_MODE_KEYED, request_id="other")
        )
        assert not other.replayed
        assert h.switch.generation == 2


async def test_concurrent_set_pool_mode_calls_are_serialised() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        await h.target.feed("busy")  # in flight in the keyed pool: a switch must wait for it
        finished: list[str] = []

        async def set_mode(name: str, mode: pb.PoolMode.ValueType) -> pb.SetPoolModeResponse:
            reply: pb.SetPoolModeResponse = await h.stub.SetPoolMode(
                pb.SetPoolModeRequest(mode=mode, request_id=name)
            )
            finished.append(name)
            return reply

        first = asyncio.ensure_future(set_mode("first", pb.POOL_MODE_ACTOR))
        await assert_eventually(lambda: h.switch.generation == 1, message="first in force")
        second = asyncio.ensure_future(set_mode("second", pb.POOL_MODE_KEYED))
        # The second change would need no waiting at all; it must still queue
        # behind the first, which waits for "busy" to finish.
        done, _ = await asyncio.wait({second}, timeout=0.3)
        assert not done
        gate.open()
        one, two = await first, await second
        assert finished == ["first", "second"]
        assert (one.result.generation, one.result.waited_aggregates) == (1, 1)
        assert two.result.previous_mode == pb.POOL_MODE_ACTOR
        assert two.result.generation == 2
        assert h.switch.mode is PoolMode.KEYED


@pytest.mark.parametrize("percent", [-1.0, 100.5, math.nan, math.inf])
async def test_set_rollout_rejects_out_of_range(percent: float) -> None:
    async with control_server() as h:
        code = await code_of(h.stub.SetRollout(pb.SetRolloutRequest(percent=percent)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert h.switch.rollout_percent == 100.0


async def test_set_rollout_sets_the_actor_share() -> None:
    async with control_server(mode=PoolMode.ACTOR) as h:
        reply = await h.stub.SetRollout(pb.SetRolloutRequest(percent=25, request_id="x"))
        assert reply.result.previous_rollout_percent == 100.0
        assert reply.result.rollout_percent == 25.0
        assert h.switch.rollout_percent == 25.0
        again = await h.stub.SetRollout(pb.SetRolloutRequest(percent=75, request_id="x"))
        assert again.replayed
        assert h.switch.rollout_percent == 25.0


# ---------------------------------------------------------------- depth


async def test_get_inbox_depth_reports_executors_aggregate_and_top() -> None:
    gate = Gate(closed=True)
    async with control_server(gate, size=4, capacity=50) as h:
        for _ in range(5):
            await h.target.feed("hot")
        await h.target.feed("cold")
        hot = executor_index("hot", 4)
        depth = await h.stub.GetInboxDepth(pb.GetInboxDepthRequest(aggregate_id="hot", top=2))
        assert [p.mode for p in depth.pools] == [pb.POOL_MODE_KEYED]
        keyed = depth.pools[0]
        assert keyed.active
        assert keyed.total == depth.total == 6
        assert len(keyed.executors) == 4
        assert keyed.executors[hot].depth >= 5
        assert keyed.executors[hot].capacity == 50
        assert keyed.executors[hot].utilization == pytest.approx(keyed.executors[hot].depth / 50)
        assert keyed.top[0].index == hot
        assert len(keyed.top) == 2
        assert depth.aggregate.executor == hot
        assert depth.aggregate.mode == pb.POOL_MODE_KEYED
        assert depth.aggregate.depth == keyed.executors[hot].depth
        gate.open()


async def test_get_inbox_depth_lists_both_pools_during_a_partial_rollout() -> None:
    async with control_server(mode=PoolMode.ACTOR) as h:
        await h.stub.SetRollout(pb.SetRolloutRequest(percent=50))
        depth = await h.stub.GetInboxDepth(pb.GetInboxDepthRequest(omit_executors=True))
        assert [p.mode for p in depth.pools] == [pb.POOL_MODE_KEYED, pb.POOL_MODE_ACTOR]
        assert all(p.active and not p.executors for p in depth.pools)


@pytest.mark.parametrize(
    "request_",
    [
        pb.GetInboxDepthRequest(top=-1),
        pb.GetInboxDepthRequest(top=1001),
        pb.GetInboxDepthRequest(aggregate_id="x" * 257),
        pb.GetInboxDepthRequest(pool=9),  # type: ignore[arg-type]
    ],
)
async def test_get_inbox_depth_rejects_bad_arguments(request_: pb.GetInboxDepthRequest) -> None:
    async with control_server() as h:
        assert await code_of(h.stub.GetInboxDepth(request_)) is grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------- pause / resume


async def test_pause_and_resume_all_or_listed_partitions() -> None:
    async with control_server() as h:
        one = pb.TopicPartition(topic="events", partition=1)
        paused = await h.stub.Pause(pb.PauseRequest(partitions=[one], request_id="p1"))
        assert [(p.topic, p.partition) for p in paused.partitions] == [("events", 1)]
        status = await h.stub.GetStatus(pb.GetStatusRequest())
        assert [(p.partition, p.paused, list(p.paused_reasons)) for p in status.partitions] == [
            (0, False, []),
            (1, True, ["operator"]),
        ]
        paused = await h.stub.Pause(pb.PauseRequest(request_id="p2"))
        assert len(paused.partitions) == 2
        resumed = await h.stub.Resume(pb.ResumeRequest(request_id="r1"))
        assert len(resumed.partitions) == 2
        status = await h.stub.GetStatus(pb.GetStatusRequest())
        assert not any(p.paused for p in status.partitions)


async def test_pause_rejects_unknown_and_invalid_partitions() -> None:
    async with control_server() as h:
        unknown = pb.PauseRequest(partitions=[pb.TopicPartition(topic="other", partition=0)])
        assert await code_of(h.stub.Pause(unknown)) is grpc.StatusCode.NOT_FOUND
        negative = pb.PauseRequest(partitions=[pb.TopicPartition(topic="events", partition=-1)])
        assert await code_of(h.stub.Pause(negative)) is grpc.StatusCode.INVALID_ARGUMENT
        nameless = pb.ResumeRequest(partitions=[pb.TopicPartition(partition=0)])
        assert await code_of(h.stub.Resume(nameless)) is grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------- drain


async def test_drain_streams_progress_then_the_result_and_commits() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        for n in range(10):
            await h.target.feed(f"agg-{n % 3}", partition=n % 2)
        health = health_pb2_grpc.HealthStub(h.channel)
        stream = h.stub.Drain(pb.DrainRequest(timeout=seconds(10), request_id="d1"))
        first = await stream.read()
        assert first.WhichOneof("event") == "progress"
        assert first.progress.remaining == 10
        # Health is NOT_SERVING while the drain runs; intake is paused.
        check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert all("drain" in st.reasons for st in h.target.parts.values())
        gate.open()
        messages = await read_rest(stream)
        assert await stream.code() is grpc.StatusCode.OK
        result = messages[-1]
        assert result.WhichOneof("event") == "result"
        assert result.result.complete
        assert result.result.finished == 10
        assert result.result.remaining == 0
        assert sorted((c.partition, c.offset) for c in result.result.committed) == [(0, 5), (1, 5)]
        # Intake stays paused until Resume (resume_after was not set).
        assert all("drain" in st.reasons for st in h.target.parts.values())
        check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # The same request ID again: the first answer, no second drain.
        replay = [
            m async for m in h.stub.Drain(pb.DrainRequest(timeout=seconds(10), request_id="d1"))
        ]
        assert len(replay) == 1
        assert replay[0].result.replayed
        assert replay[0].result.finished == 10


async def test_drain_past_its_timeout_is_deadline_exceeded_with_what_remained() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        for n in range(4):
            await h.target.feed(f"agg-{n}")
        stream = h.stub.Drain(pb.DrainRequest(timeout=seconds(0.2), resume_after=True))
        messages: list[pb.DrainResponse] = []

        async def collect() -> None:
            while (m := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                messages.append(m)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect()
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "4 events still in flight" in (info.value.details() or "")
        # grpc-stubs gives AioRpcError the sync API's trailing metadata type.
        trailing = cast("grpc.aio.Metadata | None", info.value.trailing_metadata())
        assert dict(trailing or ())["drain-remaining"] == "4"
        partial = messages[-1].result
        assert not partial.complete
        assert partial.remaining == 4
        assert partial.resumed
        assert not any(st.reasons for st in h.target.parts.values())
        gate.open()


@pytest.mark.parametrize("timeout", [None, 0.0, -1.0, 3601.0])
async def test_drain_rejects_missing_or_out_of_range_timeouts(timeout: float | None) -> None:
    async with control_server() as h:
        request = (
            pb.DrainRequest() if timeout is None else pb.DrainRequest(timeout=seconds(timeout))
        )
        assert await code_of(h.stub.Drain(request).read()) is grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------ dead letters


async def test_dead_letter_stream_sends_backlog_then_live_with_filters() -> None:
    async with control_server() as h:
        for n in range(3):
            await (await h.target.feed(f"poison-{n}"))
        await (await h.target.feed("fine"))
        assert len(h.target.dead) == 3
        stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest(follow=True))
        backlog = [await stream.read() for _ in range(3)]
        assert [m.dead_letter.aggregate_id for m in backlog] == ["poison-0", "poison-1", "poison-2"]
        assert backlog[0].dead_letter.reason == "non-retryable"
        assert backlog[0].dead_letter.error_type == "NonRetryableError"
        assert backlog[0].dead_letter.key == b"poison-0"
        end = await stream.read()
        assert end.backlog_end.count == 3
        await (await h.target.feed("poison-live"))
        live = await asyncio.wait_for(stream.read(), 5)
        assert live.dead_letter.aggregate_id == "poison-live"
        assert live.dead_letter.id == h.target.dead[-1].id
        stream.cancel()
        await assert_eventually(lambda: h.target.subscribers == 0, message="unsubscribed")

        filtered = h.stub.StreamDeadLetters(
            pb.StreamDeadLettersRequest(filter=pb.DeadLetterFilter(aggregate_id="poison-1"))
        )
        got = [m async for m in filtered]
        assert [m.WhichOneof("event") for m in got] == ["dead_letter", "backlog_end"]
        assert got[0].dead_letter.aggregate_id == "poison-1"


async def test_a_reader_that_never_reads_does_not_slow_processing() -> None:
    async with control_server(size=4, capacity=1000) as h:
        stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest(follow=True, buffer_size=8))
        assert (await stream.read()).backlog_end.count == 0
        await assert_eventually(lambda: h.target.subscribers == 1)
        total = 1500
        loop = asyncio.get_running_loop()
        started = loop.time()
        completions = [await h.target.feed(f"poison-{n % 50}") for n in range(total)]
        await asyncio.gather(*completions)
        took = loop.time() - started
        assert len(h.target.dead) == total
        assert took < 10, f"processing took {took:.2f}s with a stalled reader"
        await assert_eventually(
            lambda: h.metric("pool_control_dead_letter_stream_skipped_total") > 0
        )
        # Now read: every dead letter is either delivered or counted as skipped.
        delivered = skipped = 0
        while delivered + skipped < total:
            m = await asyncio.wait_for(stream.read(), 5)
            if m.WhichOneof("event") == "dead_letter":
                delivered += 1
            else:
                skipped += m.skipped.count
                assert m.skipped.total == skipped
        assert delivered + skipped == total
        assert skipped > 0
        stream.cancel()


async def test_redrive_by_ids_and_by_filter_reports_counts() -> None:
    async with control_server() as h:
        for n in range(3):
            await (await h.target.feed(f"poison-{n}"))
        first = h.target.dead[0].id
        reply = await h.stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(ids=[first, "nope"], request_id="rd1")
        )
        assert (reply.matched, reply.republished, reply.failed) == (1, 1, 1)
        assert dict(reply.errors) == {"nope": "no such dead letter"}
        again = await h.stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(ids=[first, "nope"], request_id="rd1")
        )
        assert again.replayed
        assert len(h.target.redriven) == 1
        by_filter = await h.stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(filter=pb.DeadLetterFilter(aggregate_id="poison-2"))
        )
        assert by_filter.republished == 1
        everything = await h.stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True))
        assert everything.republished == 1
        assert h.target.dead == []


async def test_redrive_without_a_selection_is_invalid() -> None:
    async with control_server() as h:
        none = pb.RedriveDeadLettersRequest(request_id="x")
        assert await code_of(h.stub.RedriveDeadLetters(none)) is grpc.StatusCode.INVALID_ARGUMENT
        both = pb.RedriveDeadLettersRequest(ids=["a"], filter=pb.DeadLetterFilter(topic="t"))
        assert await code_of(h.stub.RedriveDeadLetters(both)) is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_timestamp_protobuf_refuses_is_an_invalid_argument() -> None:
    bad = pb.DeadLetterFilter(since=timestamp_pb2.Timestamp(seconds=1, nanos=-904))
    async with control_server() as h:
        stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest(filter=bad))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "filter.since" in (info.value.details() or "")
        redrive = h.stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(filter=bad))
        assert await code_of(redrive) is grpc.StatusCode.INVALID_ARGUMENT


# -------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("token", "method", "expected"),
    [
        (None, "GetStatus", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", "GetStatus", grpc.StatusCode.UNAUTHENTICATED),
        (None, "SetPoolMode", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", "SetPoolMode", grpc.StatusCode.UNAUTHENTICATED),
        (READER, "GetStatus", grpc.StatusCode.OK),
        (READER, "SetPoolMode", grpc.StatusCode.PERMISSION_DENIED),
        (READER, "Pause", grpc.StatusCode.PERMISSION_DENIED),
        (ADMIN, "GetStatus", grpc.StatusCode.OK),
        (ADMIN, "SetPoolMode", grpc.StatusCode.OK),
    ],
)
async def test_tokens_guard_reads_and_mutations(
    token: str | None, method: str, expected: grpc.StatusCode
) -> None:
    async with control_server(admin_token=ADMIN, read_token=READER) as h:
        metadata = bearer(token) if token else ()
        requests = {
            "GetStatus": pb.GetStatusRequest(),
            "SetPoolMode": pb.SetPoolModeRequest(mode=pb.POOL_MODE_ACTOR),
            "Pause": pb.PauseRequest(),
        }
        call = getattr(h.stub, method)(requests[method], metadata=metadata)
        if expected is grpc.StatusCode.OK:
            await call
        else:
            assert await code_of(call) is expected
        assert (h.switch.generation == 1) is (method == "SetPoolMode" and token == ADMIN)
        assert h.metric("pool_control_grpc_calls_total", method=method, code=expected.name) == 1


async def test_streams_are_guarded_too_and_health_needs_no_token() -> None:
    async with control_server(admin_token=ADMIN, read_token=READER) as h:
        stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest())
        assert await code_of(stream.read()) is grpc.StatusCode.UNAUTHENTICATED
        drain = h.stub.Drain(pb.DrainRequest(timeout=seconds(1)), metadata=bearer(READER))
        assert await code_of(drain.read()) is grpc.StatusCode.PERMISSION_DENIED
        health = health_pb2_grpc.HealthStub(h.channel)
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_mutating_calls_are_audited_with_caller_request_id_and_outcome() -> None:
    async with control_server(admin_token=ADMIN, read_token=READER) as h:
        with capture_logs() as logs:
            await h.stub.SetPoolMode(
                pb.SetPoolModeRequest(mode=pb.POOL_MODE_ACTOR, request_id="aud-1"),
                metadata=bearer(ADMIN),
            )
            await code_of(
                h.stub.Pause(pb.PauseRequest(request_id="aud-2"), metadata=bearer(READER))
            )
            await h.stub.GetStatus(pb.GetStatusRequest(), metadata=bearer(READER))
        audits = [e for e in logs if e["event"] == "control.audit"]
        assert [(a["method"], a["request_id"], a["caller"], a["outcome"]) for a in audits] == [
            ("SetPoolMode", "aud-1", "admin", "OK"),
            ("Pause", "aud-2", "read", "PERMISSION_DENIED"),
        ]
        assert all(a["peer"].startswith("ipv4:127.0.0.1") for a in audits)


async def test_calls_are_counted_and_timed_by_method_and_code() -> None:
    async with control_server() as h:
        await h.stub.GetStatus(pb.GetStatusRequest())
        await h.stub.GetStatus(pb.GetStatusRequest())
        await code_of(h.stub.SetRollout(pb.SetRolloutRequest(percent=-5)))
        assert h.metric("pool_control_grpc_calls_total", method="GetStatus", code="OK") == 2
        assert (
            h.metric("pool_control_grpc_calls_total", method="SetRollout", code="INVALID_ARGUMENT")
            == 1
        )
        assert h.metric("pool_control_grpc_call_duration_seconds_count", method="GetStatus") == 2


# -------------------------------------------------------- errors and logs


@pytest.mark.parametrize("error", [ValueError, TypeError])
async def test_an_internal_error_in_a_handler_is_internal_with_a_generic_message(
    error: type[Exception],
) -> None:
    async with control_server() as h:

        def broken() -> ServiceStatus:
            raise error("a bug of ours: secret detail")

        h.target.status = broken  # type: ignore[method-assign]
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.GetStatus(pb.GetStatusRequest())
        assert info.value.code() is grpc.StatusCode.INTERNAL
        assert info.value.details() == f"internal error ({error.__name__}); see server log"
        failed = [e for e in logs if e["event"] == "control.call_failed"]
        assert len(failed) == 1
        assert "a bug of ours: secret detail" in failed[0]["error"]
        assert failed[0]["log_level"] == "error"
        assert h.metric("pool_control_grpc_calls_total", method="GetStatus", code="INTERNAL") == 1


async def test_a_client_cancelling_its_stream_is_logged_as_an_end_not_a_refusal() -> None:
    async with control_server() as h:
        with capture_logs() as logs:
            stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest(follow=True))
            assert (await stream.read()).WhichOneof("event") == "backlog_end"
            stream.cancel()
            await assert_eventually(
                lambda: any(e["event"] == "control.stream_cancelled" for e in logs),
                message="the end of the stream logged",
            )
            await h.stub.GetStatus(pb.GetStatusRequest())
        ended = [e for e in logs if e["event"] == "control.stream_cancelled"]
        assert [(e["method"], e["log_level"]) for e in ended] == [("StreamDeadLetters", "info")]
        assert [e for e in logs if e["event"] == "control.call_refused"] == []
        assert h.target.subscribers == 0
        cancelled = h.metric(
            "pool_control_grpc_calls_total", method="StreamDeadLetters", code="CANCELLED"
        )
        assert cancelled == 1


# --------------------------------------------------------- server set-up


async def test_reflection_lists_the_control_service() -> None:
    async with control_server() as h:
        stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_health_is_not_serving_until_ready() -> None:
    async with control_server(ready=False) as h:
        health = health_pb2_grpc.HealthStub(h.channel)
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await h.handle.set_ready()
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_without_a_token_the_server_refuses_a_remote_address() -> None:
    target = StandInControlTarget(make_switch(Gate()))
    with pytest.raises(GrpcConfigError, match="without authentication"):
        await start_grpc_server(target, address="0.0.0.0:0")
    with pytest.raises(GrpcConfigError, match="without TLS"):
        await start_grpc_server(target, address="0.0.0.0:0", admin_token=ADMIN)
    handle = await start_grpc_server(target, address="0.0.0.0:0", allow_insecure_remote=True)
    try:
        assert handle.port > 0
    finally:
        await handle.stop(0)


async def test_stop_is_idempotent_and_ends_following_streams() -> None:
    async with control_server() as h:
        stream = h.stub.StreamDeadLetters(pb.StreamDeadLettersRequest(follow=True))
        assert (await stream.read()).WhichOneof("event") == "backlog_end"
        await asyncio.gather(h.handle.stop(5), h.handle.stop(5))
        await h.handle.stop(5)
        assert not h.handle.serving
        assert await asyncio.wait_for(stream.code(), 5) is grpc.StatusCode.OK


async def test_a_second_drain_is_refused_but_a_retry_of_the_same_drain_waits_for_it() -> None:
    gate = Gate(closed=True)
    async with control_server(gate) as h:
        await h.target.feed("agg-1")
        first = h.stub.Drain(pb.DrainRequest(timeout=seconds(10), request_id="same"))
        assert (await first.read()).WhichOneof("event") == "progress"
        other = h.stub.Drain(pb.DrainRequest(timeout=seconds(10), request_id="other"))
        assert await code_of(other.read()) is grpc.StatusCode.FAILED_PRECONDITION
        retry = h.stub.Drain(pb.DrainRequest(timeout=seconds(10), request_id="same"))
        retried = asyncio.ensure_future(read_rest(retry))
        # Open the gate only once the retry is parked on the running drain.
        waiters = h.handle._servicer._drains[("Drain", "same")]  # white-box: no public signal
        await assert_eventually(lambda: len(waiters._callbacks) > 1, message="retry waiting")
        gate.open()
        original = (await read_rest(first))[-1].result
        again = await retried
        assert [m.WhichOneof("event") for m in again] == ["result"]
        assert again[0].result.replayed
        assert again[0].result.finished == original.finished == 1


async def test_with_only_one_token_configured() -> None:
    async with control_server(admin_token=ADMIN) as h:
        assert await code_of(h.stub.GetStatus(pb.GetStatusRequest())) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
        await h.stub.GetStatus(pb.GetStatusRequest(), metadata=bearer(ADMIN))
    async with control_server(read_token=READER) as h:
        await h.stub.GetStatus(pb.GetStatusRequest(), metadata=bearer(READER))
        read_only = h.stub.Pause(pb.PauseRequest(), metadata=bearer(READER))
        assert await code_of(read_only) is grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(h.stub.Pause(pb.PauseRequest())) is grpc.StatusCode.UNAUTHENTICATED
