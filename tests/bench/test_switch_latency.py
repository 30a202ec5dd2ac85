"""bench/switch_latency.py end to end, small: the real service, producer and calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def test_switch_latency_bench_measures_and_splits_the_calls(tmp_path: Path) -> None:
    out = tmp_path / "switch.json"
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "switch_latency.py"),
            "--switches", "6", "--rate", "500", "--aggregates", "100", "--partitions", "2",
            "--warmup", "0.5", "--freeze-ms", "20", "--keep-calls", "--json", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["runs"]
    assert row["switches"] == 6
    calls = row["calls"]
    assert all(c["round_trip_ms"] >= c["switch_ms"] >= 0 for c in calls)
    # The probe inside the service saw every change and what the old pool held.
    assert all("old_pool_events" in c for c in calls)
    # Each freeze shows as a stall of the service's event loop.
    assert row["loop_stalls"]["ms"]["max"] >= 15
    assert row["dispatch"]["records"]["n"] > 0
    assert report["pooled"]["current"]["calls"] == 6
    assert "| current | 1 | 6 |" in run.stdout
