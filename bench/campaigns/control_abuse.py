"""Campaign 6, control-plane abuse: the real service's gRPC API under hostile callers.

Against ``python -m server`` (admin and read tokens configured) while events flow:

1. **Fuzzing**: hypothesis draws arguments for every RPC (out-of-range
   numbers, NaN, unknown enum values, invalid durations and timestamps, odd
   strings, unknown partitions, ...). Every call must answer OK or a defined
   status with a message: never ``INTERNAL``/``UNKNOWN``, never a crash. After
   it, intake is resumed and events still flow.
2. **Tokens**: no token, a wrong one, malformed metadata -> ``UNAUTHENTICATED``;
   the read token on a mutating call -> ``PERMISSION_DENIED``; health needs none.
3. **1 000 concurrent dead-letter streams** (``follow``): each gets its backlog
   and the live dead letters; processing speed is measured with and without
   them; after they close, asyncio tasks return to their baseline. Then
   stream churn: 1 000 streams opened and closed 12 times (after a warm-up
   round); RSS after each round must not trend up (fitted slope < 0.5 MiB a
   round).
4. **A client that never reads its stream**: its buffer overflows, the skips
   are counted (``pool_control_dead_letter_stream_skipped_total``) and
   processing is not slowed.
5. **Calls during shutdown**: SIGTERM while calls are in flight: each gets OK
   or ``UNAVAILABLE`` - or grpc-core's ``CANCELLED`` for a call it had not yet
   handed to the service (grpc/grpc#41785), which the audit log must confirm
   never ran - and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from actorpool.control.v1 import control_pb2 as pb
from actorpool.control.v1 import control_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.campaigns._harness import (
    ROOT,
    SteadyProducer,
    campaign_env,
    count_handled,
    result,
    scrape_metrics,
    wait_for,
)
from bench.campaigns.soak import cpu_seconds

NAME = "control_abuse"
DESCRIPTION = (
    "RPC fuzzing, bad tokens, 1 000 dead-letter streams, a non-reader, calls during SIGTERM"
)
ORDER = 60
TIMEOUT_S = 900

ADMIN = "admin-token-campaign"
READ = "read-token-campaign"
ASYNCIO_TASKS = "kafka_eventbus_process_asyncio_tasks"
SKIPPED = "pool_control_dead_letter_stream_skipped_total"
#: Stream churn (open n following streams, close them, again and again): RSS may
#: swing by ~10 MiB round to round (the allocator keeps arenas), but its fitted
#: slope must stay under this; a leak of 1 KiB per stream would be ~1 MiB a round.
CHURN_SLOPE_MIB_PER_ROUND = 0.5

#: Codes a well-formed but unacceptable call may get. Never INTERNAL or UNKNOWN.
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a drain that timed out (also our own deadline)
    grpc.StatusCode.CANCELLED,  # our deadline on a following stream
}
MUTATING = ("SetPoolMode", "SetRollout", "Drain", "Pause", "Resume", "RedriveDeadLetters")
READS = ("GetStatus", "GetInboxDepth", "StreamDeadLetters")


def _fields(message: Any) -> dict[str, Any]:
    """A message's set fields, to build an independent copy per thread."""
    return {f.name: v for f, v in message.ListFields()}


def _audited_request_ids(log: str) -> set[str]:
    """Request IDs named by the service's ``control.audit`` lines."""
    out = set()
    for line in log.splitlines():
        if "control.audit" not in line:
            continue
        with contextlib.suppress(ValueError):
            rid = json.loads(line).get("request_id")
            if rid:
                out.add(str(rid))
    return out


