"""deploy/prometheus and deploy/grafana proven with promtool and a real Prometheus.

The integration part starts a real Prometheus on loopback (1 s scrape and rule
evaluation, rules.yml loaded) scraping a process that runs both real pools
under traffic with their metrics per executor (tests/deploy/pool_traffic.py
``--per-executor``, as ``metrics.perExecutor`` does), and evaluates the Go
original's PromQL against it. tests/deploy/test_service_prometheus.py does the
same on the service's default exposition (one series per pool).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy import prom
from tests.deploy.prom import PrometheusServer, binary, wait_for
from tests.helpers import find_free_port

REPO = prom.REPO


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


# ----------------------------------------------------------------- promtool


@pytest.mark.prometheus
def test_promtool_check_rules_accepts_rules_yml() -> None:
    result = promtool("check", "rules", str(prom.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.prometheus
def test_promtool_check_config_accepts_scrape_config() -> None:
    result = promtool("check", "config", str(prom.SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(prom.SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "pool-server"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:2112"]}]
    assert config["rule_files"] == ["rules.yml"]


@pytest.mark.prometheus
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(prom.RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = yaml.safe_load(prom.RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(prom.RULES_TEST.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts == {
        "ActorPoolLatencyP99AboveBaseline",
        "ActorPoolRestartRateHigh",
        "EventbusErrorRateHigh",
        "EventbusInboxSaturated",
        "EventbusDeadLettersRising",
        "EventbusConsumerLagGrowing",
        "EventbusPartitionsPausedStuck",
        "EventbusReplicaDiverged",
    }
    assert alerts - firing == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a not-firing test"


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("restart_ratio:rate5m > 0.05", "restart_ratio:rate5m > 0.5"),
        ("error_ratio:rate5m > 0.01", "error_ratio:rate5m > 0.001"),
        ("(1.2 * job:", "(2.5 * job:"),
        ("inbox_utilization:max > 0.8", "inbox_utilization:max > 0.95"),
    ],
)
def test_unit_tests_catch_a_changed_threshold(tmp_path: Path, original: str, broken: str) -> None:
    rules = prom.RULES.read_text()
    assert original in rules
    (tmp_path / "rules.yml").write_text(rules.replace(original, broken))
    (tmp_path / "rules_test.yml").write_text(prom.RULES_TEST.read_text())
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# ------------------------------------------------------- a real Prometheus


@pytest.fixture(scope="module")
def pool_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a process running both real pools under traffic."""
    port = find_free_port()
    log = tmp_path_factory.mktemp("traffic") / "traffic.log"
    with log.open("wb") as err:
        args = [f"--port={port}", "--rate=200", "--per-executor"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.deploy.pool_traffic", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # blocks until "ready" or exit
        assert line.startswith("ready"), f"traffic process failed: {log.read_text()}"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, pool_target: str
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [pool_target])
    server.start()
    try:
        wait_for(server.scraped_ok, 15, "first successful scrape")
        # rate() over [1m] needs two samples of every series.
        wait_for(
            lambda: server.vector("rate(kafka_eventbus_actor_pool_messages_sent_total[1m])"),
            15,
            "two scrapes",
        )
        yield server
    finally:
        server.stop()


def test_rate_of_messages_sent_is_present_per_actor_and_plausible(
    prometheus: PrometheusServer,
) -> None:
    samples = prometheus.vector("rate(kafka_eventbus_actor_pool_messages_sent_total[1m])")
    assert {labels["actor_id"] for labels, _ in samples} == {str(i) for i in range(8)}
    assert all(labels["job"] == "pool-server" for labels, _ in samples)
    total = sum(v for _, v in samples)
    # rate() divides the increase by the whole 1m range, and this Prometheus
    # has only seconds of data: the answer is positive but below the offered
    # 200 events/s. irate() over the last two scrapes sees the real rate.
    assert 0 < total < 400, total
    actor_now = sum(
        v for _, v in prometheus.vector("irate(kafka_eventbus_actor_pool_messages_sent_total[1m])")
    )
    keyed_now = sum(
        v for _, v in prometheus.vector("irate(kafka_eventbus_keyed_pool_messages_sent_total[1m])")
    )
    # 200 events/s offered; aggregates are split about half and half by the rollout.
    assert 60 < actor_now + keyed_now < 400, (actor_now, keyed_now)
    assert actor_now > 10, actor_now
    assert keyed_now > 10, keyed_now


