"""A real Prometheus scraping the real service (``pool-server --demo``) under traffic.

The service consumes demo traffic from the session's embedded broker in ACTOR
mode at 50 % rollout (both pools busy), with a 3 % handler failure rate and
one attempt per event (so failures become dead letters), plus one oversized
event (an intake dead letter) and one ``poolctl status`` call (a gRPC call
series). Prometheus scrapes it every second with rules.yml loaded; the
original's PromQL, the recording rules, the alerts and every dashboard
expression are evaluated against it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server._broker import EmbeddedBroker
from server.healthcheck import check
from tests.deploy import prom
from tests.deploy.prom import PrometheusServer, wait_for
from tests.helpers import find_free_port
from tests.server.kafka_utils import produce

#: The module's ``service`` fixture runs ``pool-server --demo`` as a process.
pytestmark = pytest.mark.process

REPO = prom.REPO
BIN = Path(sys.executable).parent
ACTORS = WORKERS = 16

#: Dashboard series the service does not export (none: every panel has data;
#: the test fails on any difference).
NOT_YET_EXPORTED: set[str] = set()
#: Counters whose labelled series appear on the first occurrence only
#: (redeliveries happen after a rebalance or a seek, not in a steady run).
#: For these the metric family must at least be registered.
LAZY = {"In flight, redeliveries, commits/B": "kafka_eventbus_consumer_redeliveries_total"}


@dataclass(frozen=True)
class Service:
    grpc: str
    metrics: str
    topic: str


@pytest.fixture(scope="module")
def service(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    topic = f"ops-{os.getpid()}"
    asyncio.run(broker.create_topics({topic: 4, f"{topic}.dlq": 1}))
    grpc_address = f"127.0.0.1:{find_free_port()}"
    metrics_address = f"127.0.0.1:{find_free_port()}"
    log = tmp_path_factory.mktemp("service") / "pool-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "pool-server"),
                "--brokers", broker.bootstrap,
                "--topic", topic,
                "--group-id", f"ops-{os.getpid()}",
                "--demo",
                "--mode", "actor",
                "--grpc-address", grpc_address,
                "--metrics-address", metrics_address,
                "--log-level", "warning",
                "--set", "kafka.actorPool.rolloutPercent=50",
                "--set", "demo.rate=300",
                "--set", "demo.failureRate=0.03",
                "--set", "pool.retry.maxAttempts=1",
                "--set", f"pool.keyed.workers={WORKERS}",
                "--set", f"pool.actor.actors={ACTORS}",
                "--set", "intake.maxValueBytes=4096",
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(
            lambda: proc.poll() is None and check(grpc_address, timeout=1).healthy,
            30,
            f"pool-server SERVING (log: {log})",
        )
        # An oversized event: an intake dead letter (reason oversized-value).
        asyncio.run(produce(broker.bootstrap, topic, [(0, b"ops-big", b"x" * 5000)]))
        # A control-plane call: a gRPC calls series.
        subprocess.run(
            [str(BIN / "poolctl"), "--target", grpc_address, "status"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        yield Service(grpc_address, metrics_address, topic)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, service: Service
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [service.metrics])
    server.start()
    try:
        wait_for(server.scraped_ok, 15, "first successful scrape")
        wait_for(
            lambda: server.vector("rate(kafka_eventbus_actor_pool_messages_sent_total[1m])"),
            15,
            "two scrapes",
        )
        yield server
    finally:
        server.stop()


def _by(samples: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    return {labels[label]: v for labels, v in samples}


def _one(samples: list[tuple[dict[str, str], float]]) -> float:
    """The value of a query that must give one series (per pool, without an executor label)."""
    assert len(samples) == 1, samples
    ((labels, value),) = samples
    assert not {"actor_id", "worker_id"} & set(labels), labels
    return value


def test_original_queries_give_one_figure_per_pool_and_are_plausible(
    prometheus: PrometheusServer,
) -> None:
    # The original's PromQL has no `sum by`: by default each query is one series.
    sent = _one(prometheus.vector("rate(kafka_eventbus_actor_pool_messages_sent_total[1m])"))
    assert 0 < sent < 300, sent

    def busy() -> bool:
        # irate: the last two scrapes, i.e. the real current rate (rate() divides by
        # the whole minute while this Prometheus holds only seconds of data).
        actor = _one(prometheus.vector("irate(kafka_eventbus_actor_pool_messages_sent_total[1m])"))
        keyed = _one(prometheus.vector("irate(kafka_eventbus_keyed_pool_messages_sent_total[1m])"))
        assert actor > 20, actor
        assert keyed > 20, keyed
        assert 100 < actor + keyed < 600, (actor, keyed)
        return True

    wait_for(busy, 15, "300 events/s split over both pools")

    p99 = _one(
        prometheus.vector(
            "histogram_quantile(0.99, "
            "rate(kafka_eventbus_actor_pool_message_latency_seconds_bucket[1m]))"
        )
    )
    # The demo handler sleeps 1 ms per event.
    assert 0.0005 <= p99 <= 1.0, p99

    restarts = _one(prometheus.vector("rate(kafka_eventbus_actor_pool_actor_restarted_total[5m])"))
    assert restarts >= 0
    wait_for(
        lambda: (
            _one(prometheus.vector("rate(kafka_eventbus_actor_pool_actor_restarted_total[5m])")) > 0
        ),
        15,
        "actor restarts after handler failures",
    )

    util = _one(prometheus.vector("kafka_eventbus_actor_pool_inbox_utilization"))
    assert 0.0 <= util <= 1.0, util
    depth = _one(prometheus.vector("kafka_eventbus_actor_pool_inbox_depth"))
    deepest = _one(prometheus.vector("kafka_eventbus_actor_pool_inbox_depth_max"))
    assert 0 <= deepest <= depth, (deepest, depth)
    executors = _by(prometheus.vector("kafka_eventbus_actor_pool_inbox_depth_executors"), "le")
    assert executors["+Inf"] == ACTORS, executors


def test_recording_rules_and_alerts_on_the_service(prometheus: PrometheusServer) -> None:
    def evaluated() -> bool:
        errors = _by(prometheus.vector("job_pool:kafka_eventbus_error_ratio:rate5m"), "pool")
        assert set(errors) == {"actor", "keyed"}, errors
        # 3 % of attempts fail in both pools.
        assert all(0.005 < v < 0.15 for v in errors.values()), errors
        restart_ratio = prometheus.vector("job:kafka_eventbus_actor_pool_restart_ratio:rate5m")
        assert 0.005 < restart_ratio[0][1] < 0.15, restart_ratio
        baseline = prometheus.vector("job:kafka_eventbus_actor_pool_latency_p99_baseline:5m")
        assert [labels["baseline"] for labels, _ in baseline] == ["keyed_same_window"]
        # Above 1 % for less than `for: 5m`: pending in both pools.
        pending = prometheus.vector('ALERTS{alertname="EventbusErrorRateHigh"}')
        assert {(lb["pool"], lb["alertstate"]) for lb, _ in pending} == {
            ("actor", "pending"),
            ("keyed", "pending"),
        }
        dead = prometheus.vector('ALERTS{alertname="EventbusDeadLettersRising"}')
        assert {lb["pool"] for lb, _ in dead} == {"actor", "keyed"}, dead
        reasons = {(lb["pool"], lb["reason"]) for lb, _ in dead}
        assert ("keyed", "retries-exhausted") in reasons, reasons
        # Actors that crash more than 3 times a minute exhaust their restart budget.
        assert {r for _, r in reasons} <= {"retries-exhausted", "restart-budget-exhausted"}
        return True

    wait_for(evaluated, 20, "recording rules and alerts")


def test_every_dashboard_expression_parses_and_returns_series(
    prometheus: PrometheusServer, service: Service
) -> None:
    exprs = dict(prom.dashboard_expressions())
    assert set(NOT_YET_EXPORTED) | set(LAZY) <= set(exprs)
    # A live rollout change, after Prometheus has scraped the switch counter
    # once, so the "Mode / rollout changes" annotation has a change to show.
    wait_for(lambda: prometheus.vector("kafka_eventbus_pool_switches_total"), 15, "a first scrape")
    subprocess.run(
        [str(BIN / "poolctl"), "--target", service.grpc, "rollout", "60"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    errors = {}
    empty = set()
    for name, expr in exprs.items():
        body = prometheus.query(expr)
        if body["status"] != "success":
            errors[name] = body.get("error")
        elif not body["data"]["result"]:
            empty.add(name)
    assert errors == {}

    def all_present() -> bool:
        # Series of rarer events (dead letters, the gRPC call) may need a scrape more.
        nonlocal empty
        empty = {n for n in empty if not prometheus.vector(exprs[n])}
        return empty == NOT_YET_EXPORTED | set(LAZY)

    wait_for(all_present, 15, f"dashboard series (still empty: {sorted(empty)})")

    with urllib.request.urlopen(f"http://{service.metrics}/metrics", timeout=5) as resp:
        exposition = resp.read().decode()
    for metric in LAZY.values():
        family = metric.removesuffix("_total")
        assert re.search(rf"^# TYPE {family}(_total)? counter$", exposition, re.M), metric


def test_metrics_use_bounded_labels_never_an_aggregate_id(service: Service) -> None:
    with urllib.request.urlopen(f"http://{service.metrics}/metrics", timeout=5) as resp:
        exposition = resp.read().decode()
    series = [line for line in exposition.splitlines() if line and not line.startswith("#")]
    assert len(series) <= 1500, len(series)
    assert not re.search(r"demo-\d+", exposition)
    labels = set(re.findall(r'[{,](\w+)="', exposition))
    assert "aggregate_id" not in labels
    # Per-executor labels only with metrics.perExecutor (off here, as by default).
    assert not {"actor_id", "worker_id"} & labels, labels
    assert labels <= {
        "actor_id", "worker_id", "success", "reason", "le", "topic", "partition", "event",
        "method", "code", "mode", "quantile", "version", "implementation", "major", "minor",
        "patchlevel", "generation", "kind", "outcome",
    }, labels  # fmt: skip


def test_operations_doc_documents_every_exported_metric(service: Service) -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    with urllib.request.urlopen(f"http://{service.metrics}/metrics", timeout=5) as resp:
        exposition = resp.read().decode()
    families = set(re.findall(r"^# TYPE (\S+) (\w+)$", exposition, re.M))
    ours = {
        (name, kind)
        for name, kind in families
        if name.startswith(("kafka_eventbus_", "pool_control_")) and not name.endswith("_created")
    }
    assert len(ours) >= 25, ours
    for name, kind in ours:
        documented = name.replace("kafka_eventbus_keyed_pool_", "kafka_eventbus_actor_pool_")
        if kind == "counter" and not documented.endswith("_total"):
            documented += "_total"
        row = re.search(rf"^\| `{re.escape(documented)}` \| (\w+) \|", doc, re.M)
        assert row, f"{name} is not in the metrics reference"
        assert row.group(1) == kind, (name, row.group(1), kind)
    assert "| `kafka_eventbus_keyed_pool_*` | same | `worker_id`" in doc


# ------------------------------------------------------------ fleet control


def test_replica_diverged_alert_goes_pending_on_a_replica_scope_change_and_clears(
    prometheus: PrometheusServer, service: Service
) -> None:
    def poolctl(*args: str) -> None:
        subprocess.run(
            [str(BIN / "poolctl"), "--target", service.grpc, *args],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def alert_states() -> set[str]:
        found = prometheus.vector('ALERTS{alertname="EventbusReplicaDiverged"}')
        return {labels["alertstate"] for labels, _ in found}

    poolctl("rollout", "70", "--replica")
    wait_for(lambda: alert_states() == {"pending"}, 20, "EventbusReplicaDiverged pending")
    assert prometheus.vector("kafka_eventbus_fleet_diverged")[0][1] == 1
    poolctl("rollout", "70")  # the fleet catches up: in line again
    wait_for(lambda: not alert_states(), 20, "EventbusReplicaDiverged cleared")
    generation = prometheus.vector("kafka_eventbus_fleet_applied_generation")
    assert generation[0][1] >= 1
