"""Stopping the streaming job on the DirectRunner, without a server: options, accounting, counters, the demo's messages."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from pipelines._options import UsageError
from pipelines._streaming_run import InFlight, direct_runner_counts_every_bundle, is_local_runner, settle_timeout_secs
from pipelines.streaming_demo import BAD_MESSAGES, sample_messages
from pipelines.streaming_to_tinybird import take_stop_after_secs


def test_stop_after_secs_is_taken_out_of_the_pipeline_options():
    assert take_stop_after_secs(["--input_topic", "projects/my-project/topics/t"]) == (None, ["--input_topic", "projects/my-project/topics/t"])
    assert take_stop_after_secs(["--stop_after_secs", "2.5", "--window_secs", "5"]) == (2.5, ["--window_secs", "5"])
    assert take_stop_after_secs(["--stop_after_secs=30"]) == (30.0, [])
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(UsageError, match="--stop_after_secs must be a positive number of seconds"):
            take_stop_after_secs(["--stop_after_secs", bad])


def test_only_local_runners_are_stopped_here():
    assert is_local_runner(None) and is_local_runner("DirectRunner") and is_local_runner("BundleBasedDirectRunner")
    assert not is_local_runner("DataflowRunner") and not is_local_runner("FlinkRunner")
    # Beam takes a runner's name in any case, without "Runner", or as its class's path.
    for name in ("direct", "directrunner", "Direct", "bundlebaseddirect", "SwitchingDirectRunner",
                 "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"):
        assert is_local_runner(name), name
    for name in ("dataflow", "Dataflow", "flink", "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner",
                 "PrismRunner", "directrunners"):
        assert not is_local_runner(name), name


def test_the_direct_runner_by_any_name_beam_takes_runs_here_until_stopped(monkeypatch):
    """--runner=direct is Beam's DirectRunner: it was taken for a remote runner, so --stop_after_secs
    was refused ("for the DirectRunner") and a stop did not wait for the rows in flight."""
    from pipelines import streaming_to_tinybird

    ran_here = []
    monkeypatch.setattr(streaming_to_tinybird, "require_pubsub", lambda: None)
    monkeypatch.setattr(streaming_to_tinybird, "run_until_stopped", lambda **kwargs: ran_here.append(kwargs))
    streaming_to_tinybird.run(["--input_subscription", "projects/my-project/subscriptions/s", "--datasource", "events",
                               "--api_url", "https://api.tinybird.co", "--runner=direct", "--stop_after_secs", "5"])
    assert [kwargs["stop_after_secs"] for kwargs in ran_here] == [5.0]
    # A partial batch's wait, one blocked 30 s pull of the DirectRunner, a dead letter's wait for its file, a margin.
    assert settle_timeout_secs(5.0) == 60.0


def test_in_flight_accounting():
    settled = InFlight(rows_read=10, rows_acknowledged=7, dead_letters=3, dead_letters_in_files=3)
    assert settled.settled and settled.rows_unaccounted == 0
    buffered = InFlight(rows_read=10, rows_acknowledged=5, dead_letters=3, dead_letters_in_files=3)
    assert not buffered.settled and buffered.rows_unaccounted == 2
    unwritten = InFlight(rows_read=10, rows_acknowledged=7, dead_letters=3, dead_letters_in_files=1)
    assert not unwritten.settled and unwritten.dead_letters_unwritten == 2
    without_files = InFlight(rows_read=10, rows_acknowledged=7, dead_letters=3, dead_letters_in_files=None)
    assert without_files.settled
    assert buffered.describe() == "10 rows read, 5 acknowledged, 3 dead-lettered (3 in files), 2 in flight"


class _Count(beam.DoFn):
    def process(self, element):
        Metrics.counter("test", "elements").inc()
        yield element


def _counted_on_the_streaming_direct_runner() -> int:
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    stream = TestStream()
    for _ in range(5):  # five bundles of three elements
        stream = stream.add_elements([1, 2, 3]).advance_processing_time(1)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | stream | beam.ParDo(_Count())
    result = pipeline.run()
    result.wait_until_finish()
    [counter] = result.metrics().query(MetricsFilter().with_namespace("test"))["counters"]
    return counter.committed


def test_the_streaming_direct_runner_counts_every_bundle_only_with_the_workaround():
    # Beam 2.77's bug, shown: the first bundle's counts only. Should Beam fix it, this
    # assertion fails and the workaround in pipelines/_streaming_run.py can go.
    assert _counted_on_the_streaming_direct_runner() == 3
    with direct_runner_counts_every_bundle():
        assert _counted_on_the_streaming_direct_runner() == 15


def test_the_demos_messages_hold_every_sample_line_once_and_three_bad_messages():
    lines = [b'{"id": %d}' % i for i in range(5000)]
    messages = sample_messages(lines)
    bad = [m for m in messages if m in BAD_MESSAGES]
    assert bad == list(BAD_MESSAGES)
    rows = [row for m in messages if m not in BAD_MESSAGES for row in m.split(b"\n") if row]
    assert rows == lines
    assert max(m.count(b"\n") for m in messages) == 20 and min(m.count(b"\n") for m in messages if m not in bad) == 1


class _Counter:
    def __init__(self, namespace: str, name: str, value: int) -> None:
        self.key = type("Key", (), {"metric": type("Name", (), {"namespace": namespace, "name": name})()})()
        self.committed, self.attempted = value, value


class _StuckResult:
    """A running job whose counters never settle: 10 rows read, 6 acknowledged, 1 dead letter not in a file."""

    def metrics(self):
        counters = {"pipelines": [_Counter("pipelines", "rows_read", 10)],
                    "tinybird": [_Counter("tinybird", "rows_acknowledged", 6), _Counter("tinybird", "dead_letters", 1)]}

        class _Query:
            def query(self, metrics_filter):
                [namespace] = metrics_filter.namespaces
                return {"counters": counters[namespace]}

        return _Query()


def test_a_stop_that_gives_up_waiting_counts_what_is_lost_and_fails_the_run():
    from pipelines._streaming_run import _settle, _with_losses, stop_note
    from pipelines._summary import RunSummary

    watcher = type("Watcher", (), {"ended": False, "error": None})()
    in_flight = _settle(_StuckResult(), watcher, timeout_secs=0.5, dead_letter_files=True)
    assert (in_flight.rows_unaccounted, in_flight.dead_letters_unwritten) == (3, 1)
    note = stop_note(title="Streaming to Tinybird", reason="SIGINT", in_flight=in_flight)
    assert note == ("Streaming to Tinybird: stopped (SIGINT) with rows in flight: 10 rows read, 6 acknowledged, "
                    "1 dead-lettered (0 in files), 3 in flight. Beam's DirectRunner acknowledged them to Pub/Sub "
                    "when it read them: they are lost.\n")
    summary = RunSummary(rows_read=10, rows_acknowledged=6, rows_quarantined=0, dead_letters=1,
                         dead_letters_by_kind={}, requests=1, retries=0, extra={}, elapsed_secs=1.0)
    assert _with_losses(summary, in_flight).failure == (
        "3 rows read were neither acknowledged nor dead-lettered, and 1 dead letters not in a file, "
        "when the runner was cancelled")