def test_p99_latency_is_present_and_within_the_handler_bounds(
    prometheus: PrometheusServer,
) -> None:
    samples = prometheus.vector(
        "histogram_quantile(0.99, "
        "rate(kafka_eventbus_actor_pool_message_latency_seconds_bucket[1m]))"
    )
    assert {labels["actor_id"] for labels, _ in samples} == {str(i) for i in range(8)}
    values = [v for _, v in samples if v == v]  # drop NaN (an actor that ran nothing)
    assert values, samples
    # The handler sleeps 0.2-2 ms; allow scheduling delay on a loaded machine.
    assert all(0.0001 <= v <= 0.5 for v in values), values
    overall = prometheus.vector(
        "histogram_quantile(0.99, sum by (le) (rate("
        "kafka_eventbus_actor_pool_message_latency_seconds_bucket[1m])))"
    )
    assert 0.0002 <= overall[0][1] <= 0.5, overall


def test_restart_rate_is_present_for_every_actor_and_positive_with_poison(
    prometheus: PrometheusServer,
) -> None:
    def restarting() -> bool:
        samples = prometheus.vector("rate(kafka_eventbus_actor_pool_actor_restarted_total[5m])")
        assert {labels["actor_id"] for labels, _ in samples} == {str(i) for i in range(8)}
        assert all(v >= 0 for _, v in samples)
        # The poison aggregates live on (at most) two actors and crash them.
        crashing = [labels["actor_id"] for labels, v in samples if v > 0]
        return 1 <= len(crashing) <= 2

    wait_for(restarting, 15, "restarts of the poisoned actors")


def test_inbox_utilization_is_present_per_actor_between_0_and_1(
    prometheus: PrometheusServer,
) -> None:
    samples = prometheus.vector("kafka_eventbus_actor_pool_inbox_utilization")
    assert {labels["actor_id"] for labels, _ in samples} == {str(i) for i in range(8)}
    assert all(0.0 <= v <= 1.0 for _, v in samples), samples
    depth = prometheus.vector("kafka_eventbus_actor_pool_inbox_depth")
    assert all(0 <= v <= 100 for _, v in depth), depth


def test_recording_rules_evaluate_on_real_data(prometheus: PrometheusServer) -> None:
    def recorded() -> bool:
        rates = {
            labels["pool"]: v
            for labels, v in prometheus.vector("job_pool:kafka_eventbus_messages_processed:rate5m")
        }
        assert set(rates) == {"actor", "keyed"}, rates
        assert all(v > 0 for v in rates.values()), rates
        errors = {
            labels["pool"]: v
            for labels, v in prometheus.vector("job_pool:kafka_eventbus_error_ratio:rate5m")
        }
        # Only the actor pool gets poison; keyed handles everything.
        assert errors["keyed"] == 0, errors
        assert 0 < errors["actor"] < 0.5, errors
        p99 = {
            labels["pool"]: v
            for labels, v in prometheus.vector(
                "job_pool:kafka_eventbus_message_latency_seconds:p99_5m"
            )
        }
        assert 0 < p99["keyed"] < 0.5, p99
        baseline = prometheus.vector("job:kafka_eventbus_actor_pool_latency_p99_baseline:5m")
        assert [labels["baseline"] for labels, _ in baseline] == ["keyed_same_window"]
        assert baseline[0][1] == pytest.approx(p99["keyed"])
        return True

    wait_for(recorded, 15, "recording rules on real data")


