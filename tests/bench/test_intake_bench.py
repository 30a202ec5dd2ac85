"""``bench/intake_bench.py``: each case decodes to what it is named for, and a
short run against a baseline checkout writes every case for both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.intake_bench import CASES, records
from pool import DeadLetter, DeadLetterReason, Message
from server._intake import Decoder

ROOT = Path(__file__).resolve().parents[2]

#: case -> (aggregate ID of the first record, with an envelope) or the dead letter's reason.
EXPECTED: dict[str, tuple[str, bool] | DeadLetterReason] = {
    "loop only": ("agg-0", True),
    "Message only": ("agg-0", True),
    "seed envelope, key": ("agg-0", True),
    "envelope, ID header": ("agg-0", True),
    "binary value, key": ("agg-0", False),
    "plain JSON, key": ("agg-0", False),
    "no ID, by offset": ("bench/0/0", False),
    "bad envelope field": DeadLetterReason.MALFORMED_ENVELOPE,
    "not JSON": DeadLetterReason.MALFORMED_ENVELOPE,
}


@pytest.mark.parametrize("case", [case for case, _ in CASES])
def test_each_case_decodes_as_named(case: str) -> None:
    decoder = Decoder()
    results = [decoder.decode(*record) for record in records(case, 20)]
    expected = EXPECTED[case]
    if isinstance(expected, DeadLetterReason):
        assert all(isinstance(r, DeadLetter) and r.reason is expected for r in results)
        return
    assert all(isinstance(r, Message) for r in results)
    first = results[0]
    assert isinstance(first, Message)
    assert (first.aggregate_id, first.envelope is not None) == expected
    assert len({r.aggregate_id for r in results if isinstance(r, Message)}) == 20


def test_a_short_run_against_a_baseline_writes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "intake_bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/intake_bench.py", "--baseline-root", str(ROOT),
         "--rounds", "2", "--records", "50", "--repeat", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"this", "baseline"}
    for runs in report["results"].values():
        assert len(runs) == 2
        for run in runs:
            assert set(run) == {case for case, _ in CASES}
            assert all(ns > 0 for ns in run.values())
    assert "| seed envelope, key |" in proc.stdout
