"""Smoke run of the benchmark (tiny sizes, every scenario, one run), so that it cannot rot.

The figures are not checked against targets: only that every scenario ran, moved
events, and delivered every one of them exactly once (lines and checksum at the
counting endpoint, stored rows at the local server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scenarios import COUNTING, LOCAL_SERVER, SCENARIOS

_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_quick_run_covers_every_scenario_and_delivers_every_event(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"

    results = json.loads(out.read_text())
    by_name = {s["name"]: s for s in results["scenarios"]}
    assert sorted(by_name) == sorted(s.name for s in SCENARIOS)
    for scenario in SCENARIOS:
        figures = by_name[scenario.name]
        assert figures["ok"] is True, (scenario.name, figures["problems"])
        assert figures["events_per_sec"] > 0, scenario.name
        assert figures["events"] > 0, scenario.name
        for run in figures["runs"]:
            if scenario.sends and scenario.endpoint == LOCAL_SERVER:
                assert run["rows_stored"] == run["events"] == run["distinct_events"], (scenario.name, run)
                assert run["quarantined"] == 0, (scenario.name, run)
            if scenario.sends and scenario.endpoint == COUNTING:
                assert run["lines_received"] == run["events"] and run["checksum_ok"] is True, (scenario.name, run)
                assert run["rows_stored"] is None, (scenario.name, run)
            if scenario.sends:
                assert run["requests"] >= 1 and run["non_2xx"] == 0, (scenario.name, run)
            else:
                assert run["counted"] == run["events"], (scenario.name, run)
                assert run["requests"] == 0, (scenario.name, run)

    table = proc.stdout
    for scenario in SCENARIOS:
        row = next((line for line in table.splitlines() if line.startswith(f"| {scenario.name}: ")), None)
        assert row is not None, f"no table row for {scenario.name}:\n{table}"
        assert row.rstrip().endswith(("| OK (lines, checksum) |", "| OK (rows stored) |", "| OK (seen) |")), row
    assert "Exactly once: in every run every event arrived once" in table
    assert ("in 1 run(s), the local Events API server stored 3,000 rows (3,000 distinct event_id, 0 quarantined) "
            "for 3,000 events") in table
    assert "Targets:" in table