def test_dead_letter_alert_fires_on_real_poison_events(prometheus: PrometheusServer) -> None:
    def firing() -> bool:
        alerts = prometheus.vector(
            'ALERTS{alertname="EventbusDeadLettersRising", alertstate="firing"}'
        )
        assert alerts, "not firing yet"
        assert {labels["pool"] for labels, _ in alerts} == {"actor"}
        assert {labels["reason"] for labels, _ in alerts} <= {
            "retries-exhausted",
            "restart-budget-exhausted",
        }
        return True

    wait_for(firing, 15, "EventbusDeadLettersRising firing")


def test_every_dashboard_expression_parses(prometheus: PrometheusServer) -> None:
    exprs = prom.dashboard_expressions()
    assert len(exprs) >= 20
    errors = {
        name: body.get("error")
        for name, expr in exprs
        if (body := prometheus.query(expr))["status"] != "success"
    }
    assert errors == {}


def test_a_broken_expression_is_reported_as_a_parse_error(prometheus: PrometheusServer) -> None:
    body = prometheus.query("sum by (le (rate(kafka_eventbus_actor_pool_messages_sent_total[1m]))")
    assert body["status"] == "error"
    assert body["errorType"] == "bad_data"
    assert "parse error" in body["error"]


def test_dashboard_pool_expressions_return_series(prometheus: PrometheusServer) -> None:
    pool_exprs = [
        (name, expr)
        for name, expr in prom.dashboard_expressions()
        if re.search(r"kafka_eventbus_(actor|keyed)_pool_", expr)
        and "dead_letters" not in expr
        and "keyed_pool_dead" not in expr
    ]
    assert len(pool_exprs) >= 12
    empty = [name for name, expr in pool_exprs if not prometheus.vector(expr)]
    assert empty == []


# --------------------------------------------------------------- dashboard


def test_dashboard_is_importable_in_grafana_10() -> None:
    data = prom.dashboard()
    assert data["schemaVersion"] >= 38
    assert data["uid"]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panel_ids = [p["id"] for p in data["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    # No hard-coded datasource UID anywhere.
    uids = set(re.findall(r'"uid": "([^"]+)"', json.dumps(data)))
    assert uids <= {"${DS_PROMETHEUS}", "-- Grafana --", data["uid"]}, uids


def test_dashboard_covers_the_issue_panels() -> None:
    data = prom.dashboard()
    panels = {p["title"]: p for p in data["panels"] if p["type"] != "row"}
    exprs = " ".join(e for _, e in prom.dashboard_expressions())
    # The executors' depth distribution: per pool, so it works without perExecutor too.
    assert any(
        p["type"] == "heatmap" and "inbox_depth_executors" in json.dumps(p) for p in panels.values()
    )
    for needle in (
        "kafka_eventbus_actor_pool_messages_sent_total",
        "kafka_eventbus_keyed_pool_messages_sent_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "kafka_eventbus_actor_pool_inbox_depth",
        "kafka_eventbus_actor_pool_inbox_depth_max",
        "kafka_eventbus_actor_pool_inbox_utilization",
        "kafka_eventbus_actor_pool_actor_restarted_total",
        "kafka_eventbus_actor_pool_dead_letters_total",
        "kafka_eventbus_consumer_lag",
        "kafka_eventbus_pool_mode",
        "kafka_eventbus_pool_rollout_percent",
        "kafka_eventbus_pool_switches_total",
    ):
        assert needle in exprs, needle


def test_every_runbook_link_in_the_rules_points_to_a_heading_of_the_runbook() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    rules = yaml.safe_load(prom.RULES.read_text())
    links = {
        r["annotations"]["runbook"] for g in rules["groups"] for r in g["rules"] if "alert" in r
    }
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        assert path == "docs/operations.md", link
        assert anchor in anchors, link