def _meta(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# ------------------------------------------------------------------ fuzzing


def request_strategies(topic: str) -> dict[str, Any]:
    """A hypothesis strategy per RPC, drawing its request message."""
    from hypothesis import strategies as st

    i32 = st.one_of(st.integers(-5, 1005), st.integers(-(2**31), 2**31 - 1))
    text = st.one_of(
        st.text(max_size=20),
        st.sampled_from(["", topic, f"{topic}.dlq", "agg-1", "x" * 300, "\x00", "é" * 10]),
    )
    percent = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 50.0, 100.0])
    )
    mode = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))

    @st.composite
    def duration(draw: Any) -> duration_pb2.Duration | None:
        if draw(st.booleans()):
            return None
        d = duration_pb2.Duration()
        d.seconds = draw(st.one_of(st.integers(-5, 5), st.integers(-(10**12), 10**12)))
        d.nanos = draw(st.one_of(st.integers(-10, 10), st.integers(-(2**31), 2**31 - 1)))
        return d

    @st.composite
    def short_duration(draw: st.DrawFn) -> duration_pb2.Duration | None:
        # Drain timeouts: mostly invalid or short (a valid long one would hold the call).
        d = draw(duration())
        if d is not None and 0.5 < d.seconds + d.nanos / 1e9 <= 3600:
            d.seconds, d.nanos = 0, 200_000_000
        return d

    @st.composite
    def stamp(draw: Any) -> timestamp_pb2.Timestamp | None:
        if draw(st.booleans()):
            return None
        t = timestamp_pb2.Timestamp()
        t.seconds = draw(st.one_of(st.integers(-(10**12), 10**12), st.integers(0, 2**33)))
        t.nanos = draw(st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)))
        return t

    partitions = st.lists(st.builds(pb.TopicPartition, topic=text, partition=i32), max_size=3)
    dl_filter = st.builds(
        lambda topic_, agg, et, reason, since: _filter(topic_, agg, et, reason, since),
        text, text, text,
        st.one_of(text, st.sampled_from(["non-retryable", "retries-exhausted"])),
        stamp(),
    )  # fmt: skip

    def with_wait(cls: Any, **fields: Any) -> Any:
        return st.builds(lambda w, **kw: _set(cls(**kw), "wait_timeout", w), duration(), **fields)

    return {
        "GetStatus": st.just(pb.GetStatusRequest()),
        "GetInboxDepth": st.builds(
            pb.GetInboxDepthRequest, pool=mode, aggregate_id=text, top=i32,
            omit_executors=st.booleans(),
        ),
        "SetPoolMode": with_wait(pb.SetPoolModeRequest, mode=mode, request_id=text),
        "SetRollout": with_wait(pb.SetRolloutRequest, percent=percent, request_id=text),
        "Drain": st.builds(
            lambda t, **kw: _set(pb.DrainRequest(**kw), "timeout", t),
            short_duration(), partitions=partitions, resume_after=st.just(True),
            request_id=text,
        ),
        "Pause": st.builds(pb.PauseRequest, partitions=partitions, request_id=text),
        "Resume": st.builds(pb.ResumeRequest, partitions=partitions, request_id=text),
        "StreamDeadLetters": st.builds(
            pb.StreamDeadLettersRequest, filter=dl_filter, follow=st.booleans(),
            backlog_limit=i32, buffer_size=i32,
        ),
        "RedriveDeadLetters": st.builds(
            lambda ids, f, **kw: pb.RedriveDeadLettersRequest(
                ids=ids, **({"filter": f} if f is not None else {}), **kw
            ),
            st.lists(st.one_of(text, st.just("1")), max_size=3),
            st.one_of(st.none(), dl_filter), all=st.booleans(), request_id=text,
        ),
    }  # fmt: skip


def _set(msg: Any, name: str, value: Any) -> Any:
    if value is not None:
        getattr(msg, name).CopyFrom(value)
    return msg


def _filter(
    topic: str, agg: str, et: str, reason: str, since: timestamp_pb2.Timestamp | None
) -> pb.DeadLetterFilter:
    f = pb.DeadLetterFilter(topic=topic, aggregate_id=agg, error_type=et, reason=reason)
    return _set(f, "since", since)  # type: ignore[no-any-return]


