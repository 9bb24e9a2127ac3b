"""`make load`'s driver (tests/load/run_load.py), briefly and at a low rate, against the
real servers: ghz reaches the health check, Subscribe, Redeem and ListPositions with the gateway's token,
every call succeeds, and the report has what README quotes. No timing is asserted; the
10-minute soak is `make load` only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.kernel.config import REPO_ROOT
from tests.deploy.tools import tool

pytestmark = pytest.mark.integration


def test_short_load_run_reports_every_call_ok(tmp_path: Path) -> None:
    tool("ghz")  # `make tools` installs it; a missing binary fails here with what to do
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.load.run_load", "--users", "20", "--target-rps", "20", "--concurrency", "4",
         "--phase-seconds", "1", "--duration", "3", "--window", "1.5", "--soak-subscribe-rps", "5",
         "--soak-redeem-rps", "3", "--soak-read-rps", "5", "--sample-every", "1", "--report", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["failed"] == 0
    for method in ("Check", "Subscribe", "Redeem"):  # Check: the health check, the server's ceiling
        phase = data["phases"][method]
        assert phase["calls"] > 0 and phase["statuses"] == {"OK": phase["calls"]}, phase
        assert phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
    assert data["phases"]["Subscribe"]["wallet_calls"].get("PlaceHold", 0) >= data["phases"]["Subscribe"]["calls"]
    soak = data["soak"]
    assert set(soak["totals"]) == {"Subscribe", "Redeem", "ListPositions"}
    assert all(t["calls"] > 0 and t["failed"] == 0 for t in soak["totals"].values()), soak["totals"]
    assert soak["windows"]  # how many windows close in a 3-second run depends on the machine
    assert set(soak["rss_mib"]) == {"wallet", "simple_earn"}
    assert all(m["min"] > 0 for m in soak["rss_mib"].values())
    assert soak["cpu_seconds"]["simple_earn process"] > 0
    assert "target per instance" in done.stdout and "errors in all: 0" in done.stdout
