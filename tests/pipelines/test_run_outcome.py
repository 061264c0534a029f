"""Runs that fail loudly: the exit status and the summary's last line when too much is dead-lettered.

Against the pipelines' shared local server; one run goes through a real process,
the others through the same code path as ``main`` (``exit_on_usage_error``).
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from pipelines_testlib import sink_flags

from pipelines import files_to_tinybird
from pipelines._dead_letter_ratio import CheckDeadLetterRatio, in_job_max_ratio
from pipelines._running import exit_on_usage_error
from pipelines.files_to_tinybird import SAMPLE_DATA

REPO_ROOT = Path(__file__).resolve().parents[2]


def _mostly_bad(path, *, good: int, bad: int):
    """``good`` JSON objects and ``bad`` lines that are JSON but not objects (dead-lettered, never sent)."""
    lines = [json.dumps({"id": i}) for i in range(good)] + [json.dumps([i, "not an object"]) for i in range(bad)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _main(argv):
    """What ``python -m pipelines.files_to_tinybird ARGV`` does, minus the logging set-up: (exit status, output)."""
    out = io.StringIO()
    try:
        exit_on_usage_error(functools.partial(files_to_tinybird.run, out=out), argv)
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    return 0, out.getvalue()


def test_the_sample_data_run_passes_with_the_default_ratio(server, datasource, tmp_path):
    # 2 of its 5,000 rows are dead-lettered on purpose: 0.04%, under the default 1%.
    status, text = _main(sink_flags(server, datasource, "--input", str(SAMPLE_DATA),
                                    "--dead_letter_path", str(tmp_path / "dead")))
    assert status == 0
    assert "  dead letters                  2   (unencodable: 2)" in text
    assert "FAILED" not in text


def test_the_sample_data_run_fails_with_ratio_zero(server, datasource, tmp_path):
    status, text = _main(sink_flags(server, datasource, "--input", str(SAMPLE_DATA),
                                    "--max_dead_letter_ratio", "0"))
    assert status == 1
    assert text.rstrip().splitlines()[-1] == (
        "FAILED: 2 of 5,000 rows read were dead-lettered (0.04%), more than --max_dead_letter_ratio 0 (0.00%)")


def test_a_run_with_most_rows_dead_lettered_fails(server, datasource, tmp_path):
    source = _mostly_bad(tmp_path / "in.ndjson", good=10, bad=90)
    status, text = _main(sink_flags(server, datasource, "--input", str(source)))
    assert status == 1
    assert text.rstrip().splitlines()[-1] == (
        "FAILED: 90 of 100 rows read were dead-lettered (90.00%), more than --max_dead_letter_ratio 0.01 (1.00%)")
    # Failing the run loses nothing: the good rows are stored all the same.
    server.flush()
    assert server.query(f"SELECT count() AS n FROM {datasource}") == [{"n": 10}]


def test_a_higher_ratio_lets_the_same_run_pass(server, datasource, tmp_path):
    source = _mostly_bad(tmp_path / "in.ndjson", good=10, bad=90)
    status, text = _main(sink_flags(server, datasource, "--input", str(source), "--max_dead_letter_ratio", "1"))
    assert status == 0 and "FAILED" not in text
    assert "  dead letters                 90   (unencodable: 90)" in text


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan"])
def test_a_ratio_outside_0_to_1_is_refused_before_anything_runs(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        files_to_tinybird.run(["--input", str(tmp_path / "none.ndjson"), "--max_dead_letter_ratio", value])
    assert exit_.value.code == 2
    assert "expected a number from 0 to 1" in capsys.readouterr().err


def test_the_process_exits_1_and_says_why(server, datasource, tmp_path):
    source = _mostly_bad(tmp_path / "in.ndjson", good=3, bad=7)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.files_to_tinybird", "--input", str(source), "--datasource", datasource,
         "--api_url", server.url, "--token_env", "RUN_OUTCOME_TOKEN", "--runner", "FnApiRunner"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RUN_OUTCOME_TOKEN": server.token})
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-1] == (
        "FAILED: 7 of 10 rows read were dead-lettered (70.00%), more than --max_dead_letter_ratio 0.01 (1.00%)")
    assert "Traceback" not in result.stderr


# -- inside the job: where the launcher does not wait (a Flex Template launch on Dataflow) ---------


def test_the_job_itself_fails_above_the_ratio():
    with (pytest.raises(Exception, match=r"2 of 100 rows read were dead-lettered \(2\.00%\)"),
          TestPipeline(runner="FnApiRunner") as p):
        rows = p | "Rows" >> beam.Create(range(100))
        dead = p | "Dead" >> beam.Create(["a", "b"])
        _ = (rows, dead) | CheckDeadLetterRatio(0.01)


def test_the_job_passes_at_the_ratio():
    with TestPipeline(runner="FnApiRunner") as p:
        rows = p | "Rows" >> beam.Create(range(100))
        dead = p | "Dead" >> beam.Create(["a"])
        checked = (rows, dead) | CheckDeadLetterRatio(0.01)
        assert_that(checked, equal_to([None]))


@pytest.mark.parametrize("argv, expected", [
    (["--runner=DataflowRunner"], 0.05),
    (["--runner", "dataflow"], 0.05),
    (["--template_location=gs://b/t/job_object"], 0.05),   # what a Flex Template launch writes
    (["--runner=DataflowRunner", "--streaming"], None),  # no end to count at
    (["--runner=FnApiRunner"], None),                     # judged from the metrics, here
    ([], None),
])
def test_which_runs_check_inside_the_job(argv, expected):
    assert in_job_max_ratio(PipelineOptions(argv), 0.05) == expected


def test_the_files_job_with_the_check_fails_when_most_rows_are_dead_lettered(server, datasource, tmp_path):
    from sinks.tinybird import WriteToTinybird

    source = _mostly_bad(tmp_path / "in.ndjson", good=4, bad=6)
    write = WriteToTinybird(datasource=datasource, api_url=server.url, token=server.token, wait=True)
    with (pytest.raises(Exception, match=r"6 of 10 rows read were dead-lettered \(60\.00%\)"),
          TestPipeline(runner="FnApiRunner") as p):
        files_to_tinybird.build(p, file_pattern=str(source), file_format="ndjson", write=write,
                                max_dead_letter_ratio=0.5)
    server.flush()
    assert server.query(f"SELECT count() AS n FROM {datasource}") == [{"n": 4}]


# -- how a job on a remote runner ended: a streaming job's drain is its normal end -----------------


class _FakeResult:
    """A finished job's result as a remote runner gives it: its end state and (empty) counters.

    ``raising``: ``wait_until_finish`` raises on any end but DONE, as Beam's Dataflow and
    portable (Flink) results do, the state staying readable on the result.
    """

    def __init__(self, state, *, raising):
        self.state, self._raising = state, raising

    def wait_until_finish(self, duration=None):
        if self._raising and self.state != "DONE":
            raise RuntimeError(f"Dataflow pipeline failed. State: {self.state}, Error:\nNone")
        return self.state

    def metrics(self):
        class _Metrics:
            def query(self, _filter=None):
                return {"counters": [], "distributions": [], "gauges": []}
        return _Metrics()


def _launch(monkeypatch, state, *, raising, streaming):
    """``run_pipeline`` on a remote runner whose job ends in ``state``: (exit status, stdout, error text)."""
    from pipelines._options import SinkConfig
    from pipelines._running import run_pipeline

    monkeypatch.setattr(beam.Pipeline, "run", lambda self, *args, **kwargs: _FakeResult(state, raising=raising))
    config = SinkConfig(datasource="events", api_url="https://api.tinybird.co")
    out = io.StringIO()

    def main(argv):
        return run_pipeline(title="Streaming to Tinybird", argv=argv, config=config,
                            build=lambda *args: None, dead_letter_path=None, out=out)

    argv = ["--runner=FnApiRunner", *(["--streaming"] if streaming else [])]
    try:
        exit_on_usage_error(main, argv)
    except SystemExit as exit_:
        return exit_.code, out.getvalue(), ""
    except RuntimeError as error:  # uncaught: Python prints the traceback and exits with status 1
        return 1, out.getvalue(), str(error)
    return 0, out.getvalue(), ""


@pytest.mark.parametrize("raising", [False, True], ids=["returns-the-state", "raises-unless-done"])
@pytest.mark.parametrize("state, status, says", [
    ("DONE", 0, "Streaming to Tinybird: finished in"),
    ("DRAINED", 0, "Streaming to Tinybird: drained (state DRAINED)"),
    ("UPDATED", 0, "Streaming to Tinybird: replaced by an update (state UPDATED)"),
    ("CANCELLED", 1, "Streaming to Tinybird ended in state CANCELLED: a cancelled streaming job"),
    ("FAILED", 1, "Streaming to Tinybird ended in state FAILED"),
])
def test_a_streaming_job_on_a_remote_runner_ends_well_when_drained(monkeypatch, raising, state, status, says):
    """Draining is how a streaming job is stopped: it was reported as a failure (Beam's Dataflow result
    raises on any state but DONE, and the launcher raised on DRAINED itself)."""
    code, printed, error = _launch(monkeypatch, state, raising=raising, streaming=True)
    assert code == status
    assert says in (printed if status == 0 else error)
    # A drained job's rows are counted and judged as a finished one's; an updated job goes on elsewhere.
    assert ("  rows read                     0" in printed) == (state in ("DONE", "DRAINED"))


@pytest.mark.parametrize("raising", [False, True], ids=["returns-the-state", "raises-unless-done"])
@pytest.mark.parametrize("state", ["DRAINED", "UPDATED", "CANCELLED", "FAILED"])
def test_a_batch_job_that_does_not_end_done_fails(monkeypatch, raising, state):
    code, printed, error = _launch(monkeypatch, state, raising=raising, streaming=False)
    assert (code, printed) == (1, "")
    assert error.startswith(f"Streaming to Tinybird ended in state {state}")