def call(
    stub: pb_grpc.PoolControlStub,
    method: str,
    request: Any,
    token: str | None,
    stream_timeout: float = 3.0,
) -> tuple[grpc.StatusCode, str]:
    """One call with a short deadline; ``(code, details)``. Streams are read a little."""
    fn = getattr(stub, method)
    try:
        if method in ("Drain", "StreamDeadLetters"):
            stream = fn(request, metadata=_meta(token), timeout=stream_timeout)
            for n, _ in enumerate(stream):
                if n >= 20:
                    stream.cancel()
                    break
        else:
            fn(request, metadata=_meta(token), timeout=10.0)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def draw_requests(topic: str, examples: int, seed: int = 6) -> dict[str, list[Any]]:
    """``examples`` requests per RPC drawn by hypothesis (collected, then sent by
    :func:`fuzz`: drawing must not run beside code that uses ``random``)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: dict[str, list[Any]] = {}

    def collector(strategy: Any, into: list[Any]) -> Callable[[], None]:
        @hseed(seed)
        @settings(
            max_examples=examples, phases=[Phase.generate], database=None, deadline=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(strategy)
        def one(request: Any) -> None:
            into.append(request)

        return one  # type: ignore[no-any-return]

    for method, strategy in request_strategies(topic).items():
        out[method] = []
        collector(strategy, out[method])()
    return out


def fuzz(
    address: str, requests: dict[str, list[Any]], stream_timeout: float = 3.0
) -> dict[str, Any]:
    """Send every drawn request with the admin token (blocking; run it in a thread).
    A following stream is read for up to ``stream_timeout`` seconds."""
    codes: dict[str, Counter[str]] = {}
    bad: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PoolControlStub(channel)
        for method, items in requests.items():
            seen = codes[method] = Counter()
            for request in items:
                code, details = call(stub, method, request, ADMIN, stream_timeout)
                seen[code.name] += 1
                if code not in DEFINED or (code is not grpc.StatusCode.OK and not details):
                    bad.append(f"{method}({_short(request)}) -> {code.name}: {details!r}"[:400])
        # Leave it usable: resume everything the fuzzing paused.
        stub.Resume(pb.ResumeRequest(), metadata=_meta(ADMIN), timeout=10.0)
        stub.SetRollout(pb.SetRolloutRequest(percent=100), metadata=_meta(ADMIN), timeout=10.0)
    return {"calls": {m: dict(c) for m, c in codes.items()}, "bad": bad}


def _short(request: Any) -> str:
    return str(request).replace("\n", " ")[:200]


# ------------------------------------------------------------------- tokens


def token_checks(address: str) -> dict[str, Any]:
    """Every RPC without a token, with a wrong one, malformed metadata, and the read token."""
    cases: list[tuple[str, Sequence[tuple[str, str]], grpc.StatusCode | None]] = []
    bad_metadata = [
        ("none", []),
        ("wrong", _meta("nope")),
        ("basic", [("authorization", "Basic YWRtaW46YWRtaW4=")]),
        ("empty bearer", [("authorization", "Bearer ")]),
        ("admin token as read token prefix", _meta(ADMIN[:-1])),
    ]
    requests = {
        "GetStatus": pb.GetStatusRequest(),
        "GetInboxDepth": pb.GetInboxDepthRequest(),
        "SetPoolMode": pb.SetPoolModeRequest(mode=pb.POOL_MODE_KEYED),
        "SetRollout": pb.SetRolloutRequest(percent=100),
        "Drain": pb.DrainRequest(timeout=duration_pb2.Duration(seconds=1), resume_after=True),
        "Pause": pb.PauseRequest(),
        "Resume": pb.ResumeRequest(),
        "StreamDeadLetters": pb.StreamDeadLettersRequest(),
        "RedriveDeadLetters": pb.RedriveDeadLettersRequest(ids=["0"]),
    }
    for method in requests:
        for label, md in bad_metadata:
            cases.append((f"{method} {label}", md, grpc.StatusCode.UNAUTHENTICATED))
        cases.append(
            (
                f"{method} read token",
                _meta(READ),
                grpc.StatusCode.PERMISSION_DENIED if method in MUTATING else grpc.StatusCode.OK,
            )
        )
    wrong: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PoolControlStub(channel)
        for label, md, want in cases:
            method = label.split()[0]
            fn = getattr(stub, method)
            try:
                out = fn(requests[method], metadata=md, timeout=10.0)
                if method in ("Drain", "StreamDeadLetters"):
                    for _ in out:
                        pass
                got = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                got = exc.code()
            if got is not want:
                wrong.append(f"{label}: {got.name}, expected {want.name if want else '?'}")
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5.0
        )
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            wrong.append(f"health without a token: {health.status}")
        stub.Resume(pb.ResumeRequest(), metadata=_meta(ADMIN), timeout=10.0)
    return {"checked": len(cases) + 1, "wrong": wrong}


# ---------------------------------------------------------- measurements


async def _handle_batch(
    env: Any,
    svc: Any,
    topic: str,
    partitions: int,
    events: int,
    prefix: str,
    decorate: Callable[[str, int], dict[str, Any] | None] | None = None,
) -> float:
    """Produce ``events`` as fast as possible; seconds until all are handled."""
    before = count_handled(svc.record)
    producer = SteadyProducer(
        env.bootstrap, topic, partitions=partitions, aggregates=500, prefix=prefix,
        decorate=decorate,
    )  # fmt: skip
    started = time.monotonic()
    stats = await producer.run(rate=events * 4, seconds=60, max_events=events)
    poison = 0
    if decorate is not None:
        poison = sum(1 for agg, n in producer.seqs.items() for s in range(n) if decorate(agg, s))
    target = before + stats.acked - poison
    await wait_for(lambda: count_handled(svc.record) >= target, 120, f"{prefix} handled")
    return time.monotonic() - started


async def _measured_batch(
    env: Any, svc: Any, topic: str, partitions: int, events: int, prefix: str, every: int
) -> tuple[float, float]:
    """:func:`_handle_batch` with 1 in ``every`` events dead-lettered: ``(seconds,
    service CPU seconds)`` - the CPU tells the service's own cost from contention."""
    cpu0 = cpu_seconds(svc.proc.pid)
    decorate = _poison(every) if every else None
    took = await _handle_batch(env, svc, topic, partitions, events, prefix, decorate)
    return took, cpu_seconds(svc.proc.pid) - cpu0


