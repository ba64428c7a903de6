"""The throughput benchmark still runs end to end (it asserts nothing about speed).

``scripts/bench-scp`` is not a test, but it is how the Storage SCP's speed is measured
against DCMTK's storescp, so a change that breaks it (our SCP's command line, the sink,
the report) must show up here: a tiny series, one round, every receiver, the floor.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None, reason="DCMTK is not installed"
)


def test_bench_scp_runs_every_receiver_and_prints_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-scp"), "--ct-slices", "6", "--mr-slices", "5",
         "--rounds", "1", "--parallel", "2", "--echo-count", "2", "--floor",
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["failed"] == 0
    assert {(row["case"], row["receiver"]) for row in result["summary"] if row["ok"] == 1} == {
        (case, receiver) for case in ("CT x1", "CT x2", "MR x1", "MR x2") for receiver in ("ours", "dcmtk", "sink")
    }
    assert set(result["ratios"]) == {"CT x1", "CT x2", "MR x1", "MR x2"}
    assert len(result["durable_commit_ms"]["CT"]) == 50 and all(t > 0 for t in result["durable_commit_ms"]["CT"])
    assert "ours/DCMTK, median images/s" in r.stdout
    assert "for a durable receiver" in r.stdout
