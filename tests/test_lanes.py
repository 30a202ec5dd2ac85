"""The test lanes of tests/conftest.py, checked by running pytest on this suite.

- Without ``prometheus``/``promtool`` on PATH a Prometheus test is skipped with
  the one-line reason; under ``CI=true`` the run stops with an error instead.
- ``-m "not process and not campaign"`` (``make test-fast``) leaves out the
  service processes and the campaigns and keeps the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMTOOL_TEST = "tests/deploy/test_prometheus.py::test_promtool_check_rules_accepts_rules_yml"


def pytest_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def env_without_prometheus(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # an empty directory: no prometheus, no promtool
    env.update(extra)
    return env


def test_missing_prometheus_skips_with_one_line(tmp_path: Path) -> None:
    run = pytest_run("-q", "-rs", PROMTOOL_TEST, env=env_without_prometheus(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1, run.stdout
    assert "prometheus/promtool not installed: apt-get install prometheus" in skips[0]


def test_missing_prometheus_under_ci_is_an_error(tmp_path: Path) -> None:
    run = pytest_run("-q", PROMTOOL_TEST, env=env_without_prometheus(tmp_path, CI="true"))
    assert run.returncode == 4, run.stdout + run.stderr
    assert "CI=true: the Prometheus tests must run" in run.stderr
    assert "skipped" not in run.stdout


def test_fast_lane_leaves_out_processes_and_campaigns() -> None:
    run = pytest_run(
        "--collect-only", "-q", "-m", "not process and not campaign", env=dict(os.environ)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    files = {i.split("::")[0] for i in ids}
    assert "tests/pool/test_pool_contract.py" in files
    assert "tests/server/test_service.py" in files
    assert not any(f.startswith("tests/bench/") for f in files), files
    assert "tests/server/test_process.py" not in files
    assert "tests/server/test_process_startup.py" not in files
    assert "tests/deploy/test_service_prometheus.py" not in files
    assert not any(i.startswith("tests/deploy/test_prometheus.py::test_rate_of") for i in ids)
    # Static checks of the deploy files stay in the fast lane.
    assert "tests/deploy/test_prometheus.py::test_dashboard_is_importable_in_grafana_10" in ids
