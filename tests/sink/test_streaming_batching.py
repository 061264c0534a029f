"""Batching in streaming, with TestStream: by size, by buffering time, at the end
of the window, late data, and windows never mixed."""

from __future__ import annotations

import array

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from sinks.tinybird._batching import BatchLimits, IntoGlobalWindow, _BatchDoFn, _EncodeAndBatchDoFn

# Each event encodes to exactly 20 bytes with its newline: {"id":1000,"p":"x"}
_ROW_BYTES = 20


def _event(i: int) -> dict:
    return {"id": 1000 + i, "p": "x"}


def _streaming_options() -> PipelineOptions:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    return options


class _FrozenClock:
    """The processing-time clock of TestStream starts at 0 and only TestStream moves it."""

    def __call__(self) -> float:
        return 0.0


def _batches(pcoll, *, limits: BatchLimits):
    """The batches the sink would post for unbounded input: encode (full buffers and
    remainders alike go to the merge step, all in the global window), then merge."""
    encoded = pcoll | IntoGlobalWindow(
        _EncodeAndBatchDoFn(datasource="events", limits=limits, windowing=pcoll.windowing, full_to_merge=True)
    ).with_outputs("dead_letters", main="remainders")
    merged = encoded.remainders | beam.ParDo(
        _BatchDoFn(limits=limits, buffer_in_processing_time=True, clock=_FrozenClock()))
    return merged | beam.Map(
        lambda b: (b.window, b.rows, tuple(orjson.loads(line)["id"] - 1000 for line in b.payload.splitlines())))


def test_flush_by_size_by_buffering_time_at_window_end_and_late_data_is_sent():
    assert len(orjson.dumps(_event(1))) + 1 == _ROW_BYTES
    limits = BatchLimits(max_batch_bytes=3 * _ROW_BYTES, max_batch_rows=1000, max_buffering_secs=30, num_shards=1)
    stream = (
        TestStream()
        .advance_watermark_to(0)
        # Window [0, 10): four rows: one full batch of three leaves at once.
        .add_elements([TimestampedValue(_event(i), i) for i in range(4)])
        # The fourth row waits 30 s of processing time, then leaves alone.
        .advance_processing_time(31)
        # Window [10, 20): two rows, sent when the watermark passes 20.
        .add_elements([TimestampedValue(_event(i), i) for i in (10, 11)])
        .advance_watermark_to(25)
        # Late row for [0, 10), after the watermark passed that window's end.
        .add_elements([TimestampedValue(_event(5), 5)])
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=_streaming_options()) as p:
        out = _batches(p | stream | "Fixed" >> beam.WindowInto(FixedWindows(10)), limits=limits)
        assert_that(out, equal_to([
            ("[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)", 3, (0, 1, 2)),
            ("[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)", 1, (3,)),
            ("[1970-01-01T00:00:10Z, 1970-01-01T00:00:20Z)", 2, (10, 11)),
            ("[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)", 1, (5,)),
        ]))


def test_batches_never_mix_windows_across_shards():
    limits = BatchLimits(max_batch_bytes=4 * _ROW_BYTES, max_batch_rows=1000, max_buffering_secs=3600, num_shards=3)
    stream = TestStream().advance_watermark_to(0)
    for start in range(0, 60, 6):
        stream = stream.add_elements([TimestampedValue(_event(i), i) for i in range(start, start + 6)])
    # The old DirectRunner that runs TestStream drops, at assert_that's own
    # GroupByKey, what timers emit while the watermark jumps straight to
    # infinity; a finite step first lets the end-of-window timers fire.
    stream = stream.advance_watermark_to(100).advance_watermark_to_infinity()
    with TestPipeline(options=_streaming_options()) as p:
        out = _batches(p | stream | "Fixed" >> beam.WindowInto(FixedWindows(10)), limits=limits)

        def check(batches):
            seen = []
            for window, rows, ids in batches:
                assert rows == len(ids) <= 4
                windows = {i // 10 for i in ids}
                assert len(windows) == 1, f"batch mixes windows: {ids}"
                assert window.startswith(f"[1970-01-01T00:00:{(ids[0] // 10) * 10:02d}Z")
                seen.extend(ids)
            assert sorted(seen) == list(range(60))

        assert_that(out, check)


def _steps(pcoll_builder) -> list[tuple[str, str]]:
    """(label, transform class) of every leaf step inside the sink, in the order applied."""
    from apache_beam.pipeline import PipelineVisitor

    from sinks.tinybird import WriteToTinybird

    p = beam.Pipeline(options=_streaming_options())
    pcoll_builder(p) | "Sink" >> WriteToTinybird(datasource="events", token="t", api_url="http://127.0.0.1:1")
    steps: list[tuple[str, str]] = []

    class Visitor(PipelineVisitor):
        def visit_transform(self, node):
            if node.full_label.startswith("Sink/"):
                steps.append((node.full_label[len("Sink/"):], type(node.transform).__name__))

    p.visit(Visitor())
    return steps


def test_unbounded_input_runs_three_steps_per_bundle_and_no_window_into():
    """Encode, merge, post: each streaming step costs per bundle (the dead letters' Flatten is not a DoFn;
    the step that puts dead letters back in their windows is, fused with the steps that make them)."""
    steps = _steps(lambda p: p | TestStream().add_elements([_event(1)]) | beam.WindowInto(FixedWindows(10)))
    assert steps == [
        ("EncodeAndBatch/IntoGlobalWindow(_EncodeAndBatchDoFn)", "IntoGlobalWindow"),
        ("MergeRemainders", "ParDo"),
        ("Post/ParDo(_PostDoFn)/ParDo(_PostDoFn)", "ParDo"),
        ("GatherDeadLetters", "Flatten"),
        ("DeadLetters", "IntoWindowing"),
    ]


def test_bounded_input_posts_full_batches_apart_and_no_window_into():
    steps = _steps(lambda p: p | beam.Create([_event(1)]) | beam.WindowInto(FixedWindows(10)))
    labels = [label for label, _ in steps]
    assert not [kind for _, kind in steps if kind == "WindowInto"]
    assert steps[0] == ("EncodeAndBatch/IntoGlobalWindow(_EncodeAndBatchDoFn)", "IntoGlobalWindow")
    assert "PostFull/ParDo(_PostDoFn)/ParDo(_PostDoFn)" in labels
    assert "PostMerged/ParDo(_PostDoFn)/ParDo(_PostDoFn)" in labels
    assert any(label.startswith("GroupRemainders") for label in labels)


class _Bag:
    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)

    def read(self):
        return list(self.items)

    def clear(self):
        self.items = []


