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


# A hang guard, not a speed bound: the quick run takes about 100 s on two idle cores and failed
# at 170 s in a full suite run beside other jobs (each of its 20 scenarios starts a pipeline).
@pytest.mark.timeout(600)
def test_quick_run_covers_every_scenario_and_delivers_every_event(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=580)
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
    # Issue 23's target and its two parts, each a ratio of two scenarios that ran.
    for pair in ("sink_zstd_3_destinations / sink_zstd events/s: ",
                 "sink_zstd_routed / sink_zstd events/s (a function per element): ",
                 "sink_zstd_3_destinations / sink_zstd_routed events/s (three batches instead of one): "):
        assert f"- {pair}" in table, pair


_FAKE_VALGRIND = """#!{python}
# Stands in for valgrind: runs the command after the options, then writes a cachegrind
# summary of 1,000,000 instructions plus 5,000 per event (5,200 routed by a function, 5,250 to three
# data sources).
import json, subprocess, sys
options = [a for a in sys.argv[1:] if a.startswith("--")]
command = sys.argv[1 + len(options):]
out = next(a.split("=", 1)[1] for a in options if a.startswith("--cachegrind-out-file="))
rc = subprocess.run(command).returncode
spec = json.loads(command[-1])
per_event = {{"sink_zstd_routed": 5200, "sink_zstd_3_destinations": 5250}}.get(spec["scenario"], 5000)
with open(out, "w") as fh:
    fh.write("events: Ir\\nsummary: %d\\n" % (1_000_000 + per_event * spec["events"]))
sys.exit(rc)
"""


@pytest.mark.timeout(180)
def test_instruction_counts_are_per_event_and_compared_as_the_targets_compare(tmp_path):
    """``--instructions`` (with a stand-in for valgrind: the real one takes minutes): each scenario
    at its size and a tenth of it, the difference per event, and the targets' pairs as ratios."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "valgrind"
    fake.write_text(_FAKE_VALGRIND.format(python=sys.executable))
    fake.chmod(0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(bin_dir), env["PATH"]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--instructions", "--events", "400", "--max-batch-bytes", "4096",
         "--scenarios", "sink_zstd", "sink_zstd_routed", "sink_zstd_3_destinations", "--work-dir",
         str(tmp_path / "work")],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "sink_zstd: 5,000 instructions per event (400 events: 0.00 G; 40: 0.00 G)" in proc.stdout
    assert "sink_zstd_3_destinations: 5,250 instructions per event" in proc.stdout
    assert ("- sink_zstd_3_destinations / sink_zstd events per instruction: 0.952x (target >= 0.9x): met"
            in proc.stdout)
    # The target's two parts: the function per element (5,000 / 5,200), three batches (5,200 / 5,250).
    assert "- sink_zstd_routed / sink_zstd events per instruction (a function per element): 0.962x\n" in proc.stdout
    assert ("- sink_zstd_3_destinations / sink_zstd_routed events per instruction (three batches instead of one): "
            "0.990x\n") in proc.stdout
    assert proc.stderr.count("lines 400/400, checksum equal OK") == 3
    assert proc.stderr.count("lines 40/40, checksum equal OK") == 3


def test_instruction_counts_need_valgrind(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--instructions", "--scenarios", "sink_zstd", "--events", "10",
         "--work-dir", str(tmp_path / "work")], cwd=_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--instructions needs valgrind on PATH" in proc.stderr
