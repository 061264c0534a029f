"""``python -m benchmarks.window_rss --runner multiprocess``, one run of it scaled down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_the_multiprocess_runner_measures_the_sdk_worker_apart_from_the_runner():
    """2,000 one-row windows in one bundle of the FnApiRunner's SDK worker subprocess: every line
    posted once (the benchmark checks count and checksum), and the worker's peak read from the
    Python process that runs ``sdk_worker_main`` (Beam loaded: far more than the shell that starts
    it), not from the runner's own process. The figures are printed, not bounded here: what they
    show is in benchmarks/README.md."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.window_rss", "--child", "sink", "2000", "2000", "multiprocess", "-"],
        cwd=_ROOT, capture_output=True, text=True, timeout=230)
    assert child.returncode == 0, child.stderr[-3000:]
    run = json.loads(child.stdout.strip().splitlines()[-1])
    assert (run["bundles"], run["requests"], run["lines"]) == ("1 (largest 2000)", 2000, 2000)
    assert run["worker_peak_rss_kib"] > 100 * 1024, run
    assert "runner_peak_rss_kib" not in run
