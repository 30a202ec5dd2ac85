"""A real Prometheus server on loopback for tests, and dashboard expression helpers.

Prometheus cannot listen on port 0, so a free port is picked and the start is
retried on a bind race. Its data lives in a temporary directory; ``stop()``
sends SIGTERM and waits, then kills.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import find_free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"


def binary(name: str) -> str:
    """Path of ``prometheus``/``promtool``; scripts/ensure_system_deps.sh installs them."""
    path = shutil.which(name)
    assert path is not None, f"{name} not on PATH: run scripts/ensure_system_deps.sh"
    return path


class PrometheusServer:
    """``prometheus`` scraping ``targets`` every second, with ``rules`` loaded."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path | None = RULES) -> None:
        self.workdir = workdir
        self.targets = targets
        self.rules = rules
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "pool-server",
                    "scrape_interval": "1s",
                    "scrape_timeout": "900ms",
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        if self.rules is not None:
            config["rule_files"] = [str(self.rules)]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout: float = 20.0) -> None:
        config = self._write_config()
        for _ in range(3):
            self.port = find_free_port()
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready(timeout):
                return
            self.stop()
        raise AssertionError(f"prometheus did not start; log:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)  # readiness poll interval, bounded by the deadline
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ API
    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``/api/v1/<path>``; returns the decoded body even on 4xx (errors carry JSON)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        return body

    def query(self, expr: str) -> dict[str, Any]:
        """Instant query; the whole response (``status``, ``data`` or ``error``)."""
        return self.api("query", query=expr)

    def vector(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant query that must succeed; ``[(labels, value)]``."""
        body = self.query(expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def scraped_ok(self) -> bool:
        """Every target was scraped at least once and is up."""
        targets = self.api("targets")["data"]["activeTargets"]
        return bool(targets) and all(
            t["health"] == "up" and not t["lastScrape"].startswith("0001") for t in targets
        )


# --------------------------------------------------------------- dashboard
#: Grafana variables replaced by concrete values so Prometheus can evaluate.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${job}": ".+",
    "$job": ".+",
    "${instance}": ".+",
    "$instance": ".+",
    "${topic}": ".+",
    "$topic": ".+",
}


def wait_for(predicate: Callable[[], object], timeout: float, message: str) -> None:
    """Poll ``predicate`` until truthy; ``AssertionError`` with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
            last = None
        except (AssertionError, LookupError, ValueError, OSError) as exc:
            last = exc
        time.sleep(0.1)  # poll interval, bounded by the deadline
    raise AssertionError(f"{message} not met within {timeout}s (last error: {last!r})")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(panel title / refId, PromQL with variables substituted)`` for every target."""
    out: list[tuple[str, str]] = []
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                out.append((f"{panel['title']}/{target.get('refId')}", substitute(expr)))
    out.extend(
        (f"annotation {a['name']}", substitute(a["expr"]))
        for a in dashboard()["annotations"]["list"]
        if a.get("expr")
    )
    for var in dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip())
            assert match, f"variable {var['name']}: unsupported query {text!r}"
            out.append((f"variable {var['name']}", substitute(match.group(1))))
    return out


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARS[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr
