"""Prism, the DirectRunner's engine for batch pipelines since Beam 2.68: the sample files job and
the windowed sink on ``--runner=PrismRunner`` with the binary ``./dev engines`` builds at this
environment's Beam version, and what ``--runner=DirectRunner`` does with it and without it.

What Prism cannot run, the DirectRunner decides before running (``_PrismRunnerSupportVisitor``
in ``apache_beam/runners/direct/direct_runner.py``): among others TestStream, processing-time
(REAL_TIME) timers and session windows. The sink's unbounded path (``_BatchDoFn``, whose
``stale`` timer is a processing-time one) is such a pipeline: on the DirectRunner a streaming
job never runs on Prism. Bounded input goes through a GroupByKey and runs on Prism, as here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from engines_testlib import check_sample_files_job, check_windowed_sink, files_job_in_subprocess, prism_binary
from pipelines_testlib import REPO_ROOT, count
from shared_testlib import dead_letters_in


@pytest.fixture
def prism_flags() -> list[str]:
    return ["--runner=PrismRunner", f"--prism_location={prism_binary()}"]


def test_sample_files_job_on_prism(server, datasource, prism_flags, tmp_path):
    check_sample_files_job(server, datasource, prism_flags, tmp_path / "dead")


@pytest.mark.parametrize("windowing", ["fixed", "sliding"])
def test_windowed_sink_on_prism(server, datasource, prism_flags, windowing, tmp_path):
    outcome = check_windowed_sink(server, datasource, prism_flags, tmp_path / "dead", windowing=windowing)
    # Prism (2.77) hands the sink's first step the input in large bundles (measured: one of
    # 3,001 elements on a quiet machine; on a busy one its dynamic splitting cut it in two, of
    # 2,964 and 37), so batches fill inside them, unlike Flink's batch bundles of 1,000 elements.
    assert outcome.bundles.max >= 1000, outcome.bundles


def test_direct_runner_runs_the_batch_job_on_prism(server, datasource, tmp_path, caplog):
    """``--runner=DirectRunner`` takes ``--prism_location`` too: the job runs on that binary."""
    caplog.set_level(logging.INFO)
    check_sample_files_job(server, datasource, ["--runner=DirectRunner", f"--prism_location={prism_binary()}"],
                           tmp_path / "dead")
    messages = [record.getMessage() for record in caplog.records]
    assert "Running pipeline with PrismRunner." in messages
    assert not [m for m in messages if "Falling back" in m]


def test_direct_runner_falls_back_when_prism_cannot_be_had(server, datasource, tmp_path):
    """Without a usable Prism (no binary at the path given, or none to download offline) the
    DirectRunner logs why and runs the same job on its own engine: the same rows, the same dead
    letters. In a new process, as a user runs it: within one process Beam keeps the first Prism
    it started and hands it every later job."""
    result = files_job_in_subprocess(server, datasource, [
        "--runner=DirectRunner", f"--prism_location={tmp_path / 'no-prism-here'}",
        "--dead_letter_path", f"{tmp_path / 'dead'}/"], cwd=tmp_path)
    assert "Running pipeline with PrismRunner." in result.stderr
    assert "Falling back to DirectRunner" in result.stderr
    assert (count(server, datasource), count(server, f"{datasource}_quarantine")) == (4988, 10)
    assert sorted(letter.kind for letter in dead_letters_in(tmp_path / "dead")) == ["unencodable", "unencodable"]


def test_window_rss_benchmark_measures_the_worker_and_prism_apart():
    """``python -m benchmarks.window_rss --runner prism``, one run of it scaled down (2,000 one-row
    windows): the whole input in one bundle of the LOOPBACK worker (this run's process), every
    line posted once (the benchmark checks count and checksum), and both peaks read, the
    worker's and Prism's, from two processes. The figures are printed, not bounded here: what
    they show is in benchmarks/README.md."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.window_rss", "--child", "sink", "2000", "2000", "prism",
         str(prism_binary())], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stderr[-3000:]
    run = json.loads(child.stdout.strip().splitlines()[-1])
    assert (run["bundles"], run["requests"], run["lines"]) == ("1 (largest 2000)", 2000, 2000)
    # Prism's VmHWM is its own: a Go process far smaller than a Python worker with Beam loaded.
    assert 0 < run["runner_peak_rss_kib"] < run["peak_rss_kib"]
