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
    assert take_stop_after_secs(["--input_topic", "projects/p/topics/t"]) == (None, ["--input_topic", "projects/p/topics/t"])
    assert take_stop_after_secs(["--stop_after_secs", "2.5", "--window_secs", "5"]) == (2.5, ["--window_secs", "5"])
    assert take_stop_after_secs(["--stop_after_secs=30"]) == (30.0, [])
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(UsageError, match="--stop_after_secs must be a positive number of seconds"):
            take_stop_after_secs(["--stop_after_secs", bad])


def test_only_local_runners_are_stopped_here():
    assert is_local_runner(None) and is_local_runner("DirectRunner") and is_local_runner("BundleBasedDirectRunner")
    assert not is_local_runner("DataflowRunner") and not is_local_runner("FlinkRunner")
    # A partial batch's wait, one blocked 30 s pull of the DirectRunner, a margin.
    assert settle_timeout_secs(5.0) == 50.0


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