class _Value:
    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.at = None

    def set(self, at):
        self.at = at


def test_a_buffer_full_inside_a_bundle_is_posted_by_the_merge_step_at_once():
    """Unbounded input: the full buffer reaches the merge step with the line that did not fit,
    so the merge step, holding nothing, cuts and emits the batch without waiting for a timer."""
    from apache_beam.transforms.window import IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import Batch, Chunk

    window = IntervalWindow(0, 10)
    # Three rows of 20 bytes fit in 70; the fourth does not (a buffer full short of the byte limit).
    limits = BatchLimits(max_batch_bytes=70, max_batch_rows=1000, max_buffering_secs=3600, num_shards=1)
    encoder = _EncodeAndBatchDoFn(datasource="events", limits=limits, windowing=Windowing(FixedWindows(10)),
                                  full_to_merge=True)
    encoder.setup()
    encoder.start_bundle()
    outputs = [out for i in range(4)
               for out in encoder.process(_event(i), wv=WindowedValue(_event(i), Timestamp(i), (window,))) or ()]
    assert len(outputs) == 1
    merge = _BatchDoFn(limits=limits, buffer_in_processing_time=True, clock=_FrozenClock())
    bag, held, window_end, stale = _Bag(), _Value(), _Timer(), _Timer()
    batches = list(merge.process(outputs[0].value, buffer=bag, held=held, window_end=window_end, stale=stale))
    assert [(b.rows, [orjson.loads(line)["id"] - 1000 for line in b.payload.splitlines()]) for b in batches] == [
        (3, [0, 1, 2])]
    assert all(isinstance(b, Batch) and len(b.payload) <= 70 for b in batches)
    # The line that did not fit waits in the shard's state, with its timers armed.
    assert [Chunk(*c) for c in bag.read()] == [
        Chunk(orjson.dumps(_event(3)) + b"\n", 1, array.array("q", [3_000_000]).tobytes())]
    assert held.read() == (20, 1) and window_end.at is not None and stale.at is not None


def test_the_longest_max_buffering_secs_sets_a_timer_inside_beams_timestamps():
    """A finite max_buffering_secs past Beam's last timestamp (1.7e308, meant as "never") passed the
    checks, then made every bundle of the merge step fail (OverflowError making the timer's time);
    the longest one accepted now sets its timer within Beam's range, with the real clock."""
    import time

    from apache_beam.utils.timestamp import MAX_TIMESTAMP

    from sinks.tinybird._batching import MAX_BUFFERING_SECS

    limits = BatchLimits(max_batch_bytes=1000, max_batch_rows=1000, max_buffering_secs=MAX_BUFFERING_SECS,
                         num_shards=1)
    merge = _BatchDoFn(limits=limits, buffer_in_processing_time=True, clock=time.time)
    key = (0, 9_999_999, "[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)", b"", "events")
    chunk = (orjson.dumps(_event(1)) + b"\n", 1, array.array("q", [0]).tobytes())
    bag, held, window_end, stale = _Bag(), _Value(), _Timer(), _Timer()
    assert list(merge.process((key, chunk), buffer=bag, held=held, window_end=window_end, stale=stale)) == []
    assert time.time() < stale.at.seconds() < MAX_TIMESTAMP.seconds()
    with pytest.raises(ValueError, match="max_buffering_secs must be at most"):
        BatchLimits(max_batch_bytes=1000, max_batch_rows=1000, max_buffering_secs=1.7e308, num_shards=1)
