"""``bench/scaling_bench.py --quick``: one and two replicas of the shipped service
drain the backlog at two handler latencies (the rows are alike; each row waits
for the embedded broker's ~5 s group join, so the third is left out here), and
the JSON has every row the report is built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "scaling_bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/scaling_bench.py",
            "--quick",
            "--latencies",
            "0,10",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["commit"]
    backlog = report["backlog_events"]
    expected = {(ms, n) for ms in (0.0, 10.0) for n in (1, 2)}
    assert {(r["handler_ms"], r["replicas"]) for r in report["throughput"]} == expected
    for row in report["throughput"]:
        # Every event of the backlog handled once (the group was stable before
        # the resume: no rebalance, no redelivery), and committed.
        assert row["events"] == backlog
        assert sum(r["events"] for r in row["per_replica"]) == backlog
        assert len(row["per_replica"]) == row["replicas"]
        owned = sorted(p for r in row["per_replica"] for p in r["partitions"])
        assert owned == list(range(report["partitions"]))
        assert all(r["partitions"] for r in row["per_replica"])
        assert row["events_per_s"] > 0
        assert row["cpu_us_per_event"] >= 0
        assert row["replica_cores"] >= 0
        assert row["broker_cores"] >= 0
        assert row["commit_s"] >= 0
        bound = row["executor_bound_events_per_s"]
        assert bound is None if row["handler_ms"] == 0 else bound > 0
    summary = {(s["handler_ms"], s["replicas"]): s for s in report["summary"]}
    assert set(summary) == expected
    for (_, replicas), s in summary.items():
        assert s["speedup"] is not None
        assert s["speedup"] > 0
        if replicas == 1:
            assert s["speedup"] == 1.0
    idle = report["idle"]
    for variant in ("control_on", "control_off"):
        assert idle[variant]["replica_cores"] >= 0
        assert idle[variant]["broker_cores"] >= 0
    assert "| 10 ms | 2 |" in proc.stdout