def _metric(svc: Any, name: str) -> float:
    return float(scrape_metrics(svc.metrics_address).get(name, 0.0))


def _rss(pid: int) -> float:
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return math.nan


def _poison(every: int) -> Callable[[str, int], dict[str, Any] | None]:
    def decorate(agg: str, seq: int) -> dict[str, Any] | None:
        return {"fail": "non-retryable"} if (hash_(agg) + seq) % every == 0 else None

    return decorate


def hash_(agg: str) -> int:
    return int(agg.rsplit("-", 1)[1])


@contextlib.asynccontextmanager
async def _followers(address: str, n: int, token: str) -> AsyncIterator[Counter[int]]:
    """``n`` following dead-letter streams (backlog limit 5) over ``n / 100``
    channels. Entered once each is past its backlog; yields the live dead
    letters received per stream; closes them all on exit."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, n // 100))]
    ready = 0
    live: Counter[int] = Counter()

    async def follow(i: int) -> None:
        nonlocal ready
        stub = pb_grpc.PoolControlStub(channels[i % len(channels)])
        request = pb.StreamDeadLettersRequest(follow=True, backlog_limit=5)
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for event in stub.StreamDeadLetters(request, metadata=_meta(token)):
                if event.HasField("backlog_end"):
                    ready += 1
                elif event.HasField("dead_letter"):
                    live[i] += 1

    readers = [asyncio.create_task(follow(i)) for i in range(n)]
    try:
        await wait_for(lambda: ready >= n, 60, f"{n} streams past their backlog")
        yield live
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for ch in channels:
            await ch.close(grace=None)


async def _follow_streams(address: str, n: int, token: str) -> None:
    """The reader process: ``n`` following streams; "ready" once each is past its
    backlog; on a line on stdin, close them and print ``{"min_live": ...}``."""
    async with _followers(address, n, token) as live:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    print(json.dumps({"min_live": min(live[i] for i in range(n))}), flush=True)


async def many_streams(
    env: Any, svc: Any, topic: str, partitions: int, n: int, events: int, rounds: int
) -> dict[str, Any]:
    """``n`` following dead-letter streams (read by another process, so the readers
    do not slow this one's producer), ``rounds`` times: a batch handled with them
    open against one without; asyncio tasks and RSS after they close."""
    pid = svc.proc.pid
    tasks0 = _metric(svc, ASYNCIO_TASKS)
    rss0 = _rss(pid)
    base_s, base_cpu = await _measured_batch(env, svc, topic, partitions, events, "base", 50)
    out: dict[str, Any] = {
        "streams": n,
        "rounds": rounds,
        "events_per_batch": events,
        "dead_letters_per_batch": events // 50,
        "tasks_baseline": tasks0,
        "rss_mib_baseline": round(rss0, 1),
        "handle_s_without": [round(base_s, 2)],
        "handle_s_with": [],
        "service_cpu_s_without": [round(base_cpu, 2)],
        "service_cpu_s_with": [],
        "idle_handle_s_without": [],
        "idle_handle_s_with": [],
        "tasks_with_streams": [],
        "tasks_after_close": [],
        "rss_mib_with_streams": [],
        "rss_mib_after_close": [],
        "live_dead_letters_min_per_stream": [],
    }
    settled_all = True
    for r in range(rounds):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.campaigns.control_abuse", "follow",
            svc.grpc_address, str(n), READ,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), 90)
            if ready.strip() != b"ready":
                raise RuntimeError(f"stream readers did not start: {ready!r}")
            out["tasks_with_streams"].append(_metric(svc, ASYNCIO_TASKS))
            out["rss_mib_with_streams"].append(round(_rss(pid), 1))
            idle_s, _ = await _measured_batch(
                env, svc, topic, partitions, events, f"idle-streams{r}", 0
            )
            out["idle_handle_s_with"].append(round(idle_s, 2))
            with_s, with_cpu = await _measured_batch(
                env, svc, topic, partitions, events, f"streams{r}", 50
            )
            out["handle_s_with"].append(round(with_s, 2))
            out["service_cpu_s_with"].append(round(with_cpu, 2))
            await asyncio.sleep(1.0)  # the last live dead letters reach every stream
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            out["live_dead_letters_min_per_stream"].append(report["min_live"])
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        tasks_after = 0.0

        async def settled() -> bool:
            nonlocal tasks_after
            tasks_after = await asyncio.to_thread(_metric, svc, ASYNCIO_TASKS)
            return tasks_after <= tasks0 + 10

        try:
            await wait_for(settled, 30, "tasks back to baseline", interval=0.5)
        except TimeoutError:
            settled_all = False
        out["tasks_after_close"].append(tasks_after)
        out["rss_mib_after_close"].append(round(_rss(pid), 1))
        idle_s, _ = await _measured_batch(env, svc, topic, partitions, events, f"idle{r}", 0)
        out["idle_handle_s_without"].append(round(idle_s, 2))
        base_s, base_cpu = await _measured_batch(
            env, svc, topic, partitions, events, f"base{r}", 50
        )
        out["handle_s_without"].append(round(base_s, 2))
        out["service_cpu_s_without"].append(round(base_cpu, 2))
    without = statistics.median(out["handle_s_without"])
    out["throughput_ratio"] = round(without / statistics.median(out["handle_s_with"]), 3)
    out["idle_throughput_ratio"] = round(
        statistics.median(out["idle_handle_s_without"])
        / statistics.median(out["idle_handle_s_with"]),
        3,
    )
    extra_cpu = statistics.median(out["service_cpu_s_with"]) - statistics.median(
        out["service_cpu_s_without"]
    )
    out["service_cpu_us_per_stream_message"] = round(
        1e6 * extra_cpu / max(1, n * out["dead_letters_per_batch"]), 1
    )
    out["tasks_back_to_baseline"] = settled_all
    # Memory: after the first round, RSS after closing stays where it was (allocator
    # high-water mark, not a leak that grows with every round of streams).
    first, last = out["rss_mib_after_close"][0], out["rss_mib_after_close"][-1]
    out["rss_growth_after_first_round_mib"] = round(last - first, 1)
    return out


async def never_reader(
    env: Any, svc: Any, topic: str, partitions: int, events: int, rounds: int
) -> dict[str, Any]:
    """A follower with a 10-entry buffer that never reads while dead letters pour in;
    ``rounds`` pairs of batches without / with it (alternated: the broker slows as it fills)."""
    skipped0 = _metric(svc, SKIPPED)
    without: list[float] = []
    with_: list[float] = []
    cpu_without: list[float] = []
    cpu_with: list[float] = []
    notices = 0
    for r in range(rounds):
        took, cpu = await _measured_batch(env, svc, topic, partitions, events, f"nr-base{r}", 10)
        without.append(round(took, 2))
        cpu_without.append(round(cpu, 2))
        channel = grpc.aio.insecure_channel(svc.grpc_address)
        stub = pb_grpc.PoolControlStub(channel)
        stream = stub.StreamDeadLetters(
            pb.StreamDeadLettersRequest(follow=True, buffer_size=10), metadata=_meta(READ)
        )
        try:
            await stream.wait_for_connection()
            took, cpu = await _measured_batch(
                env, svc, topic, partitions, events, f"nr-stuck{r}", 10
            )
            with_.append(round(took, 2))
            cpu_with.append(round(cpu, 2))
            # Now read what is there: some dead letters, and a Skipped notice.
            with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
                async with asyncio.timeout(3):
                    async for event in stream:
                        if event.HasField("skipped"):
                            notices += 1
                            break
        finally:
            stream.cancel()
            await channel.close(grace=None)
    return {
        "rounds": rounds,
        "dead_letters_per_batch": events // 10,
        "skipped_counted": _metric(svc, SKIPPED) - skipped0,
        "skipped_notice_received": notices == rounds,
        "handle_s_without": without,
        "handle_s_with_stuck_reader": with_,
        "service_cpu_s_without": cpu_without,
        "service_cpu_s_with_stuck_reader": cpu_with,
        "throughput_ratio": round(statistics.median(without) / statistics.median(with_), 3),
    }


async def stream_churn(svc: Any, n: int, rounds: int) -> dict[str, Any]:
    """Open ``n`` following streams and close them: once to warm up, then
    ``rounds`` times with RSS after each. The least-squares slope over the
    rounds is the leak figure: single rounds swing with the allocator."""
    pid = svc.proc.pid
    rss: list[float] = []
    for r in range(rounds + 1):
        async with _followers(svc.grpc_address, n, READ):
            pass
        await asyncio.sleep(1.0)  # the server notices the cancellations
        if r:
            rss.append(round(_rss(pid), 1))
    return {
        "streams": n,
        "rounds": rounds,
        "rss_mib_after_each": rss,
        "rss_slope_mib_per_round": round(_slope(rss), 2),
    }


def _slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` over their index."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


async def calls_during_shutdown(svc: Any, topic: str) -> dict[str, Any]:
    """SIGTERM while calls are in flight; each gets OK or UNAVAILABLE (or grpc-core's
    CANCELLED for a call it never handed to the service, checked for mutating calls
    against the audit log); exit code 0."""
    outcomes: Counter[str] = Counter()
    odd_details: list[str] = []
    #: Unary calls that got grpc-core's CANCELLED ("CANCELLED"), by "method:CANCELLED",
    #: and (method, request_id) of the mutating ones among them.
    core: Counter[str] = Counter()
    core_cancelled: list[tuple[str, str]] = []
    stop = threading.Event()
    counting = threading.Lock()

    def hammer(worker: int, method: str, request: Any) -> None:
        ids = itertools.count()
        with grpc.insecure_channel(svc.grpc_address) as channel:
            stub = pb_grpc.PoolControlStub(channel)
            while not stop.is_set():
                request_id = ""
                if method in MUTATING:
                    request_id = f"sd-{worker}-{next(ids)}"
                    request.request_id = request_id
                code, details = call(stub, method, request, ADMIN)
                with counting:  # the threads share the counters
                    outcomes[f"{method}:{code.name}"] += 1
                    if (
                        code is grpc.StatusCode.CANCELLED
                        and details == "CANCELLED"
                        and method != "StreamDeadLetters"
                    ):
                        core[f"{method}:CANCELLED"] += 1
                        if request_id:
                            core_cancelled.append((method, request_id))
                    if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE):
                        odd_details.append(f"{method}: {code.name} {details!r}"[:300])
                if code is grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.05)

    load = [
        ("GetStatus", pb.GetStatusRequest()),
        ("GetInboxDepth", pb.GetInboxDepthRequest(top=5)),
        ("SetRollout", pb.SetRolloutRequest(percent=50)),
        ("SetPoolMode", pb.SetPoolModeRequest(mode=pb.POOL_MODE_ACTOR)),
        ("Pause", pb.PauseRequest(partitions=[pb.TopicPartition(topic=topic, partition=0)])),
        ("Resume", pb.ResumeRequest()),
        ("StreamDeadLetters", pb.StreamDeadLettersRequest(follow=True)),
        ("RedriveDeadLetters", pb.RedriveDeadLettersRequest(ids=["1"])),
    ]
    threads = [
        threading.Thread(target=hammer, args=(n, method, type(req)(**_fields(req))), daemon=True)
        for n, (method, req) in enumerate(load * 2)
    ]
    for t in threads:
        t.start()
    await asyncio.sleep(2.0)
    started = time.monotonic()
    exit_code = await svc.stop(timeout=60)
    stop_s = time.monotonic() - started
    await asyncio.sleep(0.5)  # calls after the exit: connection refused -> UNAVAILABLE
    stop.set()
    for t in threads:
        await asyncio.to_thread(t.join, 15)
    # A call grpc-core accepted but never handed to a handler when the server
    # stopped gets CANCELLED with the details "CANCELLED" (grpc/grpc#41785, a fix
    # is pending upstream). Such a call never reached the service: no audit line
    # names its request ID. Our clients retry it (same request ID, idempotent).
    audited = _audited_request_ids(svc.stderr_tail(10**8))
    reached = [f"{m}:{rid}" for m, rid in core_cancelled if rid in audited]
    # CANCELLED otherwise only where it is our own doing: we stop reading a stream
    # after 20 events. Reads cannot be checked against the audit log; grpc-core's
    # CANCELLED of a read is counted as such too (it has no effect either way).
    bad = {
        k: n
        for k, v in outcomes.items()
        if k.split(":")[1] not in ("OK", "UNAVAILABLE")
        and k != "StreamDeadLetters:CANCELLED"
        and (n := v - core[k]) > 0
    }
    return {
        "calls": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "not_ok_or_unavailable": bad,
        "core_cancelled": dict(core),
        "core_cancelled_mutating": len(core_cancelled),
        "core_cancelled_that_reached_the_service": reached[:10],
        "details_of_the_others": odd_details[:10],
        "exit_code": exit_code,
        "stop_s": round(stop_s, 2),
    }


# ---------------------------------------------------------------------- run


async def run(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    examples = 25 if quick else 300
    n_streams = 100 if quick else 1000
    rounds = 2 if quick else 3
    events = 2000 if quick else 20_000
    partitions = 4
    failures: list[str] = []
    details: dict[str, Any] = {}
    async with campaign_env(NAME) as env:
        topic = await env.topic(partitions)
        svc = env.service(
            topic,
            latency_ms=0.5,
            settings={
                "grpc.adminToken": ADMIN,
                "grpc.readToken": READ,
                "pool.retry.maxAttempts": 1,
                "deadLetter.ringSize": 1000,
            },
        )
        await svc.start(wait_assigned=False)

        async def assigned() -> bool:
            def status() -> int:
                with grpc.insecure_channel(svc.grpc_address) as ch:
                    st = pb_grpc.PoolControlStub(ch).GetStatus(
                        pb.GetStatusRequest(), metadata=_meta(READ), timeout=2
                    )
                    return len(st.partitions)

            try:
                return await asyncio.to_thread(status) > 0
            except grpc.RpcError:
                return False

        await wait_for(assigned, 30, "partitions assigned", 0.2)
        # A few dead letters so streams and redrive have something to chew on.
        await _handle_batch(env, svc, topic, partitions, 500, "seed", _poison(20))

        requests = draw_requests(topic, examples)
        fz = await asyncio.to_thread(fuzz, svc.grpc_address, requests)
        details["fuzzing"] = {"examples_per_rpc": examples, **fz, "bad": fz["bad"][:10]}
        failures += [f"fuzz: {b}" for b in fz["bad"][:10]]
        if not svc.running:
            failures.append(f"service died during fuzzing: {svc.stderr_tail(500)}")
            return _result(started, details, failures, examples, n_streams, events)
        # Still processing after the fuzzing (it paused, drained, switched, redrove).
        details["after_fuzzing_handle_s"] = round(
            await _handle_batch(env, svc, topic, partitions, 1000, "after-fuzz"), 2
        )

        tk = await asyncio.to_thread(token_checks, svc.grpc_address)
        details["tokens"] = tk
        failures += [f"token: {w}" for w in tk["wrong"]]

        ms = await many_streams(env, svc, topic, partitions, n_streams, events, rounds)
        details["many_streams"] = ms
        if not ms["tasks_back_to_baseline"]:
            failures.append(
                f"tasks not back to baseline: {ms['tasks_baseline']} -> {ms['tasks_after_close']}"
            )
        if ms["idle_throughput_ratio"] < 0.8:
            failures.append(
                f"{n_streams} open streams slowed processing: ratio {ms['idle_throughput_ratio']}"
            )
        if min(ms["live_dead_letters_min_per_stream"]) == 0:
            failures.append("a stream got no live dead letter")

        churn = await stream_churn(svc, n_streams, 4 if quick else 12)
        details["stream_churn"] = churn
        if churn["rss_slope_mib_per_round"] > CHURN_SLOPE_MIB_PER_ROUND:
            failures.append(
                f"RSS grows with stream churn: {churn['rss_slope_mib_per_round']} MiB per "
                f"round of {n_streams} streams ({churn['rss_mib_after_each']})"
            )

        nr = await never_reader(env, svc, topic, partitions, events, rounds)
        details["never_reader"] = nr
        if nr["skipped_counted"] <= 0 or not nr["skipped_notice_received"]:
            failures.append(f"never-reading stream: skips not counted/notified: {nr}")
        if nr["throughput_ratio"] < 0.8:
            failures.append(f"a stuck reader slowed processing: ratio {nr['throughput_ratio']}")

        sd = await calls_during_shutdown(svc, topic)
        details["shutdown"] = sd
        if sd["not_ok_or_unavailable"]:
            failures.append(f"calls during shutdown: {sd['not_ok_or_unavailable']}")
        if sd["core_cancelled_that_reached_the_service"]:
            failures.append(
                "CANCELLED calls that had reached the service: "
                f"{sd['core_cancelled_that_reached_the_service']}"
            )
        if sd["exit_code"] != 0:
            failures.append(f"exit code {sd['exit_code']}: {svc.stderr_tail(500)}")
        internal = [
            line for line in svc.stderr_tail(10**7).splitlines() if "control.call_failed" in line
        ]
        details["internal_errors_logged"] = len(internal)
        failures += [f"logged: {line[:300]}" for line in internal[:3]]
    return _result(started, details, failures, examples, n_streams, events)


def _result(
    started: float, details: dict[str, Any], failures: list[str], examples: int, n: int, events: int
) -> dict[str, Any]:
    calls = sum(sum(c.values()) for c in details.get("fuzzing", {}).get("calls", {}).values())
    details["notes"] = [
        (
            "Pass criteria: every fuzzed call OK or a defined status with a message "
            "(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, DEADLINE_EXCEEDED, CANCELLED by "
            "our own deadline on a following stream), never INTERNAL/UNKNOWN, no "
            "`control.call_failed` in the log; after the fuzzing events still flow; with the "
            "streams open (idle: the batch has no dead letters) or a stream never read, a "
            "batch is handled at >= 80 % of the speed without (`throughput_ratio` with 2 % "
            "dead letters fanned out to every stream is reported, not judged: that work grows "
            "with streams x dead letters, see `service_cpu_us_per_stream_message`); asyncio tasks "
            "back within +10 of the baseline after the streams close; under stream churn "
            "(the streams opened and closed 12 times) RSS's fitted slope < 0.5 MiB a round; "
            "during SIGTERM every call OK or UNAVAILABLE, or CANCELLED by grpc-core for a "
            "call it never handed to the service (grpc/grpc#41785; checked for every "
            "mutating call: no audit line names its request ID), and exit code 0."
        ),
    ]
    return result(
        NAME,
        tried="fuzzed RPC arguments, bad tokens, many streams, a non-reader, SIGTERM mid-calls",
        amount=(
            f"{calls} fuzzed calls ({examples}/RPC), {details.get('tokens', {}).get('checked', 0)} "
            f"token checks, {n} streams, {details.get('shutdown', {}).get('calls', 0)} calls "
            "around SIGTERM"
        ),
        accounting=None,
        lost=0,
        reordered=0,
        duplicated_or_redelivered=0,
        passed=not failures,
        seconds=time.monotonic() - started,
        details=details,
        failures=failures,
    )


if __name__ == "__main__":  # the stream-reader process of many_streams()
    if sys.argv[1:2] == ["follow"]:
        asyncio.run(_follow_streams(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
