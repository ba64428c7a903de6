"""The throughput benchmarks still run end to end (they assert nothing about speed).

``scripts/bench-scp`` is not a test, but it is how the Storage SCP's speed is measured
against DCMTK's storescp, so a change that breaks it (our SCP's command line, the sink,
the report) must show up here: a tiny series, one round, every receiver, the floor. Likewise
``scripts/bench-forward`` (forwarding by ``appliance run`` against storescu sending directly):
a tiny series, one round, every case, the ratio line and a few latencies.
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


def test_bench_forward_runs_every_case_and_prints_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "forward.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-forward"), "--slices", "6", "--size", "32", "--rounds", "1",
         "--latency-objects", "3", "--latency-gap", "10",
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "forward/direct throughput: " in r.stdout and "(issue 16 asks for at least 0.80)" in r.stdout
    assert "latency, C-STORE acknowledged by the box -> arrived at storescp (3 objects" in r.stdout
    result = json.loads(out.read_text())
    assert result["objects"] == 6 and len(result["rounds"]) == 1
    assert all(result[case]["images_per_s"] > 0 for case in ("direct", "forward", "ingest", "series"))
    assert result["ratio_forward_direct"] > 0 and len(result["latency_ms"]["all"]) == 3
