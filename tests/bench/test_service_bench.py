"""``bench/service_bench.py --quick``: the shipped service and the plain loop run
end to end, and the JSON has every row the report is built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "service_bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/service_bench.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["consumer"], r["handler"]) for r in report["summary"]}
    assert rows == {(c, h) for c in ("plain", "keyed", "actor") for h in ("noop", "1ms")}
    for row in report["throughput"]:
        assert row["events"] == (
            300 if row["consumer"] == "plain" and row["handler"] == "1ms" else 5000
        )
        assert row["events_per_s"] > 0
        assert row["cpu_us_per_event"] >= 0
        assert row["broker_cpu_us_per_event"] >= 0
        if row["consumer"] != "plain":
            assert row["commit_s"] >= 0  # the group committed the whole backlog
    for s in report["summary"]:
        assert s["ratio"] is not None
        assert s["ratio"] > 0
    assert {lat["mode"] for lat in report["latency"]} == {"keyed", "actor"}
    for lat in report["latency"]:
        assert lat["events"] > 0
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # The floor beside them: the plain loop at the same rate, same producer and broker.
    assert [lat["consumer"] for lat in report["latency_plain"]] == ["plain"]
    for lat in report["latency_plain"]:
        assert lat["events"] > 0
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["to_handler_start"]["p99_ms"] <= lat["p99_ms"]
    assert {s["consumer"] for s in report["latency_summary"]} == {"plain", "keyed", "actor"}
    switch = report["switch"]
    assert switch["switches"] == 5
    assert 0 < switch["round_trip_ms"]["p50_ms"] <= switch["round_trip_ms"]["max_ms"]
    metrics = report["metrics"]
    assert metrics["series"] >= metrics["kafka_eventbus_series"] > 0
    assert metrics["bytes"] > 0
    assert "| pool-server KEYED | noop |" in proc.stdout
